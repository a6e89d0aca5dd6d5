"""The controlled comparison of architectures (VOLTA's point: same data, steps, trainer, seeds).

    python bench/architectures.py [--seeds 0 1 2] [--variants single_stream/off ...] [--out bench_out/architectures]

On the synthetic relational scenes, on CPU, with `tiny`-sized models of equal parameter count within
10% (presets `tiny`, `tiny_two_stream`, `tiny_dual_encoder`): for every seed and variant, pretrain,
finetune and evaluate on a held-out set of another seed, exactly as bench/iais_effect.py does (its
machinery: the project's own command lines, one run directory per variant and seed, resumable).
Variants are `<architecture>/<iais>`: single_stream and two_stream with IAIS `off` and with the
official `exp` schedule, and dual_encoder `off` (IAIS is undefined for it). Cross-modal models
pretrain with ITC + ITM + MLM, finetune with the paper's hard-negative recipe and evaluate by rerank;
the dual encoder pretrains and finetunes with ITC only and evaluates by embedding.

Measures R@1/5/10 both ways, relation sensitivity by kind (ITM where the model has it, and by
embedding), ISD (L, V) and ISDa (cross-modal models only), parameters, and pretraining samples/s
(mean over logged steps after the first). Prints one JSON line per run, one per variant with mean
and sample standard deviation, and writes `<out>/table.md`. Sized for under 40 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import iais_effect  # noqa: E402  (the same runner, datasets and flattening)

TINY = str(REPO / "configs" / "tiny.yaml")
PRESETS = {"single_stream": "tiny", "two_stream": "tiny_two_stream", "dual_encoder": "tiny_dual_encoder"}
VARIANTS = ("single_stream/off", "single_stream/exp", "two_stream/off", "two_stream/exp", "dual_encoder/off")
ITC_ONLY = ("objectives.itm=false", "objectives.mlm=false", "finetune.recipe=itc", "finetune.eval_mode=embedding")
COLUMNS = (
    "parameters",
    "samples_per_second",
    "recall/i2t@1",
    "recall/i2t@5",
    "recall/i2t@10",
    "recall/t2i@1",
    "recall/t2i@5",
    "recall/t2i@10",
    "relation/attribute",
    "relation/relation",
    "relation_embedding/attribute",
    "relation_embedding/relation",
    "isd/L",
    "isd/V",
    "isda",
)


def _overrides(variant: str) -> list[str]:
    architecture, iais = variant.split("/")
    out = [f"model.preset={PRESETS[architecture]}"]
    if architecture == "dual_encoder":
        out += ITC_ONLY
    return out + iais_effect._iais(iais)


def _samples_per_second(run_dir: Path) -> float | None:
    values = [
        json.loads(line).get("samples_per_second")
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(line).get("kind") == "train" and json.loads(line).get("step", 0) > 1
    ]
    values = [v for v in values if v]
    return statistics.mean(values) if values else None


def _parameters(run_dir: Path) -> int:
    """Parameters of the run's model at its tokenizer's vocabulary (built, not loaded: the count only)."""
    from data_tools.collate import load_tokenizer
    from pretrain.config import load_config
    from pretrain.model import build_model

    cfg = load_config(str(run_dir / "config.yaml"))
    tokenizer = load_tokenizer(Path(cfg.data.paths[0]) / "tokenizer")
    model = build_model(dataclasses.replace(cfg.model, vocab_size=len(tokenizer)))
    return sum(p.numel() for p in model.parameters())


def one_run(args: argparse.Namespace, train: Path, test: Path, seed: int, variant: str) -> dict:
    root = args.out / variant.replace("/", "-") / f"seed{seed}"
    common = [
        f"train.seed={seed}",
        f"data.seed={seed}",
        "metrics.enabled=false",
        "train.log_every=10",
        *_overrides(variant),
    ]
    start = time.perf_counter()
    mode = ["--mode", "embedding"] if variant.startswith("dual_encoder") else ["--mode", "rerank", "--k", str(args.k)]
    report = iais_effect.pretrain_finetune_evaluate(args, root, train, test, common, mode, plots=0)
    pre = root / "pretrain"
    flat = iais_effect._flatten(report)
    flat.update(
        variant=variant,
        seed=seed,
        parameters=_parameters(pre),
        samples_per_second=_samples_per_second(pre),
        seconds=round(time.perf_counter() - start, 1),
    )
    return flat


def summarise(runs: list[dict], variants: list[str]) -> list[dict]:
    return iais_effect.summarise(runs, variants, COLUMNS)


def table(rows: list[dict]) -> str:
    def cell(row: dict, key: str) -> str:
        if key not in row:
            return "-"
        if key == "parameters":
            return f"{row[key]:,.0f}"
        if key == "samples_per_second":
            return f"{row[key]:.0f}"
        return f"{row[key]:.3f} ± {row[key + ':sd']:.3f}"

    head = "| variant | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join("| " + r["variant"] + " | " + " | ".join(cell(r, k) for k in COLUMNS) + " |\n" for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    iais_effect.add_run_arguments(parser, VARIANTS, REPO / "bench_out" / "architectures")
    args = parser.parse_args()
    iais_effect.run_comparison(args, "architectures", one_run, summarise, table)


if __name__ == "__main__":
    main()
