"""The loop's own configuration sections: `train` (length, batch geometry, clipping, seeding, limits)
and `run` (the run directory and its label).

They live apart from the loop (pretrain.train) so that the schema (pretrain.config) can assemble them
without importing the loop, and the loop can read its configuration without importing the schema.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from data_tools.errors import check


@dataclasses.dataclass
class TrainConfig:
    """Length of the run, batch geometry, clipping, seeding and the loop's own limits."""

    steps: int = 0
    """Optimizer steps; 0 = derived from `epochs`."""
    epochs: int = 1
    """Used when `steps` is 0: that many passes over the data."""
    global_batch_size: int = 0
    """Samples per optimizer step over all ranks; 0 = data.batch_size x world size x grad_accumulation.
    Kept fixed on an elastic resume: the per-rank batch or the accumulation adapts."""
    grad_accumulation: int = 1
    """Micro-batches per optimizer step on every rank."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    seed: int = 0
    """Initial weights and per-rank dropout/sampling streams (the data order has data.seed)."""
    log_every: int = 10
    """Steps between progress lines and metric records."""
    max_nonfinite_steps: int = 5
    """Stop (exit code NONFINITE, last good state saved) after this many non-finite steps in a row."""
    record_keys: bool = False
    """Append every consumed sample key to <run>/keys/rank<r>.txt ("epoch step key" lines): an audit of
    exactly-once data order across resumes."""
    lost_rank_timeout_s: float = 300.0
    """A rank that stops answering for this long makes the others exit naming it (watchdog)."""

    def __post_init__(self) -> None:
        check("train.steps", self.steps, self.steps >= 0, "an integer >= 0 (0 = use train.epochs)")
        check("train.epochs", self.epochs, self.epochs >= 1, "an integer >= 1")
        check("train.global_batch_size", self.global_batch_size, self.global_batch_size >= 0, "an integer >= 0")
        check("train.grad_accumulation", self.grad_accumulation, self.grad_accumulation >= 1, "an integer >= 1")
        check("train.grad_clip", self.grad_clip, self.grad_clip >= 0, "a norm >= 0 (0 = off)")
        check("train.log_every", self.log_every, self.log_every >= 1, "an integer >= 1")
        check("train.max_nonfinite_steps", self.max_nonfinite_steps, self.max_nonfinite_steps >= 1, "an integer >= 1")
        check("train.lost_rank_timeout_s", self.lost_rank_timeout_s, self.lost_rank_timeout_s > 0, "seconds > 0")


@dataclasses.dataclass
class RunConfig:
    """The run directory (config.yaml, checkpoints/, metrics.jsonl, eval/) and the run's label."""

    dir: str = "runs/run"
    """The run directory itself; `--resume auto` looks for checkpoints in it."""
    name: str = ""
    """Label of the run in metrics (`run` label); empty = the directory's name."""

    def __post_init__(self) -> None:
        check("run.dir", self.dir, bool(self.dir), "a directory path")
        if not self.name:
            self.name = Path(self.dir).resolve().name

    @property
    def path(self) -> Path:
        return Path(self.dir)


def run_finished(run_dir: str | Path) -> bool:
    """Whether the run in `run_dir` saved its last step: its `latest` checkpoint is step `train.steps` of
    its config.yaml. A `latest` alone is not enough: a run stopped midway (killed, preempted) has one too,
    and a script that skips finished stages must resume it instead. With `train.steps: 0` (the length
    derived from epochs) any `latest` counts."""
    import yaml

    from pretrain.checkpoint import tag_for

    run_dir = Path(run_dir)
    latest, config = run_dir / "checkpoints" / "latest", run_dir / "config.yaml"
    if not latest.is_file() or not config.is_file():
        return False
    steps = int(((yaml.safe_load(config.read_text()) or {}).get("train") or {}).get("steps") or 0)
    return steps == 0 or latest.read_text().strip() == tag_for(steps)
