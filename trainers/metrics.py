"""Per-step metrics: appended to a JSONL file, optionally to TensorBoard, and handed to a callback (the
CLI's rich progress bar).

    log = MetricsLog(path="runs/x/metrics.jsonl", tensorboard_dir=None, on_step=print)
    log.write(step=1, loss=2.3, lr=1e-3)

TensorBoard is on when `tensorboard_dir` is given or FLASHOPS_TENSORBOARD names a directory.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable


class MetricsLog:
    def __init__(self, path: str | Path | None, tensorboard_dir: str | Path | None = None,
                 on_step: Callable[[dict], None] | None = None, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(path) if path and enabled else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.on_step = on_step
        self.history: list[dict] = []
        self._tb = None
        tb_dir = tensorboard_dir or os.environ.get("FLASHOPS_TENSORBOARD")
        if tb_dir and enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(tb_dir))

    def write(self, step: int, **metrics) -> dict:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.history.append(row)
        if not self.enabled:
            return row
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self.on_step:
            self.on_step(row)
        return row

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return round(v, 8) if math.isfinite(v) else v
    return v
