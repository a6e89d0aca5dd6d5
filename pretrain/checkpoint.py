"""Checkpoints of a run: atomic save by all ranks, `latest` commit marker, keep-last-K, exact and
elastic resume.

Layout (DESIGN.md 3):

    <run>/checkpoints/<tag>/            DeepSpeed state (model, optimizer, scheduler) + ours:
        client_state.json               step, epoch, global data cursor, config (+ hash), world size
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
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_tools.errors import UserError, atomic_replace, atomic_write_text, check
from pretrain.distributed import barrier, broadcast_object

LATEST = "latest"
CLIENT_STATE = "client_state.json"
TMP_PREFIX = ".tmp-"
UNIVERSAL_SUFFIX = ".universal"
FAULT_ENV = "RELALIGN_KILL_DURING_SAVE"
"""Fault injection for the crash tests: a process whose environment sets this to a tag SIGKILLs
itself after writing its part of that checkpoint and before the commit."""


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
    np.random.set_state(("MT19937", state["numpy_key"].numpy().astype(np.uint32), pos, np_has_gauss,
                         float(state["numpy_gauss"][0])))
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
    raise UserError(f"resume: {path} is not a complete checkpoint, nor a run or checkpoints folder with one "
                    f"(expected <run>/checkpoints/<tag>/{CLIENT_STATE})")


def read_client_state(path: Path) -> dict[str, Any]:
    return json.loads((path / CLIENT_STATE).read_text(encoding="utf-8"))


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

    def save(self, engine: Any, step: int, client_state: dict[str, Any], tokenizer: Any = None) -> Path:
        """All ranks: DeepSpeed state + RNG into `.tmp-<tag>`, barrier, rank 0 commits. Returns the tag path."""
        from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                    UNIVERSAL_CHECKPOINT_VERSION_VALUE)

        tag = tag_for(step)
        tmp = self.root / (TMP_PREFIX + tag)
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a crash during an earlier save of this step
                shutil.rmtree(tmp)
        barrier()
        # DeepSpeed keeps the client state in its own model-states file too (torch pickle); ours is
        # the JSON below. UNIVERSAL_CHECKPOINT_INFO lets ds_to_universal convert this checkpoint.
        engine.save_checkpoint(str(self.root), tag=tmp.name, save_latest=False, client_state={
            UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}})
        (tmp / "rng").mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank{self.rank}.pt")
        if self.rank == 0:
            if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(str(tmp / "tokenizer"))
            state = dict(client_state, world_size=self.world_size, saved_at=time.time(), tag=tag)
            atomic_write_text(tmp / CLIENT_STATE, json.dumps(state, indent=1))
        if os.environ.get(FAULT_ENV) == tag:  # fault injection for tests: die with the save half done
            os.kill(os.getpid(), signal.SIGKILL)
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
            stale_universal = p.name.endswith(UNIVERSAL_SUFFIX) and not (self.root / p.name[: -len(UNIVERSAL_SUFFIX)]).exists()
            if p.is_dir() and (p.name.startswith(TMP_PREFIX) or stale_universal):
                shutil.rmtree(p, ignore_errors=True)

    def load(self, engine: Any, path: Path, universal: bool) -> dict[str, Any]:
        """All ranks: load DeepSpeed state (converted to universal first when asked), restore RNG."""
        state = read_client_state(path)
        if universal:
            target = universal_path(path)
            load_path, load_root, load_tag = target, str(target.parent), target.name
        else:
            load_path, load_root, load_tag = path, str(path.parent), path.name
        try:
            loaded, _ = engine.load_checkpoint(load_root, tag=load_tag, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
        except RuntimeError as err:  # the model built from this configuration is not the saved one
            mismatch = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
            if not mismatch:
                raise
            raise UserError(f"resume: {load_path} does not fit the model this configuration builds "
                            f"({len(mismatch)} tensors differ in shape, e.g. {mismatch[0]})") from None
        if loaded is None:
            raise UserError(f"resume: DeepSpeed could not load {load_path}")
        rng_file = path / "rng" / f"rank{self.rank}.pt"
        if state["world_size"] == self.world_size and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        return state


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
        args = Namespace(input_folder=str(path), output_folder=str(tmp), num_extract_workers=1,
                         num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        try:
            ds_to_universal.main(args)
            shutil.rmtree(target, ignore_errors=True)
            atomic_replace(tmp, target)
        except Exception as err:  # DeepSpeed's own limits, e.g. a layout it cannot convert
            failure = f"{type(err).__name__}: {err}"
    failure = broadcast_object(failure)
    if failure is not None:
        raise UserError(f"resume: DeepSpeed cannot convert {path} to a universal checkpoint for another world "
                        f"size ({failure}); resume with the world size that wrote it")
    return target
