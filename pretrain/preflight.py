"""Checks of a validated configuration against the machine: the files it names (dataset folders and
their dataset.json, the DeepSpeed JSON, the init checkpoint's vocabulary, box categories) and the
hardware (fp16 needs CUDA). They run once, before any process group starts, so a missing folder is
one line and not a hang of every rank; a dataset folder with a malformed dataset.json is a data
error (exit 3), not a configuration one.

    check_environment(cfg)      # after pretrain.config.config_from_dict
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_tools.errors import ConfigError, ExitCode, UserError, check

if TYPE_CHECKING:
    from pretrain.config import Config


def check_categories(cfg: Config) -> None:
    """MRC, object tags and position captions need box categories: some dataset.json of data.paths
    lists `box_labels`."""
    from data_tools.manifest import category_vocabulary

    mrm = cfg.objectives.terms.get("mrm")
    wants = [
        name
        for name, on in (
            ("objectives.mrm.mrc", cfg.objectives.enabled("mrm") and mrm.mrc),
            ("objectives.tags.enabled", cfg.objectives.enabled("tags")),
            ("objectives.position.enabled", cfg.objectives.enabled("position")),
        )
        if on
    ]
    if wants and not category_vocabulary(cfg.data.paths):
        raise ConfigError(
            wants[0],
            True,
            f"false: no dataset of data.paths={cfg.data.paths} carries box categories "
            f"(box_labels in dataset.json; synthetic and COCO-with-instances builds do)",
        )


def check_environment(cfg: Config) -> None:
    """Checks that need the file system or the hardware: dataset folders and their dataset.json,
    the DeepSpeed JSON, the init checkpoint's vocabulary, fp16."""
    from data_tools.features import check_cache
    from data_tools.manifest import load_dataset_info

    check("data.paths", cfg.data.paths, len(cfg.data.paths) > 0, "at least one dataset folder")
    for section, paths in (("data.paths", cfg.data.paths), ("eval.paths", cfg.eval.paths)):
        for i, p in enumerate(paths):
            check(
                f"{section}[{i}]",
                p,
                (Path(p) / "dataset.json").is_file(),
                "an existing dataset folder with dataset.json (build one with `python -m data_tools build`)",
            )
            try:  # every shard location through data_tools.trust: pipe:/URL only with data.allow_pipe_from/remote_allow
                load_dataset_info(p).locations(p, cfg.data.trust)
            except UserError as err:  # malformed or not allowed: the data is wrong, not the configuration
                raise UserError(f"{section}[{i}]: {err}", ExitCode.DATA) from None
            check_cache(p, f"{section}[{i}]", cfg.model.visual_embedder, cfg.data.visual, cfg.model.feature_dim)
    check_categories(cfg)
    if cfg.zero.deepspeed_config is not None:
        p = Path(cfg.zero.deepspeed_config)
        check("zero.deepspeed_config", str(p), p.is_file(), "an existing DeepSpeed JSON file")
        try:
            data = json.loads(p.read_text())
        except ValueError as err:
            raise ConfigError("zero.deepspeed_config", str(p), f"valid JSON ({err})") from None
        check("zero.deepspeed_config", str(p), isinstance(data, dict), "a JSON object")
        adopt_raw_deepspeed(cfg, data)
    if cfg.model.init_from is not None:
        check_init_vocabulary(cfg)
    if cfg.precision == "fp16":
        import torch

        check("precision", "fp16", torch.cuda.is_available(), "fp32 or bf16 on this machine (fp16 needs a CUDA device)")


def check_init_vocabulary(cfg: Config) -> None:
    """`model.init_from` must have been trained with the data tokenizer's vocabulary.

    The model's vocab_size is the tokenizer's size, so a checkpoint whose word embedding table has
    another number of rows cannot load; say so here, before any process group starts. A tokenizer
    that is not a local folder (a remote dataset without data.tokenizer) is left to the loader.
    """
    from data_tools.collate import load_tokenizer
    from data_tools.loader import tokenizer_folder
    from pretrain.model.hf_init import checkpoint_vocab_size

    folder = tokenizer_folder(cfg.data)
    if "://" in str(folder) or not folder.is_dir():
        return
    tokenizer_size = len(load_tokenizer(folder))
    checkpoint_size = checkpoint_vocab_size(cfg.model.init_from)
    if checkpoint_size != tokenizer_size:
        raise UserError(
            f"model.init_from={cfg.model.init_from}: its word embeddings have {checkpoint_size} rows but the data "
            f"tokenizer {folder} has {tokenizer_size} tokens; point data.tokenizer at the checkpoint's own "
            f"tokenizer folder (e.g. data.tokenizer=minilm for model.init_from=minilm)"
        )


def adopt_raw_deepspeed(cfg: Config, data: dict[str, Any]) -> None:
    """The raw DeepSpeed JSON is merged over the generated one, so where it sets the ZeRO stage or
    the precision, those win; copy them into the config so config.yaml, logs and checkpoints say
    what actually runs."""
    stage = (data.get("zero_optimization") or {}).get("stage")
    if stage is not None:
        check(
            "zero.deepspeed_config",
            f"{cfg.zero.deepspeed_config}: zero_optimization.stage={stage!r}",
            stage in (0, 1, 2, 3),
            "a ZeRO stage 0, 1, 2 or 3",
        )
        cfg.zero.stage = stage
    for precision in ("bf16", "fp16"):
        if (data.get(precision) or {}).get("enabled") is True:
            cfg.precision = precision
