"""`python -m finetune`: retrieval finetuning on the one training loop, and evaluation.

    python -m finetune --config configs/tiny.yaml --init runs/tiny [overrides] [--resume auto|PATH]
    torchrun --nproc_per_node 2 -m finetune --config ...        (also deepspeed --module, srun, accelerate launch -m)
    python -m finetune evaluate WEIGHTS --data DATASET [--mode full|rerank|embedding] [--k K]
    python -m finetune config-reference [--readme README.md]   (every config field: type, default, meaning)

The preset's `finetune:` section gives the recipe and its optimiser values (finetune.overrides);
everything is validated before any process group starts. Exit codes: data_tools.errors.ExitCode.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from data_tools.errors import UserError, is_local_leader, run_cli


def _train_parser() -> argparse.ArgumentParser:
    from pretrain.__main__ import training_parser

    parser = training_parser(
        "python -m finetune", "Finetune for retrieval (the paper's hard-negative recipe with IAIS), or `evaluate`."
    )
    parser.add_argument("--init", help="pretraining run directory, checkpoint or export to start from (finetune.init)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    if argv and argv[0] == "evaluate":
        from finetune.evaluate import main as evaluate_main

        return evaluate_main(argv[1:])
    if argv and argv[0] == "config-reference":
        return _config_reference(argv[1:])
    args = _train_parser().parse_intermixed_args(argv)  # options may stand between overrides
    if args.config is None and not args.overrides:
        raise UserError("python -m finetune: give --config FILE (e.g. configs/tiny.yaml) and --init RUN")
    from finetune.config import load_finetune_config
    from finetune.task import FinetuneTask
    from pretrain.__main__ import prepare, run_training

    overrides = (
        list(args.overrides)
        + ([f"finetune.init={args.init}"] if args.init else [])
        + ([f"resume={args.resume}"] if args.resume else [])
    )
    cfg, resume = prepare(load_finetune_config, args.config, overrides)
    return run_training(cfg, resume, FinetuneTask, prog="finetune")


def _config_reference(argv: list[str]) -> int:
    """Print the configuration reference (every section, the finetuning one included), or write it
    between the README's markers with --readme."""
    from data_tools.errors import OneLineParser
    from finetune.config import SECTIONS
    from pretrain.config_reference import generate, write_readme

    parser = OneLineParser(
        prog="python -m finetune config-reference",
        allow_abbrev=False,
        description="The configuration reference (Markdown) generated from the schema.",
    )
    parser.add_argument(
        "--readme",
        help="write it between the <!-- config-reference --> markers of this file "
        "(e.g. README.md) instead of printing it",
    )
    args = parser.parse_args(argv)
    if args.readme:
        write_readme(args.readme, SECTIONS)
        print(f"wrote the configuration reference into {args.readme}")
    else:
        print(generate(SECTIONS), end="")
    return 0


main.__module__ = "finetune.__main__"


def entry() -> int:
    return run_cli(main, quiet=not is_local_leader())


if __name__ == "__main__":
    sys.exit(entry())
