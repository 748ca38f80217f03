"""Progress bars for long work (rich), quiet when disabled or off the main process."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None):
        self._progress, self._task = progress, task

    def update(self, advance: int = 1, **fields: float) -> None:
        if self._progress is None:
            return
        text = "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        self._progress.update(self._task, advance=advance, info=text)


@contextlib.contextmanager
def progress_bar(desc: str, total: int, *, enabled: bool = True) -> Iterator[_Bar]:
    """A bar with count, elapsed and remaining time and a free-text field (loss, tokens/s)."""
    if not enabled:
        yield _Bar(None, None)
        return
    progress = Progress(
        TextColumn("[bold]{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        transient=False,
    )
    with progress:
        task = progress.add_task(desc, total=total, info="")
        yield _Bar(progress, task)
