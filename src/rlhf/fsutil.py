"""Output folders and files: atomic writes, and the rule that keeps a user's files safe.

A stage's output either exists whole or not at all (``atomic_dir``, ``write_text_atomic``), and a
stage never writes over something that is not its own (``check_out``): an ``--out`` that does not
exist is created; one that holds this stage's own finished output is replaced only with
``--overwrite`` (or resumed, where the stage can resume); anything else (a folder of other files, a
file where a folder is wanted, a folder that holds one of the run's inputs) is refused before any
work starts, with a message that names it.

Temporary names carry the writer's process id (``.NAME.tmp-PID-XXXX``), so a run killed mid-write
leaves nothing that the next write of the same output does not clean up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from rlhf.configlib import ConfigError

STAGE_FILE = "stage.json"
MARKER = ".rlhf-stage.json"  # written first by stages that fill their folder in place (PPO)
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def clean_stale(out: str | Path) -> list[Path]:
    """Remove what killed writers of ``out`` left beside it (``.NAME.tmp-PID-*``, ``.NAME.old-PID-*`` whose
    process is gone); returns what was removed. Names from writers that are still running are kept."""
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        m = _TEMP.match(p.name)
        if not m or m["name"] != out.name or _pid_alive(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):  # another run cleaning the same leftovers
            remove_output(p)
        removed.append(p)
    return removed


def _temp_prefix(path: Path, kind: str) -> str:
    return f".{path.name}.{kind}-{os.getpid()}-"


@contextlib.contextmanager
def main_process_dir(out: str | Path) -> Iterator[Path]:
    """``atomic_dir(out)`` on the main process; on the others a scratch folder that is thrown away. A stage's code
    then reads the same under several processes, and only the main process writes ``out``. Every process waits
    at the end until ``out`` is in place, so the next stage of any process can read it."""
    from rlhf import distributed

    if distributed.is_main():
        with atomic_dir(out) as tmp:
            yield tmp
    else:
        with tempfile.TemporaryDirectory(prefix="rlhf-rank-") as tmp:
            yield Path(tmp)
    distributed.barrier()


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out`` by rename, on error it is removed.

    A crash mid-write never leaves a half-written model folder where a finished one is expected, and
    an earlier finished folder survives until the new one is complete. Callers decide beforehand
    (``check_out``) whether ``out`` may be replaced. The folder gets the user's usual permissions
    (mkdtemp would make it owner-only).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "tmp"), dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f"{_temp_prefix(out, 'old')}0")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        with contextlib.suppress(OSError):  # the new output is in place; a leftover is cleaned next time
            remove_output(old)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write text to a temp file in the same folder, then rename over ``path``.

    A reader (a browser on report.html, a resumed pipeline on summary.json) sees the old file or the
    new one, never a half-written one; the temp file is removed if writing fails. mkstemp makes the
    file owner-only (0600); it gets the permissions of a file written plainly (0666 less the umask),
    so a report can be shared.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path, "tmp"), dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to a temp file in the same folder, then rename over ``path``."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    """A JSON file's content, or None when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def stage_done(out: str | Path, stage: str | None = None) -> dict | None:
    """The summary of a finished stage folder (its stage.json), or None when it has not finished
    (or, with ``stage``, holds another stage's output)."""
    summary = read_json(Path(out) / STAGE_FILE) if Path(out).is_dir() else None
    if not isinstance(summary, dict) or (stage is not None and summary.get("stage") != stage):
        return None
    return summary


def mark_stage(out: str | Path, stage: str) -> None:
    """Claim a folder that a stage fills in place, so that a run killed before it finished is still known
    as this stage's own (and can be resumed or replaced) rather than as someone else's folder."""
    write_json_atomic(Path(out) / MARKER, {"stage": stage})


def marked(out: str | Path, stage: str) -> bool:
    """The folder was claimed by ``stage`` (mark_stage)."""
    marker = read_json(Path(out) / MARKER)
    return isinstance(marker, dict) and marker.get("stage") == stage


def json_with_keys(*keys: str) -> Callable[[Path], Literal["finished"] | None]:
    """A ``state`` for check_out: a JSON object file with these keys is the stage's own earlier output."""

    def state(path: Path) -> Literal["finished"] | None:
        data = read_json(path) if path.is_file() else None
        return "finished" if isinstance(data, dict) and all(k in data for k in keys) else None

    return state


def holding(name: str) -> Callable[[Path], Literal["finished"] | None]:
    """A ``state`` for check_out: a folder with the file ``name`` (say world.json) is the stage's own output."""
    return lambda path: "finished" if (path / name).is_file() else None


OutAction = Literal["new", "replace", "resume"]
OutState = Literal["finished", "resumable", "partial"]


def _describe(path: Path) -> str:
    entries = sorted(p.name for p in path.iterdir())
    shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
    return f"it holds {shown}"


def check_out(
    out: str | Path,
    *,
    stage: str,
    kind: Literal["dir", "file"],
    inputs: Mapping[str, str | Path | None] = {},
    state: Callable[[Path], OutState | None] | None = None,
    overwrite: bool = False,
    resume: bool | None = None,
    flag: str = "--out",
) -> OutAction:
    """Decide, before any work, what writing ``out`` may do: "new", "replace" or "resume"; else ConfigError.

    ``inputs`` maps each setting name to a path the run reads: ``out`` may be none of them and hold
    none of them, even with overwrite. ``state(out)`` tells this stage's own output apart from anything
    else (by default: a folder whose stage.json names ``stage`` is "finished"): "finished" is replaced
    only with ``overwrite`` (or continued with ``resume``); "resumable", an unfinished run with
    checkpoints, needs ``resume`` or ``overwrite``; "partial", a run of this stage killed before it saved
    anything to continue from, is started again; None (not ours) is refused. ``resume`` is None for stages
    that cannot resume.
    """
    path = Path(out)
    target = path.resolve()
    for name, value in inputs.items():
        if not value:
            continue
        src = Path(value).resolve()
        if src == target or target in src.parents:
            what = "is" if src == target else "contains"
            raise ConfigError(f"{stage}: {flag} {path} {what} the run's input {name}={value}; writing there would "
                              "destroy it. Choose another output path")
    if not path.exists() and not path.is_symlink():
        return "new"
    if kind == "dir" and not path.is_dir():
        raise ConfigError(f"{stage}: {flag} {path} is an existing file, not a folder; nothing was changed. Choose a "
                          "folder path")
    if kind == "file" and path.is_dir():
        raise ConfigError(f"{stage}: {flag} {path} is a folder; give the path of a file to write")
    if kind == "dir" and not any(path.iterdir()):
        return "new"
    found = (state or (lambda p: "finished" if stage_done(p, stage) is not None else None))(path)
    if found == "partial" or (found and overwrite):
        return "replace"
    if found and resume:
        return "resume"
    if found == "resumable":
        raise ConfigError(f"{stage}: {flag} {path} holds an unfinished {stage} run; pass --resume to continue it, or "
                          "--overwrite to start again")
    if found == "finished":
        more = ", --resume to continue it from its last checkpoint" if resume is not None else ""
        what = f"already holds a finished {stage} output" if kind == "dir" else f"already exists (an earlier {stage} output)"
        raise ConfigError(f"{stage}: {flag} {path} {what}; pass --overwrite to replace it{more}, or choose another path")
    what = f"a folder that is not a {stage} output ({_describe(path)})" if kind == "dir" else \
        "an existing file that this command did not write"
    raise ConfigError(f"{stage}: {flag} {path} is {what}; nothing was changed. Choose a new path")


def fingerprint(path: str | Path, *, whole_below: int = 64 << 20, sample: int = 1 << 16) -> str:
    """A digest of a file's or folder's content, cheap enough for model folders of many GB: files below
    ``whole_below`` bytes are hashed whole, larger ones by size and their first and last ``sample`` bytes
    (training changes every weight, so a different model differs there). Sizes and the names inside a
    folder count; dates and the path itself do not, so a copy matches its original."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    for f in files:
        if f.name.startswith("."):  # our own markers and temporary files
            continue
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if path.is_dir() else ''}:{size}\n".encode())
        with open(f, "rb") as fh:
            if size <= whole_below:
                h.update(fh.read())
            else:
                h.update(fh.read(sample))
                fh.seek(size - sample)
                h.update(fh.read(sample))
    return h.hexdigest()


def remove_output(path: str | Path) -> None:
    """Delete a folder or file: a previous output of the stage (after check_out said "replace"), or what a
    writer left behind; a link is removed, never what it points to."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
