"""`python -m data_tools stream DIR ...`: print what the loader delivers to every rank, one line
`step rank key` per sample (padding slots omitted), in one process.

Why: it is the shell tool for debugging data order and checking exactly-once. It runs the loader's
own order and batching code (`data_tools.order` and the stages of `data_tools.loader`) for every
rank and stream of the layout, reading keys from the manifests without decoding; `--decode` runs
the real reading and decoding path instead and reports the bad samples on stderr. `--cursor IN`
starts where a saved global cursor stopped (any layout), `--save-cursor OUT` writes the global
cursor after the last printed step, so an interrupted listing continues exactly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from data_tools import order
from data_tools.errors import UserError
from data_tools.loader import DataConfig, open_datasets, stream_pipeline
from data_tools.schema import write_json_atomic
from data_tools.trust import add_trust_arguments, command_trust


def int_at_least(low: int):
    """argparse type: an integer >= low (the message says what is allowed)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is not allowed: expected an integer >= {low}")
        return value

    return parse


_positive, _non_negative = int_at_least(1), int_at_least(0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dirs", nargs="+", metavar="DIR", help="dataset folder(s); several with --weights form a mixture"
    )
    parser.add_argument("--weights", type=float, nargs="+", default=None, help="mixture weights, one per DIR")
    parser.add_argument("--world-size", type=_positive, default=1, help="ranks")
    parser.add_argument(
        "--workers", type=_non_negative, default=0, help="DataLoader workers per rank (0: one stream per rank)"
    )
    parser.add_argument("--batch-size", type=_positive, default=8, help="samples per batch per rank")
    parser.add_argument(
        "--shuffle-block",
        type=_positive,
        default=DataConfig.shuffle_block,
        help="samples shuffled together in a stream",
    )
    parser.add_argument(
        "--epoch", type=_non_negative, default=0, help="epoch (ignored with --cursor: the cursor's epoch)"
    )
    parser.add_argument("--seed", type=_non_negative, default=0, help="data order seed")
    parser.add_argument(
        "--steps", type=_non_negative, default=None, help="global steps to print (default: to the end of the epoch)"
    )
    parser.add_argument("--cursor", default=None, metavar="IN", help="start from this saved global cursor (JSON)")
    parser.add_argument(
        "--save-cursor", default=None, metavar="OUT", help="write the global cursor after the last printed step"
    )
    parser.add_argument(
        "--decode", action="store_true", help="read and decode the samples (omits bad ones, reasons on stderr)"
    )
    parser.add_argument(
        "--max-pixels",
        type=_positive,
        default=DataConfig.max_pixels,
        help="with --decode: images with more pixels are bad samples",
    )
    add_trust_arguments(parser)


def _read_cursor(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"--cursor {path}: {err.strerror}") from None
    except ValueError as err:
        raise UserError(f"--cursor {path}: not a JSON cursor ({err})") from None


def run(args: argparse.Namespace) -> int:
    if args.weights is not None and len(args.weights) != len(args.dirs):
        raise UserError(f"--weights: {len(args.weights)} values for {len(args.dirs)} folders (expected one per DIR)")
    config = DataConfig(
        paths=list(args.dirs), weights=args.weights, batch_size=args.batch_size, workers=args.workers,
        shuffle_block=args.shuffle_block, seed=args.seed, max_pixels=args.max_pixels,
    )  # fmt: skip
    datasets = open_datasets(config.paths, config.weights, command_trust(args, args.dirs))
    sources = [d.source for d in datasets]
    layout = order.Layout(args.world_size, max(args.workers, 1), args.batch_size, args.shuffle_block)
    if args.cursor:
        saved = _read_cursor(args.cursor)
        try:
            epoch = int(saved["epoch"])
            plan, cursor = order.resume(order.EpochList(sources, args.seed, epoch), layout, saved)
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"--cursor {args.cursor}: malformed cursor ({type(err).__name__}: {err})") from None
        cursor["step"] = int(saved.get("step", 0))
    else:
        plan = order.Plan(order.EpochList(sources, args.seed, args.epoch), layout)
        cursor = {**plan.new_cursor(), "step": 0}

    ranks = range(layout.world_size)
    schedules = {r: plan.rank_schedule(cursor, r) for r in ranks}
    pipelines = {
        s: iter(stream_pipeline(plan, datasets, config, s, cursor["streams"][s], decode=args.decode, transform=False))
        for s in range(layout.num_streams)
    }
    steps = len(schedules[0]) if args.steps is None else min(args.steps, len(schedules[0]))
    out = sys.stdout
    for t in range(steps):
        step = cursor["step"]
        for r in ranks:
            item = next(pipelines[schedules[r][t]])
            for reason, detail in item["bad"]:
                print(f"bad sample at step {step} rank {r}: {reason}: {detail}", file=sys.stderr)
            for sample in item["samples"]:
                if sample is not None:
                    out.write(f"{step} {r} {sample['key']}\n")
            cursor["streams"][item["stream"]] = item["state"]
        cursor["step"] = step + 1
    out.flush()
    if args.save_cursor:
        write_json_atomic(args.save_cursor, cursor)
    return 0
