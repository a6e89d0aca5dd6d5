"""One module per input format. Each exposes `add_arguments(parser)` (its own arguments) and
`make_source(args) -> build.Source`: the records to build, or the existing shards and the step that
indexes one (img2dataset), and optionally `finish(out, arguments)` (extra files written before
dataset.json, also set as `Source.finish`). The driver in `data_tools.build` does the rest."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Callable

FORMATS = {
    "coco": "data_tools.builders.coco",
    "karpathy": "data_tools.builders.karpathy",
    "flickr30k-entities": "data_tools.builders.flickr30k_entities",
    "table": "data_tools.builders.table",
    "folder": "data_tools.builders.folder",
    "img2dataset": "data_tools.builders.img2dataset",
    "synthetic": "data_tools.builders.synthetic",
}
"""Format name on the command line -> module."""


def load(name: str) -> ModuleType:
    """The module of format `name` (a key of FORMATS)."""
    return importlib.import_module(FORMATS[name])


def finish_for(name: str) -> Callable[[Any, dict[str, Any]], None] | None:
    """Format `name`'s `finish` step, if it has one (`merge` of a parts build needs it by name); the
    feature cache (data_tools.features, a build but not a format) has its own."""
    if name == "features":
        from data_tools.features import finish

        return finish
    return getattr(load(name), "finish", None)
