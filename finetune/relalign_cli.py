"""The `relalign` console script: `relalign data|pretrain|finetune ...` mirrors `python -m <package> ...`.

It lives in finetune, the top package (finetune -> pretrain -> data_tools), because it reaches all
three; nothing below may import upwards (tests/test_layers.py)."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {"data": "data_tools", "pretrain": "pretrain", "finetune": "finetune"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        print(f"usage: relalign {{{','.join(SUBCOMMANDS)}}} ...", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{SUBCOMMANDS[argv[0]]}.__main__")
    sys.argv = [f"relalign {argv[0]}", *argv[1:]]
    return module.entry()
