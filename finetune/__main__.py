"""`python -m finetune`: retrieval finetuning and evaluation (on the roadmap, not built yet)."""
from __future__ import annotations

import sys
from typing import Sequence

from data_tools.errors import UserError, run_cli


def main(argv: Sequence[str] | None = None) -> int:
    raise UserError("retrieval finetuning is not implemented yet (see the roadmap in README.md)")


def entry() -> int:
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(entry())
