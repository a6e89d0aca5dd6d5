"""The saved state of a run: what every checkpoint's `client_state.json` holds, as one typed,
versioned record with one reader and one writer.

    state = read_run_state(checkpoint)           # RunState, whatever format wrote it
    write_run_state(tmp_checkpoint, state)       # always FORMAT_VERSION

`TrainState` is where the loop stands (step, epoch, data cursor, counters); `RunState` is that plus
what a resume, an export and a finetuning start need to know about the run (its configuration and
hash, task, batch geometry, box categories, the world size that saved it). The JSON is flat (every
field a top-level key) so that a person, `jq` or a test can read it; `format` names its version.

Formats:
- 2: this record; `format: 2`. Adds `objective`: the objective's own state (where the phases of a
  curriculum term ended, `CompositeObjective.state_dict`; {} for most runs).
- 1: the same without `objective` (read as {}: a fixed-step curriculum needs no state).
- unversioned (no `format` key), three shapes, all migrated on read: the first one also held
  `scheduler_step` and `iais_position` (both restated by `step` and `total_steps`; DeepSpeed saves
  the scheduler itself) and no `task` (only pretraining existed); the next one added `task`; the
  last one added `categories` (the run's box categories, None when not saved).
Reading a format newer than this code knows is a one-line error, never a guess.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

from data_tools.errors import ExitCode, UserError, atomic_write_text

CLIENT_STATE = "client_state.json"
FORMAT_VERSION = 2


@dataclasses.dataclass
class TrainState:
    """Where the loop stands; everything but `nonfinite_in_a_row` is saved."""

    step: int = 0
    epoch: int = 0
    cursor: dict[str, Any] | None = None
    """The global data cursor (merged over ranks) after the last consumed micro-batch."""
    samples: int = 0
    nonfinite_total: int = 0
    objective: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The objective's own state (`CompositeObjective.state_dict`: e.g. where curriculum phases ended)."""
    nonfinite_in_a_row: int = 0
    """Not saved: a resumed run starts a new count of non-finite steps in a row."""

    SAVED: ClassVar[tuple[str, ...]] = ("step", "epoch", "cursor", "samples", "nonfinite_total", "objective")


@dataclasses.dataclass
class RunState:
    """The client state of one checkpoint (`<run>/checkpoints/<tag>/client_state.json`)."""

    progress: TrainState
    total_steps: int
    """The run's length, fixed at its start (a resume keeps it)."""
    global_batch: int
    """Samples per optimizer step over all ranks (kept on an elastic resume)."""
    task: str
    """What trained: `pretrain` or `finetune`."""
    config: dict[str, Any]
    """The resolved configuration as plain data (pretrain.config_schema.to_dict)."""
    config_hash: str
    """sha256 of the training identity (pretrain.checkpoint.config_hash)."""
    categories: list[str] | None = None
    """The run's box categories (class index = position), kept on resume; None: not saved."""
    world_size: int = 0
    """Ranks that saved it (set by the checkpoint manager)."""
    saved_at: float = 0.0
    """Unix time of the save (set by the checkpoint manager)."""
    tag: str = ""
    """The checkpoint's tag, e.g. step00000042 (set by the checkpoint manager)."""

    def to_json(self) -> str:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "progress"}
        saved = {name: getattr(self.progress, name) for name in TrainState.SAVED}
        return json.dumps({"format": FORMAT_VERSION, **saved, **fields}, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = CLIENT_STATE) -> "RunState":
        """Any known format -> RunState; an unreadable or unknown one is a one-line UserError."""
        try:
            tree = json.loads(text)
        except ValueError as err:
            raise UserError(f"{source}: not valid JSON ({err})", ExitCode.DATA) from None
        if not isinstance(tree, dict):
            raise UserError(f"{source}: expected a JSON object", ExitCode.DATA)
        version = tree.pop("format", 0)
        if version not in MIGRATIONS and version != FORMAT_VERSION:
            raise UserError(
                f"{source}: run state format {version!r} is not one this code reads (0 to "
                f"{FORMAT_VERSION}); it was written by a newer relalign",
                ExitCode.DATA,
            )
        while version != FORMAT_VERSION:
            tree, version = MIGRATIONS[version](tree)
        try:
            progress = TrainState(**{name: tree.pop(name) for name in TrainState.SAVED})
            return cls(progress=progress, **tree)
        except (KeyError, TypeError) as err:
            raise UserError(
                f"{source}: not a run state of format {FORMAT_VERSION} ({type(err).__name__}: {err})", ExitCode.DATA
            ) from None

    def model_config(self, vocab_size: int) -> Any:
        """The ModelConfig this run trained (pretrain.model.ModelConfig, through the schema), with the
        vocabulary size of its tokenizer (the saved section leaves it to the tokenizer)."""
        from pretrain.config_schema import build
        from pretrain.model.config import ModelConfig

        return build(ModelConfig, {**self.config["model"], "vocab_size": vocab_size}, "model")


def _from_unversioned(tree: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Every unversioned shape -> format 1: drop what `step` and `total_steps` restate, default what
    later shapes added (a run without `task` was a pretraining run)."""
    tree = {k: v for k, v in tree.items() if k not in ("scheduler_step", "iais_position")}
    tree.setdefault("task", "pretrain")
    tree.setdefault("categories", None)
    tree.setdefault("nonfinite_total", 0)
    return tree, 1


def _from_1(tree: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Format 1 -> 2: no objective state (format 1 had only fixed-step phases)."""
    return {**tree, "objective": {}}, 2


MIGRATIONS = {0: _from_unversioned, 1: _from_1}
"""format -> function(tree) -> (tree of the next format, that format); applied until FORMAT_VERSION."""


def read_run_state(checkpoint: Path) -> RunState:
    """The one reader: `<checkpoint>/client_state.json` in any known format."""
    path = Path(checkpoint) / CLIENT_STATE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror})", ExitCode.DATA) from None
    return RunState.from_json(text, str(path))


def write_run_state(checkpoint: Path, state: RunState) -> None:
    """The one writer: `<checkpoint>/client_state.json` in FORMAT_VERSION, atomically."""
    atomic_write_text(Path(checkpoint) / CLIENT_STATE, state.to_json())
