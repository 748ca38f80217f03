"""Loading and validating SFT, preference and prompt datasets.

Every stage of the pipeline starts from a user's file, and a bad row found deep inside a training loop
costs an hour of compute and says nothing useful. So rows are checked once, here, when they are read,
and every problem is reported as ``FILE:LINE: field 'NAME': what is wrong (got VALUE)``: the user can
open the file at that line and fix it.

Users arrive from TRL and OpenRLHF, so the column names those tools use are all accepted and mapped to
one canonical form per task (:class:`SFTExample`, :class:`PreferenceExample`, :class:`PromptExample`);
:func:`to_record` writes the canonical form back out in TRL's column layout.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar, Union

__all__ = [
    "Message",
    "ROLES",
    "SFTExample",
    "PreferenceExample",
    "PromptExample",
    "DataError",
    "LoadResult",
    "load_records",
    "load_sft",
    "load_preferences",
    "load_prompts",
    "read_jsonl",
    "write_jsonl_atomic",
    "to_record",
]

logger = logging.getLogger("rlhf.data")

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
PathLike = Union[str, "os.PathLike[str]"]
ROLES = ("system", "user", "assistant")
SUPPORTED_FORMATS = ".jsonl (or .ndjson), .json, .csv, .parquet, or a directory saved with datasets' save_to_disk"
_REASONS_LOGGED = 5


# ----------------------------------------------------------------------------------------------------
# Canonical examples
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SFTExample:
    """One demonstration: a conversation that ends with a user turn, and the assistant's reply to it."""

    prompt: list[Message]
    """The conversation up to, not including, the final assistant turn; it ends with a user turn."""
    completion: str
    """The final assistant turn's content: the tokens the SFT loss is computed on."""
    source: str = ""
    """Where the row came from ("FILE:LINE" or "FILE row N"), so later errors can point back at it."""
    extra: dict = field(default_factory=dict)
    """Any other columns of the row (e.g. "family"), passed through unchanged."""


@dataclass(frozen=True)
class PreferenceExample:
    """One comparison: two replies to the same prompt, the preferred one first."""

    prompt: list[Message]
    chosen: str
    rejected: str
    margin: float | None = None
    """How strongly ``chosen`` is preferred, if the annotation says (used by margin-aware RM losses)."""
    annotator: str | None = None
    """Who labelled the pair, for agreement statistics and per-annotator noise analysis."""
    source: str = ""
    extra: dict = field(default_factory=dict)
    """Other columns, e.g. gold scores kept for evaluating the reward model."""


@dataclass(frozen=True)
class PromptExample:
    """One prompt for RL rollouts: the policy writes the reply."""

    prompt: list[Message]
    source: str = ""
    extra: dict = field(default_factory=dict)


Example = Union[SFTExample, PreferenceExample, PromptExample]
T = TypeVar("T", SFTExample, PreferenceExample, PromptExample)


class DataError(ValueError):
    """A problem with a dataset, located as precisely as the format allows.

    The message reads ``LOCATION: field 'FIELD': REASON`` (``FILE:LINE`` for line formats, ``FILE row N``
    otherwise); errors about a whole file (missing, unsupported, no valid rows) carry no location and
    the reason names the file.

    Attributes:
        path: the file or directory the problem is in.
        location: the full location ("data.jsonl:3", "data.parquet row 17"), or None for file errors.
        field: the offending field ("completion", "messages[2].role"), or None when no single field is.
        reason: what is wrong, without the location.
    """

    def __init__(self, reason: str, *, path: PathLike, location: str | None = None, field: str | None = None):
        self.path = str(path)
        self.location = location
        self.field = field
        self.reason = reason
        super().__init__(_format_error(reason, location, field))

    def __reduce__(self):  # keyword-only arguments: teach pickle (e.g. DataLoader workers) to rebuild us
        return (_rebuild_data_error, (self.reason, self.path, self.location, self.field))


def _rebuild_data_error(reason: str, path: str, location: str | None, field: str | None) -> DataError:
    return DataError(reason, path=path, location=location, field=field)


def _format_error(reason: str, location: str | None, field: str | None) -> str:
    text = f"field '{field}': {reason}" if field else reason
    return f"{location}: {text}" if location else text


@dataclass
class LoadResult(Generic[T]):
    """The valid examples of a file, and why the others were dropped (``on_error="skip"``)."""

    examples: list[T]
    skipped: list[str]
    """The full DataError message of each skipped row, in file order."""
    path: str

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[T]:
        return iter(self.examples)

    def __getitem__(self, index: int | slice):
        return self.examples[index]


# ----------------------------------------------------------------------------------------------------
# Reading records from files
# ----------------------------------------------------------------------------------------------------

Row = tuple[str, Union[dict, DataError]]  # (location, record, or the error that made it unreadable)


def load_records(path: PathLike, *, split: str | None = None) -> Iterator[tuple[str, dict]]:
    """Yield ``(location, record)`` for every row of a dataset file, raising DataError on a bad one.

    Supported: .jsonl/.ndjson ("FILE:LINE"), .json (an array of objects, "FILE item N"; any other text
    is read as JSON Lines), .csv ("FILE:LINE", header on line 1), .parquet ("FILE row N") and directories
    saved with ``datasets``' ``save_to_disk`` ("DIR row N"; ``split`` picks the split of a DatasetDict,
    default "train"). All numbers are 1-based.
    """
    yield from _strict(_iter_rows(path, split))


def read_jsonl(path: PathLike) -> list[dict]:
    """Read a JSON Lines file strictly, whatever its extension: every non-blank line must be an object."""
    rows = _jsonl_file_rows(_require_exists(path))
    return [record for _, record in _strict(rows)]


def _strict(rows: Iterable[Row]) -> Iterator[tuple[str, dict]]:
    """Turn yielded row errors into raised ones."""
    for location, record in rows:
        if isinstance(record, DataError):
            raise record
        yield location, record


def _require_exists(path: PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError(f"no such file or directory: {path}", path=path)
    return p


def _iter_rows(path: PathLike, split: str | None) -> Iterator[Row]:
    """Dispatch on the file type; rows that cannot even be parsed come out as DataError values.

    Errors are yielded rather than raised so that ``on_error="skip"`` can step over a malformed line
    and keep reading the rest of the file.
    """
    p = _require_exists(path)
    if p.is_dir():
        return _saved_dataset_rows(p, split)
    readers: dict[str, Callable[[Path], Iterator[Row]]] = {
        ".jsonl": _jsonl_file_rows,
        ".ndjson": _jsonl_file_rows,
        ".json": _json_file_rows,
        ".csv": _csv_rows,
        ".parquet": _parquet_rows,
    }
    reader = readers.get(p.suffix.lower())
    if reader is None:
        raise DataError(f"unsupported file type '{p.suffix}' for {p}; supported: {SUPPORTED_FORMATS}", path=p)
    if split not in (None, "train"):
        raise DataError(f"split '{split}' requested, but {p} is a single file with no splits", path=p)
    return reader(p)


def _jsonl_file_rows(path: Path) -> Iterator[Row]:
    with open(path, "rb") as f:  # bytes, so a bad UTF-8 sequence is reported at its line, not mid-read
        yield from _jsonl_rows(path, f)


def _jsonl_rows(path: Path, lines: Iterable[bytes | str]) -> Iterator[Row]:
    """Parse JSON Lines: one object per line, blank lines ignored, locations "FILE:LINE"."""
    for lineno, raw in enumerate(lines, start=1):
        location = f"{path}:{lineno}"
        try:
            text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as e:
            yield location, DataError(f"not valid UTF-8 ({e.reason} at byte {e.start})", path=path, location=location)
            continue
        if not text.strip():
            continue
        yield location, _parse_json_object(text, path, location)


def _parse_json_object(text: str, path: Path, location: str) -> dict | DataError:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return DataError(f"invalid JSON: {e.msg} (column {e.colno})", path=path, location=location)
    if not isinstance(value, dict):
        return DataError(f"expected a JSON object per row (got {_got(value)})", path=path, location=location)
    return value


def _json_file_rows(path: Path) -> Iterator[Row]:
    """A .json file is normally an array of objects; anything else is read as JSON Lines."""
    text = _decode_whole(path)
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):  # an array with a mistake in it: say where, not "line 1: ["
            location = f"{path}:{e.lineno}"
            raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", path=path, location=location) from None
        whole = None
    if isinstance(whole, dict) and len(text.strip().splitlines()) > 1:
        # A pretty-printed object would otherwise fail as JSON Lines at "line 1: {", which misleads.
        raise DataError(
            f"{path} holds a single JSON object; expected an array of objects or JSON Lines "
            f"(one object per line); top-level keys: {_keys(whole)}",
            path=path,
        )
    if not isinstance(whole, list):
        yield from _jsonl_rows(path, text.splitlines())
        return
    for index, item in enumerate(whole, start=1):
        location = f"{path} item {index}"
        if isinstance(item, dict):
            yield location, item
        else:
            yield location, DataError(f"expected a JSON object (got {_got(item)})", path=path, location=location)


def _decode_whole(path: Path) -> str:
    """A whole file as text (a BOM is dropped: spreadsheets and editors write one); bad UTF-8 names its line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        location = f"{path}:{line}"
        raise DataError(f"not valid UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8", path=path,
                        location=location) from None


def _csv_rows(path: Path) -> Iterator[Row]:
    """CSV with a header row; locations are the line a row starts on (quoted cells may span lines)."""
    reader = csv.reader(io.StringIO(_decode_whole(path), newline=""))
    try:
        yield from _csv_records(path, reader)
    except csv.Error as e:
        location = f"{path}:{reader.line_num}"
        raise DataError(f"not valid CSV: {e}", path=path, location=location) from None


def _csv_records(path: Path, reader) -> Iterator[Row]:
    header = next(reader, None)
    if header is None:
        return
    start = reader.line_num + 1
    for cells in reader:
        location = f"{path}:{start}"
        start = reader.line_num + 1
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) != len(header):
            reason = f"has {len(cells)} cells but the header has {len(header)} columns"
            yield location, DataError(reason, path=path, location=location)
            continue
        yield location, dict(zip(header, cells))


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq  # installed with datasets; imported lazily to keep `import rlhf` fast

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt or non-parquet file
        raise DataError(f"cannot read {path} as parquet: {e}", path=path) from e
    row = 0
    for batch in parquet.iter_batches():
        for record in batch.to_pylist():
            row += 1
            yield f"{path} row {row}", record


def _saved_dataset_rows(path: Path, split: str | None) -> Iterator[Row]:
    import datasets  # heavy import, only paid by users who load saved datasets

    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(
            f"{path} is a directory but not a dataset saved with save_to_disk ({e}); supported: {SUPPORTED_FORMATS}",
            path=path,
        ) from e
    if isinstance(data, datasets.DatasetDict):
        name = split or "train"
        if name not in data:
            raise DataError(f"{path} has no split '{name}'; its splits are: {', '.join(data)}", path=path)
        data = data[name]
    elif split not in (None, "train"):
        raise DataError(f"split '{split}' requested, but {path} is a single dataset with no splits", path=path)
    for row, record in enumerate(data, start=1):
        yield f"{path} row {row}", record


# ----------------------------------------------------------------------------------------------------
# Field validation: each helper returns the clean value or raises _FieldError naming the field
# ----------------------------------------------------------------------------------------------------


class _FieldError(Exception):
    """A bad field, before the row's location is known; the row loop turns it into a DataError."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


def _got(value: Any) -> str:
    """Describe a value in JSON terms, short enough for an error line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57]) + "..."
    if isinstance(value, (list, tuple)):
        return f"list of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, dict):
        return f"object with keys {_keys(value)}"
    return type(value).__name__


def _keys(mapping: dict) -> str:
    return ", ".join(repr(k) for k in mapping) or "none"


def _present(record: dict, key: str) -> bool:
    """A column counts as given when it is there and not null (parquet fills absent columns with null)."""
    return record.get(key) is not None


def _text(value: Any, name: str) -> str:
    """A non-empty string; whitespace-only counts as empty because it trains the model on nothing.

    JSON can spell half of a UTF-16 surrogate pair ("\\ud800"), which no tokenizer can encode: such text is
    a bad row here rather than a crash in the middle of tokenization."""
    if not isinstance(value, str) or not value.strip():
        raise _FieldError(name, f"must be a non-empty string (got {_got(value)})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _FieldError(name, f"holds a lone surrogate {value[e.start]!r} at character {e.start + 1}, which is not "
                          "text any tokenizer can encode") from None
    return value


def _message(value: Any, name: str) -> Message:
    if not isinstance(value, dict):
        raise _FieldError(name, f"must be a message object with 'role' and 'content' (got {_got(value)})")
    if "role" not in value:
        raise _FieldError(name, f"message is missing 'role' (got {_got(value)})")
    role = value["role"]
    if role not in ROLES:
        raise _FieldError(f"{name}.role", f"unknown role {_got(role)} (expected 'system', 'user' or 'assistant')")
    if "content" not in value:
        raise _FieldError(name, f"message is missing 'content' (got {_got(value)})")
    return {"role": role, "content": _text(value["content"], f"{name}.content")}


def _conversation(value: Any, name: str) -> list[Message]:
    """A list of messages: an optional system turn, then user and assistant turns alternating."""
    if not isinstance(value, list) or not value:
        raise _FieldError(name, f"must be a non-empty list of messages (got {_got(value)})")
    messages = [_message(m, f"{name}[{i}]") for i, m in enumerate(value)]
    expected = "user"
    for i, m in enumerate(messages):
        if i == 0 and m["role"] == "system":
            continue
        if m["role"] != expected:
            after = f"after '{messages[i - 1]['role']}'" if i else "as the first turn"
            raise _FieldError(f"{name}[{i}].role", f"expected '{expected}' {after} (got '{m['role']}')")
        expected = "assistant" if expected == "user" else "user"
    return messages


def _ending_with(messages: list[Message], role: str, name: str) -> list[Message]:
    if messages[-1]["role"] != role:
        article = "an" if role == "assistant" else "a"
        raise _FieldError(name, f"must end with {article} {role} turn (got '{messages[-1]['role']}' last)")
    return messages


def _prompt(value: Any, name: str) -> list[Message]:
    """A prompt is a string (one user turn) or a conversation ending with a user turn."""
    if isinstance(value, str):
        return [{"role": "user", "content": _text(value, name)}]
    if isinstance(value, list):
        return _ending_with(_conversation(value, name), "user", name)
    raise _FieldError(name, f"must be a string or a list of messages (got {_got(value)})")


def _reply(value: Any, name: str) -> str:
    """A reply is a string, or (TRL's conversational form) a list holding one assistant message."""
    if isinstance(value, str):
        return _text(value, name)
    if isinstance(value, list) and len(value) == 1:
        message = _message(value[0], f"{name}[0]")
        if message["role"] != "assistant":
            raise _FieldError(f"{name}[0].role", f"must be 'assistant' (got '{message['role']}')")
        return message["content"]
    raise _FieldError(name, f"must be a non-empty string or a list with one assistant message (got {_got(value)})")


def _margin(value: Any) -> float | None:
    """Optional finite number; numeric strings are accepted because CSV cells are always strings."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
        raise _FieldError("margin", f"must be a finite number (got {_got(value)})")
    return float(number)


def _annotator(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise _FieldError("annotator", f"must be a string (got {_got(value)})")
    return value


def _missing(expected: str, record: dict) -> _FieldError:
    found = _keys({k: v for k, v in record.items() if v is not None})
    return _FieldError(None, f"missing field: expected {expected} (found columns: {found})")


def _extra(record: dict, used: Iterable[str], known: Iterable[str]) -> dict:
    """Columns the example did not consume, minus null placeholders of the other accepted shapes."""
    used, known = set(used), set(known)
    return {k: v for k, v in record.items() if k not in used and not (k in known and v is None)}


# ----------------------------------------------------------------------------------------------------
# Row parsers: one per task, each maps every accepted shape to the canonical example
# ----------------------------------------------------------------------------------------------------

_SFT_KEYS = ("prompt", "completion", "instruction", "input", "response", "output", "messages")
_SFT_EXPECTED = "'prompt'+'completion', 'instruction'+'response' or 'messages'"


def _parse_sft(record: dict, source: str) -> SFTExample:
    if _present(record, "prompt") and _present(record, "completion"):
        prompt, completion = _prompt(record["prompt"], "prompt"), _reply(record["completion"], "completion")
        used: tuple[str, ...] = ("prompt", "completion")
    elif _present(record, "instruction"):
        prompt, completion, used = _parse_alpaca(record)
    elif _present(record, "messages"):
        messages = _ending_with(_conversation(record["messages"], "messages"), "assistant", "messages")
        prompt, completion, used = messages[:-1], messages[-1]["content"], ("messages",)
    else:
        raise _missing(_SFT_EXPECTED, record)
    return SFTExample(prompt, completion, source, _extra(record, used, _SFT_KEYS))


def _parse_alpaca(record: dict) -> tuple[list[Message], str, tuple[str, ...]]:
    """Alpaca style: the optional ``input`` is context appended to the instruction after a blank line."""
    answer_key = "response" if _present(record, "response") else "output"
    if not _present(record, answer_key):
        raise _missing(_SFT_EXPECTED + " ('instruction' needs 'response' or 'output')", record)
    text = _text(record["instruction"], "instruction")
    context = record.get("input")
    if context is not None and not isinstance(context, str):
        raise _FieldError("input", f"must be a string (got {_got(context)})")
    if context and context.strip():
        text = f"{text}\n\n{context}"
    prompt = [{"role": "user", "content": text}]
    return prompt, _text(record[answer_key], answer_key), ("instruction", "input", answer_key)


_PREF_KEYS = ("prompt", "chosen", "rejected", "margin", "annotator")
_PREF_EXPECTED = "'prompt'+'chosen'+'rejected', or 'chosen'+'rejected' as conversations sharing their prompt"


def _parse_preference(record: dict, source: str) -> PreferenceExample:
    if not (_present(record, "chosen") and _present(record, "rejected")):
        raise _missing(_PREF_EXPECTED, record)
    if _present(record, "prompt"):
        prompt = _prompt(record["prompt"], "prompt")
        chosen, rejected = _reply(record["chosen"], "chosen"), _reply(record["rejected"], "rejected")
    elif isinstance(record["chosen"], list) and isinstance(record["rejected"], list):
        prompt, chosen, rejected = _split_shared_prefix(record["chosen"], record["rejected"])
    else:
        raise _missing(_PREF_EXPECTED, record)
    if chosen.strip() == rejected.strip():
        raise _FieldError("rejected", f"is identical to 'chosen', so the pair says nothing (got {_got(rejected)})")
    margin, annotator = _margin(record.get("margin")), _annotator(record.get("annotator"))
    extra = _extra(record, _PREF_KEYS, _PREF_KEYS)
    return PreferenceExample(prompt, chosen, rejected, margin, annotator, source, extra)


def _split_shared_prefix(chosen: list, rejected: list) -> tuple[list[Message], str, str]:
    """TRL's implicit-prompt form: two full conversations, identical except for the final assistant turn."""
    chosen_conv = _ending_with(_conversation(chosen, "chosen"), "assistant", "chosen")
    rejected_conv = _ending_with(_conversation(rejected, "rejected"), "assistant", "rejected")
    prefix = chosen_conv[:-1]
    if rejected_conv[:-1] != prefix:
        differ = next(
            (i for i, (a, b) in enumerate(zip(prefix, rejected_conv[:-1])) if a != b),
            min(len(prefix), len(rejected_conv) - 1),
        )
        raise _FieldError(
            f"rejected[{differ}]",
            "with no 'prompt' column, 'chosen' and 'rejected' must be the same conversation except for the "
            f"final assistant turn, but they differ at message {differ}",
        )
    return prefix, chosen_conv[-1]["content"], rejected_conv[-1]["content"]


_PROMPT_KEYS = ("prompt", "query", "messages")


def _parse_prompt(record: dict, source: str) -> PromptExample:
    key = next((k for k in _PROMPT_KEYS if _present(record, k)), None)
    if key is None:
        raise _missing("'prompt', 'query' or 'messages'", record)
    return PromptExample(_prompt(record[key], key), source, _extra(record, (key,), _PROMPT_KEYS))


# ----------------------------------------------------------------------------------------------------
# The shared row loop and error policy
# ----------------------------------------------------------------------------------------------------

OnError = Literal["raise", "skip"]
Validator = Callable[[Any], Union[str, tuple[str, str], None]]
"""A row check: None when the row is fine, else the reason, or (field, reason) when one field is at fault."""


def load_sft(
    path: PathLike, *, on_error: OnError = "raise", validate: Validator | None = None, split: str | None = None
) -> LoadResult[SFTExample]:
    """Load demonstrations: ``prompt``+``completion``, ``instruction``(+``input``)+``response``/``output``,
    or ``messages`` ending with an assistant turn; TRL's conversational prompt/completion lists too."""
    return _load(path, _parse_sft, on_error=on_error, validate=validate, split=split)


def load_preferences(
    path: PathLike, *, on_error: OnError = "raise", validate: Validator | None = None, split: str | None = None
) -> LoadResult[PreferenceExample]:
    """Load comparisons: ``prompt``+``chosen``+``rejected`` (strings or TRL conversational lists), optional
    ``margin`` and ``annotator``; or, with no ``prompt``, two full conversations sharing their prefix."""
    return _load(path, _parse_preference, on_error=on_error, validate=validate, split=split)


def load_prompts(
    path: PathLike, *, on_error: OnError = "raise", validate: Validator | None = None, split: str | None = None
) -> LoadResult[PromptExample]:
    """Load RL prompts: ``prompt`` (string or messages), ``query``, or ``messages`` ending with a user turn."""
    return _load(path, _parse_prompt, on_error=on_error, validate=validate, split=split)


def _load(
    path: PathLike,
    parse: Callable[[dict, str], T],
    *,
    on_error: OnError,
    validate: Validator | None,
    split: str | None,
) -> LoadResult[T]:
    """Parse every row with ``parse``; on a bad row raise, or drop it and remember why."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip' (got {on_error!r})")
    examples: list[T] = []
    skipped: list[str] = []
    for location, record in _iter_rows(path, split):
        try:
            examples.append(_parse_row(path, location, record, parse, validate))
        except DataError as err:
            if on_error == "raise":
                raise
            skipped.append(str(err))
    _check_any_valid(path, examples, skipped)
    return LoadResult(examples=examples, skipped=skipped, path=str(path))


def _parse_row(
    path: PathLike,
    location: str,
    record: dict | DataError,
    parse: Callable[[dict, str], T],
    validate: Validator | None,
) -> T:
    if isinstance(record, DataError):
        raise record
    try:
        example = parse(record, location)
    except _FieldError as e:
        raise DataError(e.reason, path=path, location=location, field=e.field) from None
    problem = validate(example) if validate is not None else None
    if problem:
        field, reason = problem if isinstance(problem, tuple) else ("sample", problem)
        raise DataError(reason, path=path, location=location, field=field)
    return example


def _check_any_valid(path: PathLike, examples: list, skipped: list[str]) -> None:
    """An empty result is never what the caller wanted: fail loudly; otherwise log what was dropped."""
    first = "; ".join(skipped[:_REASONS_LOGGED])
    if not examples:
        detail = f"; first reasons: {first}" if skipped else ": it has no rows"
        raise DataError(f"no valid rows in {path}{detail}", path=path)
    if skipped:
        total = len(examples) + len(skipped)
        logger.warning("skipped %d of %d rows in %s; first reasons: %s", len(skipped), total, path, first)


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def write_jsonl_atomic(path: PathLike, records: Iterable[dict]) -> int:
    """Write records as JSON Lines so that readers only ever see the old file or the complete new one.

    The lines go to a temporary file in the same directory (same filesystem, so the final
    ``os.replace`` is atomic); if writing fails midway the temporary file is removed and any existing
    file is left untouched. Parent directories are created. Returns the number of records written.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    count = 0
    try:
        # os.open with 0o666 lets the umask decide permissions, as a plain open() of the target would.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


def to_record(example: Example) -> dict:
    """The example as a row in TRL's column layout, so validated data can be written back out.

    A prompt that is a single user turn becomes a plain string column; anything richer keeps its
    messages (``messages`` for SFT, conversational ``prompt``/``chosen``/``rejected`` for preferences).
    Extra columns follow the canonical ones and never override them.
    """
    single = len(example.prompt) == 1 and example.prompt[0]["role"] == "user"
    prompt: str | list[Message] = example.prompt[0]["content"] if single else [dict(m) for m in example.prompt]
    if isinstance(example, SFTExample):
        if single:
            record: dict = {"prompt": prompt, "completion": example.completion}
        else:
            record = {"messages": [*prompt, {"role": "assistant", "content": example.completion}]}
    elif isinstance(example, PreferenceExample):
        record = {
            "prompt": prompt,
            "chosen": _as_reply(example.chosen, single),
            "rejected": _as_reply(example.rejected, single),
        }
        optional = {"margin": example.margin, "annotator": example.annotator}
        record.update({k: v for k, v in optional.items() if v is not None})
    elif isinstance(example, PromptExample):
        record = {"prompt": prompt}
    else:
        kind = type(example).__name__
        raise TypeError(f"to_record expects an SFTExample, PreferenceExample or PromptExample (got {kind})")
    for key, value in example.extra.items():
        record.setdefault(key, value)
    return record


def _as_reply(text: str, plain: bool) -> str | list[Message]:
    return text if plain else [{"role": "assistant", "content": text}]
