"""A CSV, TSV or Parquet table of image paths and captions.

`build table FILE --image-column C --caption-column C [--root DIR]`: a CSV, TSV or Parquet table
of image paths (relative to --root, default the table's folder) and captions, one row per pair;
rows of the same image merge into one sample through the content-hash dedup."""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow as pa

from data_tools.build import Source, require_dir, require_file
from data_tools.errors import BadSample, UserError
from data_tools.records import Record, inside_folder

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("table", help="CSV, TSV or Parquet file")
    parser.add_argument(
        "--root", default=None, help="folder the image paths are relative to (default: the table's folder)"
    )
    parser.add_argument("--image-column", default="image", help="column with image paths")
    parser.add_argument("--caption-column", default="caption", help="column with captions")
    parser.add_argument("--id-column", default=None, help="column with image ids (default: the image path)")
    parser.add_argument(
        "--table-format", choices=sorted(set(FORMATS.values())), default=None, help="default: from the file extension"
    )
    parser.add_argument("--split", default="", help="split label stored in every sample")


def read_table(path: Path, fmt: str) -> pa.Table:
    """The whole table with every column as text; UserError when it cannot be parsed."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            table = pq.read_table(path)
        else:
            parse = pcsv.ParseOptions(delimiter="\t", quote_char=False) if fmt == "tsv" else pcsv.ParseOptions()
            table = pcsv.read_csv(
                path, parse_options=parse, convert_options=pcsv.ConvertOptions(strings_can_be_null=False)
            )
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"table {path}: unreadable {fmt} file ({err})".replace("\n", " ")) from None
    return table


def make_source(args: argparse.Namespace) -> Source:
    path = require_file(args.table, "table")
    fmt = args.table_format or FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"table {path}: unknown extension {path.suffix!r}; give --table-format csv|tsv|parquet")
    root = require_dir(args.root or path.parent, "--root")
    table = read_table(path, fmt)
    for flag, column in (
        ("--image-column", args.image_column),
        ("--caption-column", args.caption_column),
        ("--id-column", args.id_column),
    ):
        if column is not None and column not in table.column_names:
            raise UserError(f"{flag} {column}: no such column in {path} (columns: {', '.join(table.column_names)})")
    images = [None if v is None else str(v) for v in table.column(args.image_column).to_pylist()]
    captions = [
        v if v is None or isinstance(v, (str, bytes)) else str(v) for v in table.column(args.caption_column).to_pylist()
    ]
    ids = table.column(args.id_column).to_pylist() if args.id_column else images
    width = max(9, len(str(len(images))))

    def records():
        for row, (image, caption, image_id) in enumerate(zip(images, captions, ids)):
            try:
                image_path, error = (str(inside_folder(root, image)) if image else None), None
            except BadSample as bad:
                image_path, error = None, (bad.reason, bad.detail)
            yield Record(
                key=f"{row:0{width}d}",
                origin=f"{path}:row {row} ({image})",
                image_path=image_path,
                error=error,
                image_id=None if image_id is None else str(image_id),
                captions=[caption.strip() if isinstance(caption, str) else caption],
                split=args.split,
            )

    arguments = {
        "table": str(path),
        "root": str(root),
        "image_column": args.image_column,
        "caption_column": args.caption_column,
        "id_column": args.id_column,
        "table_format": fmt,
        "split": args.split,
    }
    return Source("table", arguments, records)
