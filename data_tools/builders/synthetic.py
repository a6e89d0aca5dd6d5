"""Synthetic relational scenes: exact boxes, phrase-to-box links, hard negatives, own tokenizer.

`build synthetic --samples N --seed S [--image-size PX] [--split NAME]`: the relational scenes of
DESIGN.md 4 (data_tools.synthetic), with the grammar's WordPiece tokenizer in `tokenizer/`.

Keys (and so image ids) name the seed, `s<seed>-<index>`: datasets built with different seeds (a
training set and a held-out set, or the parts of a mixture) never share a key or an image id.
`--split` labels every sample (json `split`, manifest `split`), e.g. `test` for a held-out set."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from data_tools.build import Source
from data_tools.records import Record
from data_tools.errors import UserError
from data_tools.schema import TOKENIZER_DIR
from data_tools.synthetic import GRAMMAR_WORDS, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE


def scene_key(seed: int, index: int, width: int = 9) -> str:
    """The key (and image id) of scene `index` of seed `seed`: unique across seeds, sorted by index."""
    return f"s{seed}-{index:0{width}d}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, required=True, help="number of scenes")
    parser.add_argument("--seed", type=int, default=0, help="same seed -> byte-identical dataset")
    parser.add_argument(
        "--image-size", type=int, default=64, help=f"canvas side in pixels ({MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE})"
    )
    parser.add_argument(
        "--split",
        default="train",
        help="split label stored in every sample's json and the manifest (e.g. test for a held-out set)",
    )


def make_source(args: argparse.Namespace) -> Source:
    if args.samples < 1:
        raise UserError(f"--samples={args.samples}: must be at least 1")
    if not MIN_IMAGE_SIZE <= args.image_size <= MAX_IMAGE_SIZE:
        raise UserError(f"--image-size={args.image_size}: must be in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}")
    if args.seed < 0:
        raise UserError(f"--seed={args.seed}: must be at least 0")
    if not args.split or not args.split.replace("_", "").replace("-", "").isalnum():
        raise UserError(
            f"--split={args.split!r}: must be a non-empty name of letters, digits, '-' or '_' (e.g. train, test)"
        )
    width = max(9, len(str(args.samples - 1)))

    def records():
        for i in range(args.samples):
            key = scene_key(args.seed, i, width)
            yield Record(
                key=key,
                origin=f"scene {i} of seed {args.seed}",
                scene=(args.seed, i, args.image_size),
                split=args.split,
            )

    arguments = {"samples": args.samples, "seed": args.seed, "image_size": args.image_size, "split": args.split}
    return Source("synthetic", arguments, records, dedup=False, sized=False, finish=finish)


def finish(out: Path, arguments: dict[str, Any]) -> None:
    """The dataset's tokenizer: a fixed WordPiece vocabulary from the grammar's words."""
    from data_tools.wordpiece import write_vocab_tokenizer

    write_vocab_tokenizer(GRAMMAR_WORDS, Path(out) / TOKENIZER_DIR)
