"""Checkpoints of a run: atomic save by all ranks, `latest` commit marker, keep-last-K, exact and
elastic resume.

Layout (DESIGN.md 3):

    <run>/checkpoints/<tag>/            DeepSpeed state (model, optimizer, scheduler) + ours:
        client_state.json               pretrain.run_state.RunState: step, epoch, data cursor, config (+ hash), ...
        rng/rank<r>.pt                  every rank's RNG states (torch, python, numpy)
        tokenizer/                      the tokenizer the run trains with
    <run>/checkpoints/latest            tag of the newest complete checkpoint (the commit marker)

A checkpoint is written under `.tmp-<tag>` by every rank, renamed to `<tag>` by rank 0 only after a
barrier (every rank finished), and only then is `latest` replaced (write + os.replace). A crash at
any moment leaves either the previous `latest` or the new one, never a half checkpoint behind it.

Elastic resume (another world size) at ZeRO 1-3 goes through DeepSpeed's universal checkpoint:
rank 0 converts `<tag>` into `<tag>.universal` with `deepspeed.checkpoint.ds_to_universal` and every
rank loads it with `checkpoint.load_universal`. ZeRO 0 keeps full states in every rank's file and
loads at any world size directly.

Resume identity: a checkpoint continues a run only when the configuration it was trained with equals
this run's outside the fields a resume may change (`RESUME_MUTABLE`, and the fields a section class
lists in its `resume_mutable`); `check_resume` says so once, before any process group starts, and
returns the checkpoint with its run state (read once per resume).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import time
from argparse import Namespace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from data_tools.errors import UserError, atomic_replace, atomic_write_text, check
from pretrain import testing_hooks
from pretrain.config_schema import to_dict
from pretrain.distributed import barrier, broadcast_object
from pretrain.run_state import CLIENT_STATE, RunState, read_run_state, write_run_state

LATEST = "latest"
TMP_PREFIX = ".tmp-"
UNIVERSAL_SUFFIX = ".universal"


@dataclasses.dataclass
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    every_steps: int = 0
    """Steps between checkpoints (0 = only at the end, on preemption and on non-finite stops)."""
    keep_last: int = 3
    """Complete checkpoints kept; older ones are removed after each save."""
    at_end: bool = True
    """Save after the last step."""

    def __post_init__(self) -> None:
        check("checkpoint.every_steps", self.every_steps, self.every_steps >= 0, "an integer >= 0 (0 = off)")
        check("checkpoint.keep_last", self.keep_last, self.keep_last >= 1, "an integer >= 1")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


# --- RNG -----------------------------------------------------------------------------------------
def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python_mt": torch.tensor(mt, dtype=torch.int64),
        "python_meta": torch.tensor([version, -1 if gauss is None else 1], dtype=torch.int64),
        "python_gauss": torch.tensor([0.0 if gauss is None else gauss], dtype=torch.float64),
        "numpy_key": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_meta": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    version, has_gauss = (int(v) for v in state["python_meta"])
    gauss = float(state["python_gauss"][0]) if has_gauss == 1 else None
    random.setstate((version, tuple(int(v) for v in state["python_mt"]), gauss))
    pos, np_has_gauss = (int(v) for v in state["numpy_meta"])
    np.random.set_state(
        ("MT19937", state["numpy_key"].numpy().astype(np.uint32), pos, np_has_gauss, float(state["numpy_gauss"][0]))
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- finding checkpoints -------------------------------------------------------------------------
def is_complete(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(TMP_PREFIX) and (path / CLIENT_STATE).is_file()


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The checkpoint `latest` names, or None when the run has none (a crash before the first one)."""
    marker = checkpoints / LATEST
    if not marker.is_file():
        return None
    path = checkpoints / marker.read_text(encoding="utf-8").strip()
    return path if is_complete(path) else None


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """`auto` -> this run's newest complete checkpoint or None; a path -> that checkpoint.

    A path may name a checkpoint tag folder, a `checkpoints/` folder or a run folder (their `latest`).
    """
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir / "checkpoints")
    path = Path(resume)
    if is_complete(path):
        return path
    for folder in (path, path / "checkpoints"):
        found = latest_checkpoint(folder) if folder.is_dir() else None
        if found is not None:
            return found
    if path.is_dir() and path.name.startswith(TMP_PREFIX):
        raise UserError(f"resume: {path} is an incomplete checkpoint (a save was interrupted); use --resume auto")
    raise UserError(
        f"resume: {path} is not a complete checkpoint, nor a run or checkpoints folder with one "
        f"(expected <run>/checkpoints/<tag>/{CLIENT_STATE})"
    )


# --- resume identity -----------------------------------------------------------------------------
RESUME_MUTABLE = (
    "data.paths",
    "data.workers",
    "data.batch_size",
    "data.weights",
    "data.tokenizer",
    "data.allow_pipe_from",
    "data.remote_allow",
    "metrics",
    "run",
    "resume",
    "eval",
    "profile",
    "train.log_every",
    "train.lost_rank_timeout_s",
    "train.record_keys",
    "train.grad_accumulation",
    "checkpoint",
    "zero.deepspeed_config",
    "tf32",
)
"""Fields that may differ between a checkpoint's config and the resuming run's (world size too).
Any other difference is refused: the resumed run would not continue the same training. A section
class adds its own with a `resume_mutable` class attribute (field names within the section)."""


class Resume(NamedTuple):
    """A checkpoint to continue from and its run state, read once (by `check_resume`)."""

    path: Path
    state: RunState


def mutable_fields(cfg: Any) -> list[str]:
    """RESUME_MUTABLE plus the `resume_mutable` fields of the sections `cfg` holds (e.g. finetune.init)."""
    extra = [
        f"{f.name}.{name}"
        for f in dataclasses.fields(cfg)
        for name in getattr(getattr(cfg, f.name), "resume_mutable", ())
    ]
    return [*RESUME_MUTABLE, *extra]


def _strip(tree: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        tree = tree.get(key) if isinstance(tree, dict) else None
    if isinstance(tree, dict):
        tree.pop(last, None)


def training_identity(tree: dict[str, Any], mutable: list[str]) -> dict[str, Any]:
    """A config's plain data without the fields a resume may change."""
    tree = json.loads(json.dumps(tree))
    for dotted in mutable:
        _strip(tree, dotted)
    return tree


def config_hash(cfg: Any) -> str:
    """sha256 of the training identity: equal for configs that train the same run."""
    blob = json.dumps(training_identity(to_dict(cfg), mutable_fields(cfg)), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def with_new_defaults(saved: Any, current: Any) -> Any:
    """The saved config tree with every field it lacks at that field's default in `current`'s classes:
    a field added to the schema after the checkpoint was written trained at its default (a new field
    defaults to the behaviour before it), so it does not stop an older checkpoint from resuming."""
    if hasattr(current, "as_tree"):
        current = current.as_tree()
    if not isinstance(saved, dict):
        return saved
    if isinstance(current, dict):
        return {key: with_new_defaults(value, current.get(key)) for key, value in saved.items()} | {
            key: to_dict(type(value)())
            for key, value in current.items()
            if key not in saved and dataclasses.is_dataclass(value)
        }
    if not dataclasses.is_dataclass(current):
        return saved
    out = dict(saved)
    for field in dataclasses.fields(current):
        if field.name in out:
            out[field.name] = with_new_defaults(out[field.name], getattr(current, field.name))
        elif field.default is not dataclasses.MISSING:
            out[field.name] = to_dict(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            out[field.name] = to_dict(field.default_factory())
    return out


def resume_differences(saved: dict[str, Any], current: Any) -> list[str]:
    """Dotted fields whose values differ between a checkpoint's config and this run's (a field the
    checkpoint's config lacks counts at its default: `with_new_defaults`)."""
    mutable = mutable_fields(current)
    a, b = training_identity(with_new_defaults(saved, current), mutable), training_identity(to_dict(current), mutable)
    out: list[str] = []

    def walk(x: Any, y: Any, path: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y)):
                walk(x.get(key), y.get(key), f"{path}.{key}" if path else key)
        elif x != y:
            out.append(f"{path}: {x!r} -> {y!r}")

    walk(a, b, "")
    return out


def check_resume(cfg: Any) -> Resume | None:
    """The checkpoint to resume from (None: a fresh start), checked once before any process group
    starts; UserError when it cannot continue this run: missing, incomplete, or trained with a
    configuration that differs beyond the resume-mutable fields."""
    path = resolve_resume(cfg.resume, cfg.run.path)
    if path is None:
        return None
    state = read_run_state(path)
    diffs = resume_differences(state.config, cfg)
    if diffs:
        raise UserError(
            f"resume: {path} was trained with a different configuration; only the world size and "
            f"the fields in pretrain.checkpoint.RESUME_MUTABLE may change: {'; '.join(diffs)}"
        )
    return Resume(path, state)


# --- the manager ---------------------------------------------------------------------------------
class CheckpointManager:
    """Saves and loads the checkpoints of one run, and decides when a step saves (its policy:
    `every_steps`, `at_end`, and always on a stop). Every method is called by every rank."""

    def __init__(self, config: CheckpointConfig, run_dir: Path, rank: int, world_size: int):
        self.config = config
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = config.keep_last
        self.rank, self.world_size = rank, world_size

    def due(self, step: int, last_step: int, stop: bool = False) -> bool:
        """Whether `step` saves: a stop (preemption, non-finite limit) always does; the last step when
        `at_end` (or a cadence is set); otherwise every `every_steps`."""
        every = self.config.every_steps
        if stop:
            return True
        if step >= last_step:
            return self.config.at_end or bool(every)
        return bool(every) and step % every == 0

    def save(self, engine: Any, step: int, run_state: RunState, tokenizer: Any = None) -> Path:
        """All ranks: DeepSpeed state + RNG into `.tmp-<tag>`, barrier, rank 0 commits. Returns the tag path."""
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        tag = tag_for(step)
        tmp = self.root / (TMP_PREFIX + tag)
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a crash during an earlier save of this step
                shutil.rmtree(tmp)
        barrier()
        # DeepSpeed keeps the client state in its own model-states file too (torch pickle); ours is
        # the JSON below. UNIVERSAL_CHECKPOINT_INFO lets ds_to_universal convert this checkpoint.
        engine.save_checkpoint(
            str(self.root),
            tag=tmp.name,
            save_latest=False,
            client_state={
                UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
            },
        )
        (tmp / "rng").mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank{self.rank}.pt")
        if self.rank == 0:
            if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(str(tmp / "tokenizer"))
            write_run_state(
                tmp, dataclasses.replace(run_state, world_size=self.world_size, saved_at=time.time(), tag=tag)
            )
        testing_hooks.checkpoint_part_written(tag)
        barrier()  # every rank has written its part
        final = self.root / tag
        if self.rank == 0:
            if final.exists():
                shutil.rmtree(final)
            atomic_replace(tmp, final)
            atomic_write_text(self.root / LATEST, tag + "\n")
            self._prune(keep=final)
        barrier()
        return final

    def _prune(self, keep: Path) -> None:
        """Keep the newest `keep_last` complete checkpoints; drop stale temporaries and conversions."""
        tags = sorted(p for p in self.root.iterdir() if is_complete(p))
        for old in tags[: max(0, len(tags) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
        for p in self.root.iterdir():
            stale_universal = (
                p.name.endswith(UNIVERSAL_SUFFIX) and not (self.root / p.name[: -len(UNIVERSAL_SUFFIX)]).exists()
            )
            if p.is_dir() and (p.name.startswith(TMP_PREFIX) or stale_universal):
                shutil.rmtree(p, ignore_errors=True)

    def load(self, engine: Any, resume: Resume, universal: bool) -> None:
        """All ranks: load DeepSpeed state (converted to universal first when asked), restore RNG."""
        path = resume.path
        if universal:
            target = universal_path(path)
            load_path, load_root, load_tag = target, str(target.parent), target.name
        else:
            load_path, load_root, load_tag = path, str(path.parent), path.name
        try:
            loaded, _ = engine.load_checkpoint(
                load_root, tag=load_tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        except RuntimeError as err:  # the model built from this configuration is not the saved one
            mismatch = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
            if not mismatch:
                raise
            raise UserError(
                f"resume: {load_path} does not fit the model this configuration builds "
                f"({len(mismatch)} tensors differ in shape, e.g. {mismatch[0]})"
            ) from None
        if loaded is None:
            raise UserError(f"resume: DeepSpeed could not load {load_path}")
        rng_file = path / "rng" / f"rank{self.rank}.pt"
        if resume.state.world_size == self.world_size and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))


def universal_path(path: Path) -> Path:
    return path.with_name(path.name + UNIVERSAL_SUFFIX)


def convert_to_universal(path: Path, rank: int) -> Path:
    """Rank 0 converts `<tag>` to `<tag>.universal` (once; reused later); every rank learns the
    outcome, so a conversion DeepSpeed refuses is one clear error on all ranks, not a hang."""
    target = universal_path(path)
    failure = None
    if rank == 0 and not (target / "zero").is_dir():
        from deepspeed.checkpoint import ds_to_universal

        tmp = path.with_name(TMP_PREFIX + target.name)
        shutil.rmtree(tmp, ignore_errors=True)
        args = Namespace(
            input_folder=str(path),
            output_folder=str(tmp),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
        try:
            ds_to_universal.main(args)
            shutil.rmtree(target, ignore_errors=True)
            atomic_replace(tmp, target)
        except Exception as err:  # DeepSpeed's own limits, e.g. a layout it cannot convert
            failure = f"{type(err).__name__}: {err}"
    failure = broadcast_object(failure)
    if failure is not None:
        raise UserError(
            f"resume: DeepSpeed cannot convert {path} to a universal checkpoint for another world "
            f"size ({failure}); resume with the world size that wrote it"
        )
    return target
