"""Synthetic relational scenes: exact boxes, phrase-to-box links, hard negatives, own tokenizer.

`build synthetic --samples N --seed S [--image-size PX]`: the relational scenes of DESIGN.md 4
(data_tools.synthetic), with the grammar's WordPiece tokenizer in `tokenizer/`."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from data_tools.build import Source
from data_tools.records import Record
from data_tools.errors import UserError
from data_tools.schema import TOKENIZER_DIR
from data_tools.synthetic import GRAMMAR_WORDS, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, required=True, help="number of scenes")
    parser.add_argument("--seed", type=int, default=0, help="same seed -> byte-identical dataset")
    parser.add_argument("--image-size", type=int, default=64, help=f"canvas side in pixels ({MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE})")
    parser.add_argument("--split", default="train", help="split label stored in every sample")


def make_source(args: argparse.Namespace) -> Source:
    if args.samples < 1:
        raise UserError(f"--samples={args.samples}: must be at least 1")
    if not MIN_IMAGE_SIZE <= args.image_size <= MAX_IMAGE_SIZE:
        raise UserError(f"--image-size={args.image_size}: must be in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}")
    width = max(9, len(str(args.samples - 1)))

    def records():
        for i in range(args.samples):
            key = f"{i:0{width}d}"
            yield Record(key=key, origin=f"scene {i} of seed {args.seed}", scene=(args.seed, i, args.image_size), split=args.split)

    arguments = {"samples": args.samples, "seed": args.seed, "image_size": args.image_size, "split": args.split}
    return Source("synthetic", arguments, records, dedup=False, sized=False, finish=finish)


def finish(out: Path, arguments: dict[str, Any]) -> None:
    """The dataset's tokenizer: a fixed WordPiece vocabulary from the grammar's words."""
    from data_tools.wordpiece import write_vocab_tokenizer

    write_vocab_tokenizer(GRAMMAR_WORDS, Path(out) / TOKENIZER_DIR)
