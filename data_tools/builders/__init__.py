"""One module per input format. Each exposes `add_arguments(parser)` (its own arguments) and
`make_source(args) -> build.Source` (records to build), and optionally `finish(out, arguments)`
(extra files written before dataset.json) or `build(args, options)` (a format that indexes existing
shards instead of writing new ones). The driver in `data_tools.build` does the rest."""

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
