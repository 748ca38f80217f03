"""Tests for rlhf.data.io: every accepted shape and format loads, and every bad row is located exactly."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import pickle
from pathlib import Path

import pytest

from rlhf.data.io import (
    DataError,
    LoadResult,
    PreferenceExample,
    PromptExample,
    SFTExample,
    load_preferences,
    load_prompts,
    load_records,
    load_sft,
    read_jsonl,
    to_record,
    write_jsonl_atomic,
)

USER = {"role": "user", "content": "What is 2+3?"}
SYSTEM = {"role": "system", "content": "Be brief."}
ANSWER = "5"


def write_lines(path: Path, rows: list) -> Path:
    """Write rows as JSON Lines; a str row is written verbatim (for malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def one(loader, tmp_path: Path, row: dict):
    return loader(write_lines(tmp_path / "data.jsonl", [row]))[0]


def error_for(loader, tmp_path: Path, rows: list) -> DataError:
    path = write_lines(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        loader(path)
    return info.value


# ---------------------------------------------------------------- accepted shapes -> one canonical form

SFT_SHAPES = {
    "prompt-completion": {"prompt": "What is 2+3?", "completion": "5"},
    "instruction-response": {"instruction": "What is 2+3?", "response": "5"},
    "instruction-output": {"instruction": "What is 2+3?", "output": "5", "input": ""},
    "messages": {"messages": [USER, {"role": "assistant", "content": "5"}]},
    "trl-conversational": {"prompt": [USER], "completion": [{"role": "assistant", "content": "5"}]},
}


@pytest.mark.parametrize("shape", SFT_SHAPES)
def test_every_sft_shape_loads_to_the_same_example(tmp_path, shape):
    example = one(load_sft, tmp_path, {**SFT_SHAPES[shape], "family": "arithmetic"})
    assert example.prompt == [USER]
    assert example.completion == ANSWER
    assert example.extra == {"family": "arithmetic"}
    assert example.source == f"{tmp_path / 'data.jsonl'}:1"


def test_alpaca_input_is_appended_after_a_blank_line(tmp_path):
    example = one(load_sft, tmp_path, {"instruction": "Add these.", "input": "2 and 3", "output": "5"})
    assert example.prompt == [{"role": "user", "content": "Add these.\n\n2 and 3"}]


def test_multi_turn_messages_keep_system_and_history_in_the_prompt(tmp_path):
    turns = [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, USER]
    example = one(load_sft, tmp_path, {"messages": [*turns, {"role": "assistant", "content": "5"}]})
    assert example.prompt == turns
    assert example.completion == "5"


PREFERENCE_SHAPES = {
    "strings": {"prompt": "What is 2+3?", "chosen": "5", "rejected": "6"},
    "conversational": {
        "prompt": [USER],
        "chosen": [{"role": "assistant", "content": "5"}],
        "rejected": [{"role": "assistant", "content": "6"}],
    },
    "implicit-prompt": {
        "chosen": [USER, {"role": "assistant", "content": "5"}],
        "rejected": [USER, {"role": "assistant", "content": "6"}],
    },
}


@pytest.mark.parametrize("shape", PREFERENCE_SHAPES)
def test_every_preference_shape_loads_to_the_same_example(tmp_path, shape):
    example = one(load_preferences, tmp_path, {**PREFERENCE_SHAPES[shape], "gold_chosen": 1.0})
    assert (example.prompt, example.chosen, example.rejected) == ([USER], "5", "6")
    assert example.margin is None and example.annotator is None
    assert example.extra == {"gold_chosen": 1.0}


def test_margin_and_annotator_are_read(tmp_path):
    row = {**PREFERENCE_SHAPES["strings"], "margin": 2, "annotator": "ann-3"}
    example = one(load_preferences, tmp_path, row)
    assert example.margin == 2.0 and isinstance(example.margin, float)
    assert example.annotator == "ann-3"


def test_implicit_prompt_form_extracts_the_shared_multi_turn_prefix(tmp_path):
    prefix = [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, USER]
    row = {
        "chosen": [*prefix, {"role": "assistant", "content": "5"}],
        "rejected": [*prefix, {"role": "assistant", "content": "It is 6."}],
    }
    example = one(load_preferences, tmp_path, row)
    assert example.prompt == prefix
    assert (example.chosen, example.rejected) == ("5", "It is 6.")


def test_implicit_prompt_form_rejects_conversations_that_differ_before_the_last_turn(tmp_path):
    other = {"role": "user", "content": "What is 2+4?"}
    row = {
        "chosen": [USER, {"role": "assistant", "content": "5"}],
        "rejected": [other, {"role": "assistant", "content": "6"}],
    }
    err = error_for(load_preferences, tmp_path, [row])
    assert err.location.endswith("bad.jsonl:1")
    assert err.field == "rejected[0]"
    assert "differ at message 0" in str(err)


PROMPT_SHAPES = {
    "prompt-string": {"prompt": "What is 2+3?"},
    "prompt-messages": {"prompt": [USER]},
    "query": {"query": "What is 2+3?"},
    "messages": {"messages": [USER]},
}


@pytest.mark.parametrize("shape", PROMPT_SHAPES)
def test_every_prompt_shape_loads_to_the_same_example(tmp_path, shape):
    example = one(load_prompts, tmp_path, {**PROMPT_SHAPES[shape], "split": "eval"})
    assert example == PromptExample(prompt=[USER], source=f"{tmp_path / 'data.jsonl'}:1", extra={"split": "eval"})


# ---------------------------------------------------------------- file formats

ROWS = [
    {"prompt": "What is 2+3?", "completion": "5", "family": "arithmetic"},
    {"prompt": "Capital of France?", "completion": "Paris.", "family": "capitals"},
]


def _save_csv(path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(ROWS[0]))
        writer.writeheader()
        writer.writerows(ROWS)


def _save_parquet(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), path)


def _save_dataset(path: Path) -> None:
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(path))


FORMATS = {
    "data.jsonl": (lambda p: write_lines(p, ROWS), ["{p}:1", "{p}:2"]),
    "data.json": (lambda p: p.write_text(json.dumps(ROWS, indent=2)), ["{p} item 1", "{p} item 2"]),
    "data.csv": (_save_csv, ["{p}:2", "{p}:3"]),  # the header is line 1
    "data.parquet": (_save_parquet, ["{p} row 1", "{p} row 2"]),
    "saved_dataset": (_save_dataset, ["{p} row 1", "{p} row 2"]),
}


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_loads_the_same_examples_with_its_own_locations(tmp_path, name):
    save, locations = FORMATS[name]
    path = tmp_path / name
    save(path)
    result = load_sft(path)
    assert isinstance(result, LoadResult) and len(result) == 2 and result.skipped == []
    assert [(e.prompt[0]["content"], e.completion, e.extra) for e in result] == [
        (r["prompt"], r["completion"], {"family": r["family"]}) for r in ROWS
    ]
    assert [e.source for e in result] == [loc.format(p=path) for loc in locations]


def test_dataset_dict_uses_train_unless_a_split_is_named(tmp_path):
    import datasets

    splits = {"train": datasets.Dataset.from_list(ROWS[:1]), "test": datasets.Dataset.from_list(ROWS[1:])}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    assert load_sft(tmp_path / "dd")[0].completion == "5"
    assert load_sft(tmp_path / "dd", split="test")[0].completion == "Paris."
    with pytest.raises(DataError, match="no split 'validation'.*train, test"):
        load_sft(tmp_path / "dd", split="validation")


def test_parquet_rows_of_mixed_shapes_ignore_null_columns(tmp_path):
    """Parquet gives every row every column, filling the absent ones with null."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {
        "prompt": ["What is 2+3?", None],
        "completion": ["5", None],
        "messages": [None, [USER, {"role": "assistant", "content": "5"}]],
    }
    pq.write_table(pa.Table.from_pydict(columns), tmp_path / "mixed.parquet")
    result = load_sft(tmp_path / "mixed.parquet")
    assert [(e.prompt, e.completion, e.extra) for e in result] == [([USER], "5", {})] * 2


def test_json_file_that_is_not_an_array_is_read_as_json_lines(tmp_path):
    path = write_lines(tmp_path / "data.json", ROWS)
    assert [e.source for e in load_sft(path)] == [f"{path}:1", f"{path}:2"]


def test_csv_margin_cells_are_numbers_and_empty_cells_are_absent(tmp_path):
    path = tmp_path / "prefs.csv"
    path.write_text("prompt,chosen,rejected,margin,annotator\nQ?,yes,no,1.5,ann\nQ2?,yes,no,,\n", encoding="utf-8")
    first, second = load_preferences(path)
    assert (first.margin, first.annotator) == (1.5, "ann")
    assert (second.margin, second.annotator) == (None, None)


def test_load_records_yields_locations_and_raw_records(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [ROWS[0], "", ROWS[1]])  # blank line 2 is skipped
    assert list(load_records(path)) == [(f"{path}:1", ROWS[0]), (f"{path}:3", ROWS[1])]


def test_unknown_extension_lists_the_supported_formats(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'.*\.jsonl.*\.parquet.*save_to_disk"):
        load_sft(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="no such file or directory: .*nope.jsonl"):
        load_sft(tmp_path / "nope.jsonl")


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no valid rows in .*empty.jsonl"):
        load_sft(tmp_path / "empty.jsonl")


# ---------------------------------------------------------------- bad rows: file, line and field named

GOOD_SFT = {"prompt": "What is 2+3?", "completion": "5"}
GOOD_PREF = {"prompt": "What is 2+3?", "chosen": "5", "rejected": "6"}

BAD_ROWS = {
    # name: (loader, bad row, expected field, text the message must contain)
    "missing field": (
        load_sft,
        {"question": "Q?", "answer": "A"},
        None,
        "missing field: expected 'prompt'+'completion', 'instruction'+'response' or 'messages'"
        " (found columns: 'question', 'answer')",
    ),
    "empty response": (load_sft, {"instruction": "Q?", "response": ""}, "response", "non-empty string (got '')"),
    "whitespace completion": (load_sft, {**GOOD_SFT, "completion": "  \n"}, "completion", "non-empty string"),
    "completion is a number": (load_sft, {**GOOD_SFT, "completion": 5}, "completion", "(got number 5)"),
    "unknown role": (
        load_sft,
        {"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        "messages[0].role",
        "unknown role 'human'",
    ),
    "message without content": (
        load_sft,
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "Hello"}]},
        "messages[0]",
        "missing 'content'",
    ),
    "roles out of order": (
        load_sft,
        {"messages": [USER, USER, {"role": "assistant", "content": "5"}]},
        "messages[1].role",
        "expected 'assistant' after 'user' (got 'user')",
    ),
    "conversation ends with user": (load_sft, {"messages": [USER]}, "messages", "must end with an assistant turn (got 'user' last)"),
    "margin not numeric": (load_preferences, {**GOOD_PREF, "margin": "big"}, "margin", "finite number (got 'big')"),
    "margin not finite": (load_preferences, {**GOOD_PREF, "margin": math.inf}, "margin", "finite number"),
    "chosen equals rejected": (load_preferences, {**GOOD_PREF, "rejected": "5"}, "rejected", "identical to 'chosen'"),
    "prompt is an object": (load_prompts, {"prompt": {"text": "Q"}}, "prompt", "(got object with keys 'text')"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_rows_name_file_line_and_field(tmp_path, case):
    loader, bad, field, text = BAD_ROWS[case]
    good = {load_sft: GOOD_SFT, load_preferences: GOOD_PREF, load_prompts: {"prompt": "Q?"}}[loader]
    err = error_for(loader, tmp_path, [good, good, bad])
    path = str(tmp_path / "bad.jsonl")
    assert (err.path, err.location, err.field) == (path, f"{path}:3", field)
    assert str(err).startswith(f"{path}:3: " + (f"field '{field}': " if field else ""))
    assert text in str(err)


def test_malformed_json_line_names_file_and_line(tmp_path):
    err = error_for(load_sft, tmp_path, [GOOD_SFT, GOOD_SFT, '{"prompt": "Q?", "completion": '])
    assert "bad.jsonl:3: invalid JSON" in str(err)


def test_a_line_that_is_not_an_object_is_an_error(tmp_path):
    err = error_for(load_sft, tmp_path, [GOOD_SFT, "[1, 2]"])
    assert "bad.jsonl:2: expected a JSON object per row (got list of 2 items)" in str(err)


def test_csv_errors_use_file_line_numbers(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('prompt,completion\nQ?,A\n"multi\nline",ok\nQ3?,\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"data\.csv:5: field 'completion': must be a non-empty string") as info:
        load_sft(path)
    assert info.value.field == "completion"


def test_parquet_errors_name_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([GOOD_SFT, {**GOOD_SFT, "completion": " "}]), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d\.parquet row 2: field 'completion'"):
        load_sft(tmp_path / "d.parquet")


def test_data_error_survives_pickling(tmp_path):
    err = error_for(load_sft, tmp_path, [{**GOOD_SFT, "completion": ""}])
    copy = pickle.loads(pickle.dumps(err))
    assert (str(copy), copy.location, copy.field, copy.reason) == (str(err), err.location, err.field, err.reason)


# ---------------------------------------------------------------- error policy and validate hook


def test_skip_keeps_good_rows_and_logs_the_first_reasons(tmp_path, caplog):
    bad = [{**GOOD_SFT, "completion": ""}, "not json", {"prompt": 3, "completion": "x"}]
    path = write_lines(tmp_path / "mixed.jsonl", [GOOD_SFT, *bad, GOOD_SFT])
    with caplog.at_level(logging.WARNING, logger="rlhf.data"):
        result = load_sft(path, on_error="skip")
    assert [e.source for e in result] == [f"{path}:1", f"{path}:5"]
    assert len(result.skipped) == 3
    assert result.skipped[0] == f"{path}:2: field 'completion': must be a non-empty string (got '')"
    assert result.skipped[1].startswith(f"{path}:3: invalid JSON")
    assert result.skipped[2].startswith(f"{path}:4: field 'prompt'")
    [record] = [r for r in caplog.records if r.name == "rlhf.data"]
    message = record.getMessage()
    assert message.startswith(f"skipped 3 of 5 rows in {path}; first reasons: ")
    assert result.skipped[0] in message and result.skipped[2] in message


def test_skip_logs_at_most_five_reasons(tmp_path, caplog):
    bad = [{**GOOD_SFT, "completion": f"{' ' * i}"} for i in range(7)]
    path = write_lines(tmp_path / "many.jsonl", [*bad, GOOD_SFT])
    with caplog.at_level(logging.WARNING, logger="rlhf.data"):
        result = load_sft(path, on_error="skip")
    assert len(result) == 1 and len(result.skipped) == 7
    message = caplog.records[-1].getMessage()
    assert f"{path}:5:" in message and f"{path}:6:" not in message


def test_skip_with_no_valid_rows_raises(tmp_path):
    path = write_lines(tmp_path / "allbad.jsonl", [{"x": 1}, {"y": 2}])
    with pytest.raises(DataError, match="no valid rows in .*allbad.jsonl; first reasons: .*allbad.jsonl:1: missing"):
        load_sft(path, on_error="skip")


def test_unknown_on_error_value_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="on_error"):
        load_sft(write_lines(tmp_path / "d.jsonl", [GOOD_SFT]), on_error="ignore")


def too_long(example: SFTExample) -> str | None:
    tokens = len(example.completion.split())
    return f"sample is {tokens} tokens, longer than max_length 3" if tokens > 3 else None


def test_validate_hook_errors_carry_the_location(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD_SFT, {**GOOD_SFT, "completion": "one two three four"}])
    with pytest.raises(DataError) as info:
        load_sft(path, validate=too_long)
    assert str(info.value) == f"{path}:2: field 'sample': sample is 4 tokens, longer than max_length 3"
    result = load_sft(path, validate=too_long, on_error="skip")
    assert len(result) == 1 and result.skipped == [str(info.value)]


# ---------------------------------------------------------------- writing


def test_write_jsonl_atomic_round_trips_and_creates_parent_dirs(tmp_path):
    path = tmp_path / "a" / "b" / "out.jsonl"
    assert write_jsonl_atomic(path, iter(ROWS)) == 2
    assert read_jsonl(path) == ROWS
    assert os.listdir(path.parent) == ["out.jsonl"]


def test_write_jsonl_atomic_leaves_the_previous_file_intact_on_failure(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl_atomic(path, ROWS)
    before = path.read_bytes()

    def failing():
        yield {"prompt": "new", "completion": "row"}
        raise RuntimeError("generator broke")

    with pytest.raises(RuntimeError, match="generator broke"):
        write_jsonl_atomic(path, failing())
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.jsonl"]  # no temporary file left behind


def test_read_jsonl_is_strict(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"a": 1}, "oops"])
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        read_jsonl(path)


@pytest.mark.parametrize(
    "loader, row",
    [
        (load_sft, {"prompt": "Q?", "completion": "A", "family": "f"}),
        (load_sft, {"messages": [SYSTEM, USER, {"role": "assistant", "content": "5"}]}),
        (load_preferences, {**GOOD_PREF, "margin": 1.5, "annotator": "a1", "gold": [0.1, 0.9]}),
        (load_preferences, {**PREFERENCE_SHAPES["conversational"], "prompt": [SYSTEM, USER]}),
        (load_prompts, {"prompt": "Q?", "family": "f"}),
        (load_prompts, {"prompt": [SYSTEM, USER]}),
    ],
)
def test_to_record_writes_rows_that_load_back_to_the_same_example(tmp_path, loader, row):
    first = one(loader, tmp_path, row)
    path = tmp_path / "again.jsonl"
    write_jsonl_atomic(path, [to_record(first)])
    again = loader(path)[0]
    assert again == type(first)(**{**first.__dict__, "source": again.source})


def test_to_record_uses_trl_columns(tmp_path):
    assert to_record(SFTExample([USER], "5")) == {"prompt": "What is 2+3?", "completion": "5"}
    pref = PreferenceExample([SYSTEM, USER], "5", "6", margin=1.0)
    assert to_record(pref) == {
        "prompt": [SYSTEM, USER],
        "chosen": [{"role": "assistant", "content": "5"}],
        "rejected": [{"role": "assistant", "content": "6"}],
        "margin": 1.0,
    }


def test_text_no_tokenizer_can_encode_is_a_bad_row_that_skip_skips(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "ok", "completion": "fine"}\n{"prompt": "bad \\ud800", "completion": "x"}\n')
    with pytest.raises(DataError, match=r"s\.jsonl:2: field 'prompt': holds a lone surrogate"):
        load_sft(path)
    result = load_sft(path, on_error="skip")
    assert len(result) == 1 and "s.jsonl:2" in result.skipped[0]


def test_json_and_csv_errors_name_the_file_and_line(tmp_path):
    array = tmp_path / "a.json"
    array.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a", "completion": }\n]\n')
    with pytest.raises(DataError, match=r"a\.json:3: invalid JSON: Expecting value \(column 33\)"):
        load_sft(array)
    latin = tmp_path / "l.csv"
    latin.write_bytes(b"prompt,completion\nok,fine\n\"caf\xe9\",x\n")
    with pytest.raises(DataError, match=r"l\.csv:3: not valid UTF-8"):
        load_sft(latin)
    nul = tmp_path / "n.csv"
    nul.write_text('prompt,completion\n"unclosed,x\n')
    with pytest.raises(DataError, match=r"n\.csv:"):
        load_sft(nul)
