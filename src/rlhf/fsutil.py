"""Atomic writes: a stage's output either exists whole or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out`` by rename, on error it is removed.

    A crash mid-write never leaves a half-written model folder where a finished one is expected, and
    an earlier finished folder survives until the new one is complete.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write text to a temp file in the same folder, then rename over ``path``.

    A reader (a browser on report.html, a resumed pipeline on summary.json) sees the old file or the
    new one, never a half-written one; the temp file is removed if writing fails. mkstemp makes the
    file owner-only (0600); it gets the 0644 of a file written plainly, so a report can be shared.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to a temp file in the same folder, then rename over ``path``."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def stage_done(out: str | Path) -> dict | None:
    """The summary of a finished stage folder (its stage.json), or None when it has not finished."""
    p = Path(out) / "stage.json"
    return json.loads(p.read_text()) if p.is_file() else None
