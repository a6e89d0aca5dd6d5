"""`python -m finetune`: retrieval evaluation (`evaluate`); finetuning itself is on the roadmap.

    python -m finetune evaluate WEIGHTS --data DATASET [--mode full|rerank|embedding] [--k K] ...
"""
from __future__ import annotations

import sys
from typing import Sequence

from data_tools.errors import UserError, run_cli


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "evaluate":
        from finetune.evaluate import main as evaluate_main

        return evaluate_main(argv[1:])
    raise UserError("retrieval finetuning is not implemented yet (see the roadmap in README.md)")


def entry() -> int:
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(entry())
