"""`python -m data_tools {build,features,verify,stats,merge,tokenizer,stream} ...`: the data plane's command line.

Each subcommand parses its arguments here and calls one module that does the work; user mistakes
become one `data_tools: error: ...` line and exit code 2 through `errors.run_cli`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from data_tools.errors import OneLineParser, UserError, run_cli
from data_tools.trust import add_trust_arguments, command_trust

COMMANDS = ("build", "features", "verify", "stats", "merge", "tokenizer", "stream")


def parse_size(text: str) -> int:
    """'512M', '2G', '100000' -> bytes (argparse type)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 500000000, 512M, 1G)") from None


def add_common_build_arguments(parser: argparse.ArgumentParser, default_name: str) -> None:
    from data_tools.images import DEFAULT_MAX_PIXELS, DEFAULT_QUALITY

    group = parser.add_argument_group("output (every format)")
    group.add_argument("--out", required=True, help="dataset folder to write (resumes when rerun)")
    group.add_argument("--name", default=default_name, help="shard file prefix: shards/<name>-000000.tar")
    group.add_argument(
        "--shard-samples", type=int, default=None, help="at most this many input records per shard (default 10000)"
    )
    group.add_argument(
        "--shard-bytes", type=parse_size, default=None, help="at most this many input image bytes per shard (e.g. 1G)"
    )
    group.add_argument(
        "--resize",
        type=int,
        default=None,
        metavar="MAX_SIDE",
        help="downscale so the longer side is at most MAX_SIDE, re-encode JPEG",
    )
    group.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="JPEG quality when re-encoding")
    group.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="reject images with more pixels (decompression bombs)",
    )
    group.add_argument("--workers", type=int, default=1, help="processes; the output is identical for any number")
    group.add_argument(
        "--num-parts", type=int, default=1, help="split the build into independent parts (e.g. a Slurm array)"
    )
    group.add_argument("--part", type=int, default=0, help="which part this process builds (0-based); then run merge")
    group.add_argument(
        "--plan-only", action="store_true", help="list, hash and cut the inputs once for all parts, then stop"
    )


def build_parser() -> argparse.ArgumentParser:
    from data_tools.builders import FORMATS

    parser = OneLineParser(
        prog="python -m data_tools", description="relalign data plane: build, check and inspect datasets"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")

    build = commands.add_parser("build", help="build a dataset folder from a source format")
    formats = build.add_subparsers(dest="format", required=True, metavar="{" + ",".join(FORMATS) + "}")
    for name, module_name in FORMATS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip()
        sub = formats.add_parser(
            name, help=doc.splitlines()[0], description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(sub)
        add_common_build_arguments(sub, default_name=name)

    from data_tools import features as features_module

    features = commands.add_parser(
        "features",
        help="run a frozen backbone once over a dataset: a feature cache",
        description=(features_module.__doc__ or "").strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    features_module.add_arguments(features)

    verify = commands.add_parser("verify", help="check every shard against dataset.json; non-zero exit on a mismatch")
    verify.add_argument("dataset")
    verify.add_argument("--workers", type=int, default=1, help="processes checking shards")
    verify.add_argument("--no-decode", action="store_true", help="check sizes, hashes and counts only")
    verify.add_argument("--max-pixels", type=int, default=None, help="pixel limit when decoding (default: the build's)")
    add_trust_arguments(verify)

    stats = commands.add_parser("stats", help="counts, caption length and image size distributions")
    stats.add_argument("dataset")
    stats.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_trust_arguments(stats)

    merge = commands.add_parser("merge", help="finalize a parts build (--num-parts) once every part is done")
    merge.add_argument("dataset")

    tokenizer = commands.add_parser("tokenizer", help="train a WordPiece tokenizer over a dataset's captions")
    tokenizer.add_argument("dataset")
    tokenizer.add_argument("--vocab-size", type=int, required=True)
    tokenizer.add_argument("--out", required=True, help="folder for the Hugging Face tokenizer files")
    add_trust_arguments(tokenizer)

    commands.add_parser(
        "stream", help="print what the loader delivers to every rank (see: stream --help)", add_help=False
    )
    return parser


def run_build(args: argparse.Namespace) -> int:
    from data_tools.build import Options, build
    from data_tools.builders import load

    options = Options(
        out=args.out,
        name=args.name,
        shard_samples=args.shard_samples,
        shard_bytes=args.shard_bytes,
        resize=args.resize,
        quality=args.quality,
        max_pixels=args.max_pixels,
        workers=args.workers,
        num_parts=args.num_parts,
        part=args.part,
        plan_only=args.plan_only,
    )
    options.check()
    return build(load(args.format).make_source(args), options)


def run_stream(argv: Sequence[str]) -> int:
    try:
        stream_cli = importlib.import_module("data_tools.stream_cli")
    except ModuleNotFoundError as err:
        if err.name != "data_tools.stream_cli":
            raise
        raise UserError("stream: not available in this checkout (data_tools/stream_cli.py is missing)") from None
    parser = OneLineParser(prog="python -m data_tools stream")
    stream_cli.add_arguments(parser)
    return stream_cli.run(parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "stream":
        return run_stream(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "build":
        return run_build(args)
    if args.command == "features":
        from data_tools.features import run

        return run(args)
    if args.command == "verify":
        from data_tools.verify import verify

        return verify(
            args.dataset,
            workers=args.workers,
            decode=not args.no_decode,
            max_pixels=args.max_pixels,
            trust=command_trust(args, [args.dataset]),
        )
    if args.command == "stats":
        from data_tools.stats import stats

        return stats(args.dataset, as_json=args.json, trust=command_trust(args, [args.dataset]))
    if args.command == "merge":
        from data_tools.builders import finish_for
        from data_tools.merge import merge

        return merge(args.dataset, finish_for)
    if args.command == "tokenizer":
        from data_tools.wordpiece import train_dataset_tokenizer

        return train_dataset_tokenizer(args.dataset, args.vocab_size, args.out, command_trust(args, [args.dataset]))
    raise AssertionError(args.command)


# run_cli names the program after main's module; under `python -m data_tools` that would be "__main__".
main.__module__ = "data_tools.__main__"


def entry() -> int:
    """Console-script and `python -m` entry: errors for users become one line and exit code 2."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(entry())
