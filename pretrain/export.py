"""Export a run's checkpoint as consolidated weights: `python -m pretrain export RUN --out DIR`.

    DIR/model.safetensors     fp32 state dict of the model (any architecture, whatever ZeRO stage or
                              precision trained it)
    DIR/model_config.json     the ModelConfig (vocab_size included)
    DIR/tokenizer/            the tokenizer the run trained with (Hugging Face folder)
    DIR/export.json           source checkpoint, step, config hash

`pretrain.weights` loads it back (as it loads a run or a checkpoint): finetuning, evaluation and the
round-trip test all start there. Safetensors: loading exported weights never unpickles anything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

from data_tools.errors import ExitCode, UserError
from pretrain.checkpoint import resolve_resume
from pretrain.config_schema import to_dict
from pretrain.run_state import read_run_state

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
TOKENIZER = "tokenizer"


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load inside loads with weights_only=True, DeepSpeed's own calls included (they ask
    for full unpickling; TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides that): a run folder copied from
    elsewhere cannot run code while it is read. The few non-tensor types DeepSpeed writes into its
    state files are allow-listed by name."""
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    except pickle.UnpicklingError as err:
        found = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
        what = found[0].split(" was not")[0] if found else str(err).splitlines()[0]
        raise UserError(
            f"export: refusing to unpickle a checkpoint object that is not plain data ({what})", ExitCode.DATA
        ) from None
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


def _deepspeed_safe_globals() -> list[Any]:
    """Plain-data classes that DeepSpeed 0.19 pickles into model/optimizer state files."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, argparse.Namespace]


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """fp32 full state dict from a DeepSpeed checkpoint folder of any ZeRO stage (weights_only loads)."""
    zero_files = list(checkpoint.glob("*optim_states.pt"))
    with weights_only_loads():
        if zero_files and any("zero" in f.name for f in zero_files):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
        else:  # ZeRO 0 in fp32: the full module is in the model-states file (written by our own save)
            files = sorted(checkpoint.glob("mp_rank_*_model_states.pt"))
            if not files:
                raise UserError(f"export: {checkpoint} holds no DeepSpeed model states (mp_rank_*_model_states.pt)")
            state = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
    prefix = "model."  # engine.TrainModule wraps the model; its `heads.*` (pretraining-only objective heads) stay out
    return {
        k.removeprefix(prefix): v.detach().float().contiguous().clone()
        for k, v in state.items()
        if k.startswith(prefix)
    }


def export_run(run: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the newest complete checkpoint of `run` (or the checkpoint `run` names) into `out`."""
    from safetensors.torch import save_file

    checkpoint = resolve_resume(str(run), Path(run))
    if checkpoint is None:
        raise UserError(f"export: {run} has no complete checkpoint")
    state = consolidated_state_dict(checkpoint)  # first: a hostile state file is refused before anything else
    run_state = read_run_state(checkpoint)
    embedding = next((v for k, v in state.items() if k.endswith("word_embeddings.weight")), None)
    if embedding is None:
        raise UserError(f"export: {checkpoint} has no word embedding table; not a relalign model checkpoint")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt", "source": str(checkpoint)})
    model_config = run_state.model_config(vocab_size=int(embedding.shape[0]))
    (out / MODEL_CONFIG).write_text(json.dumps(to_dict(model_config), indent=1))
    if (checkpoint / TOKENIZER).is_dir():
        shutil.rmtree(out / TOKENIZER, ignore_errors=True)
        shutil.copytree(checkpoint / TOKENIZER, out / TOKENIZER)
    (out / "export.json").write_text(
        json.dumps(
            {
                "checkpoint": str(checkpoint.resolve()),
                "step": run_state.progress.step,
                "config_hash": run_state.config_hash,
                "parameters": int(sum(v.numel() for v in state.values())),
            },
            indent=1,
        )
    )
    return out
