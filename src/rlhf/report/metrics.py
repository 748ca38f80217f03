"""Metrics to a JSONL file in the run folder, and to TensorBoard when it is installed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Append one JSON object per call to ``OUT/metrics.jsonl`` (flushed, so a crash keeps what was logged)."""

    def __init__(self, out_dir: str | Path, *, tensorboard: bool = True, enabled: bool = True, purge_step: int | None = None):
        """``purge_step``: a resumed run's first step; TensorBoard then drops what an earlier attempt logged from
        that step on (metrics.jsonl is truncated by the caller)."""
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=purge_step)
            except ImportError:  # tensorboard is optional
                self._tb = None

    def log(self, step: int, **metrics: Any) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
