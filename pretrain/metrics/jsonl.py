"""metrics.jsonl: every record as one strict JSON object a line, for reading a run afterwards.

Written by rank 0 only (the values are already reduced over ranks). JSON has no NaN or Infinity,
so a non-finite float is written as null (the key stays).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from pretrain.metrics import names
from pretrain.metrics.base import Exporter

METRICS_FILE = "metrics.jsonl"
WRITTEN_KINDS = (names.TRAIN, names.EVAL, names.CHECKPOINT)
"""Bad-sample counts are not lines of their own: the processor adds the totals to each train record."""


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlExporter(Exporter):
    """Appends `{"kind", "step", "time", **values}` to `<run_dir>/metrics.jsonl`, line-buffered."""

    def __init__(self, run_dir: str | os.PathLike):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self._file = open(Path(run_dir) / METRICS_FILE, "a", encoding="utf-8", buffering=1)

    def log(self, step: int, values: Mapping[str, Any], *, kind: str = "train", timestamp: float = 0.0) -> None:
        if kind not in WRITTEN_KINDS or self._file is None:
            return
        record = {"kind": kind, "step": step, "time": round(timestamp, 3), **values}
        self._file.write(json.dumps({k: _finite_or_none(v) for k, v in record.items()}, allow_nan=False) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_jsonl(run_dir: str | os.PathLike, kind: str | None = "train") -> list[dict[str, Any]]:
    """The records of `<run>/metrics.jsonl` (of one `kind`: train | eval | checkpoint; None: all)."""
    path = Path(run_dir) / METRICS_FILE
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]
