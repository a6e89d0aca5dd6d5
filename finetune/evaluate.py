"""`python -m finetune evaluate WEIGHTS --data DATASET ...`: retrieval recall, relation sensitivity,
ISD/ISDa and attention plots of a model, written to `<out>/report.json`, `report.md` and PNGs.

WEIGHTS is a run directory (its newest complete checkpoint), a checkpoint folder, or an export
folder (`python -m pretrain export`). The default output is `<run>/eval/<name>` for a run
directory; otherwise `--out` is required. Everything is checked (weights against their config,
dataset, pairs files, images, k) before any scoring, and the report is written by rank 0 only,
each file atomically, so a failed evaluation leaves nothing half-written.

Under torchrun (or any launcher setting RANK/WORLD_SIZE) the process group is started with gloo
and pair scoring is split across ranks (`scoring.PairScorer`); the result equals one process's.

`evaluate_model(model, tokenizer, dataset, ...)` is the same evaluation as a function, for the
training loop: it returns flat metrics ("recall/i2t@1" ... "recall/t2i@10" in 0..1, "recall/mean",
"relation/<kind>", "isd/L", "isd/V", "isda").
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence


from data_tools.errors import ExitCode, OneLineParser, UserError
from data_tools.shard_reader import open_datasets
from data_tools.trust import add_trust_arguments, command_trust

from . import isd_eval, plots, recall, relation, report, scoring
from .eval_data import EvalSet, read_eval_set

DEFAULT_K = 16


@dataclasses.dataclass
class Loaded:
    model: Any
    tokenizer: Any
    run_dir: Path | None
    max_text_len: int | None  # the training run's data.max_text_len, where known
    source: str


def load_for_evaluation(path: str | Path) -> Loaded:
    """A run directory, checkpoint folder or export folder -> model (eval mode), tokenizer, and what
    the evaluation takes from the run (its directory, its data.max_text_len)."""
    from pretrain.weights import find_model_weights, load_model

    path = Path(path)
    if not path.exists():
        raise UserError(f"WEIGHTS {path}: no such file or folder (a run directory, a checkpoint or an export)")
    source = find_model_weights(path)
    model, tokenizer = load_model(source)
    run_dir = path if (path / "checkpoints").is_dir() else None
    max_text_len = None
    if source.run_state is not None:
        max_text_len = (source.run_state.config.get("data") or {}).get("max_text_len")
    return Loaded(model, tokenizer, run_dir, max_text_len, str(source.path))


@dataclasses.dataclass
class Options:
    """What one evaluation measures (the command line's flags; `evaluate_model`'s keywords)."""

    mode: str = "full"
    k: int = DEFAULT_K
    score: str = "logit"
    batch_size: int = 128
    layers: list[int] | None = None  # None: the last layer
    iais_mode: str = "singular"
    normalization: str = "softmax"
    plots: int = 4
    folds: int | None = None  # None: 5 when the gallery has 5,000 images (COCO 5K -> 1K), else none
    max_text_len: int | None = None
    progress: bool = False

    def check(self, model_config: Any) -> None:
        """Flags against the model: `model_config` is its ModelConfig (architecture, IAIS layer count)."""
        if self.mode not in scoring.MODES:
            raise UserError(f"--mode {self.mode}: expected one of {' | '.join(scoring.MODES)}")
        if not model_config.cross_modal and self.mode != "embedding":
            raise UserError(
                f"--mode {self.mode}: model.architecture={model_config.architecture} has no ITM (nothing "
                f"attends across the modalities); use --mode embedding"
            )
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k <= 0:
            raise UserError(f"--k {self.k}: expected an integer >= 1 (candidates re-ranked by ITM per query)")
        if self.score not in scoring.SCORES:
            raise UserError(f"--score {self.score}: expected one of {' | '.join(scoring.SCORES)}")
        if self.batch_size <= 0:
            raise UserError(f"--batch-size {self.batch_size}: expected an integer >= 1")
        if self.plots < 0:
            raise UserError(f"--plots {self.plots}: expected an integer >= 0")
        if self.folds is not None and self.folds <= 0:
            raise UserError(f"--folds {self.folds}: expected an integer >= 1")
        if not model_config.cross_modal:
            return  # no IAIS layers: --layers is not used
        num_layers = model_config.iais_layer_count
        try:
            isd_eval.resolve_layers(self.layers, num_layers)
        except ValueError as err:
            raise UserError(f"--layers {self.layers}: {err} (the model has {num_layers} IAIS layers)") from None


def _visual_input(model) -> tuple[str, int]:
    config = model.config
    return ("features" if config.visual_embedder == "features" else "pixels"), config.image_size


def run_evaluation(
    model,
    tokenizer,
    eval_set: EvalSet,
    options: Options,
    pair_images: list[dict] | None = None,
    pair_triples: list | None = None,
) -> tuple[dict, dict]:
    """The whole evaluation on every rank -> (report dict, {plot name: PNG bytes}).

    The model is put in eval mode for the duration and its training mode and IAIS layers restored.
    """
    model = scoring.unwrap(model)
    options.check(model.config)
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(
            f"tokenizer has {len(tokenizer)} tokens, the model's vocabulary {model.config.vocab_size}: "
            f"not the tokenizer these weights were trained with"
        )
    visual, image_size = _visual_input(model)
    max_text_len = min(options.max_text_len or model.config.max_text_len, model.config.max_text_len)
    cross_modal = model.config.cross_modal
    layers = isd_eval.resolve_layers(options.layers, model.config.iais_layer_count) if cross_modal else []
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        gallery = scoring.score_gallery(
            model,
            eval_set,
            tokenizer,
            mode=options.mode,
            k=options.k,
            batch_size=options.batch_size,
            max_text_len=max_text_len,
            visual=visual,
            image_size=image_size,
            score=options.score,
            progress=options.progress,
        )
        result = recall.recall(gallery.scores_i2t, eval_set.caption_image, gallery.scores_t2i)
        truth = eval_set.caption_truth
        any_true = (
            None
            if truth is None
            else {
                **recall.recall_any_true(gallery.scores_i2t, truth, gallery.scores_t2i),
                "true_captions_per_image": float(truth.sum(dim=1).double().mean()),
                "own_captions_per_image": float(len(eval_set.captions) / max(len(eval_set.images), 1)),
            }
        )
        images = len(eval_set.images)
        folds = options.folds or (5 if images == 5000 else None)
        folded = (
            recall.fold_average(gallery.scores_i2t, eval_set.caption_image, gallery.scores_t2i, folds)
            if folds and folds > 1 and images % folds == 0
            else None
        )
        kw = dict(
            max_text_len=max_text_len,
            visual=visual,
            image_size=image_size,
            batch_size=options.batch_size,
            score=options.score,
            itm=cross_modal,
        )
        relations = {
            "dataset": relation.relation_sensitivity(model, eval_set.images, eval_set.triples, tokenizer, **kw)
        }
        if pair_triples is not None:
            relations["pairs"] = relation.relation_sensitivity(model, pair_images, pair_triples, tokenizer, **kw)
        # A dual encoder has no cross-modal attention: no ISD, no attention plots (reported as null).
        isd = (
            isd_eval.measure(
                model,
                eval_set,
                tokenizer,
                layers=layers,
                max_text_len=max_text_len,
                visual=visual,
                image_size=image_size,
                batch_size=min(options.batch_size, 64),
                mode=options.iais_mode,
                normalization=options.normalization,
            )
            if cross_modal
            else {
                "layers": {},
                "L": None,
                "V": None,
                "isda": None,
                "mode": options.iais_mode,
                "normalization": options.normalization,
            }
        )
        figures = {}
        if cross_modal and options.plots and scoring.rank_and_world()[0] == 0:
            figures = plots.attention_plots(
                model,
                eval_set,
                tokenizer,
                count=options.plots,
                layer=layers[-1],
                max_text_len=max_text_len,
                visual=visual,
                image_size=image_size,
                mode=options.iais_mode,
                normalization=options.normalization,
            )
    finally:
        model.train(was_training)
    wall = time.perf_counter() - start
    relation_forwards = sum(r["pair_forwards"] for r in relations.values())
    report_dict = {
        "mode": options.mode,
        "k": options.k,
        "score": options.score,
        "images": images,
        "captions": len(eval_set.captions),
        "bad_samples": eval_set.bad_samples,
        "recall": result,
        "folds": folds if folded else None,
        "recall_folds": folded,
        "recall_any_true": any_true,
        "relation": {name: {"itm": r["itm"], "embedding": r["embedding"]} for name, r in relations.items()},
        "isd": {**isd, "layers": {str(k): v for k, v in isd["layers"].items()}},
        "cost": {
            "pair_forwards": gallery.pair_forwards,
            "relation_pair_forwards": relation_forwards,
            "pair_seconds": gallery.pair_seconds,
            "pairs_per_second": gallery.pair_forwards / gallery.pair_seconds if gallery.pair_seconds else 0.0,
            "scoring_seconds": gallery.seconds,
            "wall_seconds": wall,
            "world_size": scoring.rank_and_world()[1],
        },
        "plots": sorted(figures),
    }
    return report_dict, figures


def flat_metrics(report_dict: dict[str, Any]) -> dict[str, float]:
    """The report's headline numbers under metric names (recalls and shares in 0..1)."""
    out = {f"recall/{key}": value for key, value in report_dict["recall"].items() if key != "rsum"}
    out["recall/rsum"] = report_dict["recall"]["rsum"]
    for key, value in (report_dict.get("recall_any_true") or {}).items():  # synthetic scenes only
        if "@" in key or key == "mean":
            out[f"recall_any_true/{key}"] = value
    for source, result in report_dict["relation"].items():
        prefix = "relation" if source == "dataset" else f"relation_{source}"
        for kind, values in result["itm"].items():
            out[f"{prefix}/{kind}"] = values["accuracy"]
        for kind, values in result["embedding"].items():
            out[f"{prefix}_embedding/{kind}"] = values["accuracy"]
    isd = report_dict["isd"]
    if isd["L"] is not None:  # None for a dual encoder (no cross-modal attention)
        out["isd/L"], out["isd/V"] = isd["L"], isd["V"]
    if isd["isda"] is not None:
        out["isda"] = isd["isda"]
    out["eval/pair_forwards"] = float(report_dict["cost"]["pair_forwards"])
    out["eval/seconds"] = report_dict["cost"]["wall_seconds"]
    return out


def evaluate_model(model, tokenizer, dataset: str | Path | EvalSet, **options: Any) -> dict[str, float]:
    """Evaluate `model` on `dataset` (a folder or an EvalSet); flat metrics (see `flat_metrics`).

    Keywords are `Options` fields (mode, k, score, batch_size, layers, plots=0 by default here, ...);
    `out_dir` additionally writes the report there (rank 0).
    """
    out_dir = options.pop("out_dir", None)
    trust = options.pop("trust", None)  # the run's data.allow_pipe_from / data.remote_allow (data_tools.trust)
    options.setdefault("plots", 0)
    opts = Options(**options)
    inner = scoring.unwrap(model)
    if not isinstance(dataset, EvalSet):
        visual, image_size = _visual_input(inner)
        dataset = read_eval_set(dataset, image_size=image_size, visual=visual, trust=trust)
    report_dict, figures = run_evaluation(inner, tokenizer, dataset, opts)
    if out_dir is not None and scoring.rank_and_world()[0] == 0:
        report_dict.update(name=Path(out_dir).name, weights="(in memory)", data=dataset.name)
        report.write_report(out_dir, report_dict, figures)
    return flat_metrics(report_dict)


# --- command line ----------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m finetune evaluate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("weights", help="run directory, checkpoint folder or export folder")
    p.add_argument("--data", required=True, help="dataset folder (dataset.json, shards) to evaluate on")
    p.add_argument("--mode", default="full", help="full (ITM of every pair, default) | rerank | embedding")
    p.add_argument("--k", type=int, default=DEFAULT_K, help="rerank: candidates per query re-scored by ITM")
    p.add_argument("--score", default="logit", help="ITM score: logit (log-odds, default) | prob (softmax p(matched))")
    p.add_argument("--pairs", nargs="+", default=None, metavar="FILE", help="SugarCrepe-format files (stem = kind)")
    p.add_argument("--images", default=None, help="folder of the images the --pairs files name")
    p.add_argument("--out", default=None, help="report folder (default for a run directory: <run>/eval/<name>)")
    p.add_argument("--name", default=None, help="report name (default: <dataset folder>-<mode>)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layers for ISD/ISDa (default: the last, -1)")
    p.add_argument(
        "--iais-mode",
        default="singular",
        choices=("singular", "distributed"),
        help="alignment of the pseudo matrices for ISD and plots",
    )
    p.add_argument("--batch-size", type=int, default=128, help="pairs per ITM forward")
    p.add_argument("--plots", type=int, default=4, help="pairs to plot (0: none)")
    p.add_argument("--folds", type=int, default=None, help="also average recall over N image folds (COCO 1K: 5)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    add_trust_arguments(p)
    return p


def _init_distributed() -> None:
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # env:// from the launcher; pair scores are gathered on CPU


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    options = Options(
        mode=args.mode,
        k=args.k,
        score=args.score,
        batch_size=args.batch_size,
        layers=args.layers,
        iais_mode=args.iais_mode,
        plots=args.plots,
        folds=args.folds,
        progress=not args.no_progress,
    )
    if args.pairs and not args.images:
        raise UserError("--pairs needs --images DIR (the folder of the images the files name)")
    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit {args.limit}: expected an integer >= 1")
    trust = command_trust(args, [args.data])
    open_datasets([args.data], trust=trust)  # dataset.json and its shard locations, before the weights load
    loaded = load_for_evaluation(args.weights)
    model = loaded.model
    options.max_text_len = loaded.max_text_len
    options.check(model.config)
    name = args.name or f"{Path(args.data).name}-{args.mode}" + (f"-k{args.k}" if args.mode == "rerank" else "")
    if args.out:
        out_dir = Path(args.out)
    elif loaded.run_dir is not None:
        out_dir = loaded.run_dir / "eval" / name
    else:
        raise UserError(f"--out is required when WEIGHTS ({args.weights}) is not a run directory")
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        from data_tools.collate import load_tokenizer

        tokenizer = load_tokenizer(Path(args.data) / "tokenizer")
    visual, image_size = _visual_input(model)
    pair_images = pair_triples = None
    if args.pairs:
        if visual != "pixels":
            raise UserError("--pairs needs a model that reads pixels (model.visual_embedder patch or grid)")
        paths, pair_triples = relation.load_sugarcrepe(args.pairs, args.images)
        pair_images = relation.load_images(paths, image_size)
    eval_set = read_eval_set(args.data, image_size=image_size, visual=visual, limit=args.limit, trust=trust)
    _init_distributed()
    report_dict, figures = run_evaluation(model, tokenizer, eval_set, options, pair_images, pair_triples)
    report_dict = {"name": name, "weights": loaded.source, "data": str(args.data), **report_dict}
    if scoring.rank_and_world()[0] == 0:
        report.write_report(out_dir, report_dict, figures)
        r = report_dict["recall"]
        print(
            f"evaluate: {name}: R@1 text {100 * r['i2t@1']:.2f} image {100 * r['t2i@1']:.2f}, rsum "
            f"{r['rsum']:.2f}; {report_dict['cost']['pair_forwards']} pair forwards in "
            f"{report_dict['cost']['wall_seconds']:.1f} s -> {out_dir}",
            file=sys.stderr,
        )
    return int(ExitCode.OK)
