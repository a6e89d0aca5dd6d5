"""The experiment relalign exists for: does IAIS change retrieval, relation sensitivity and ISD?

    python bench/iais_effect.py [--seeds 0 1 2] [--variants off exp constant] [--out bench_out/iais_effect]

On the synthetic relational scenes with the `tiny` preset on CPU, for every seed and variant: pretrain
(ITC + ITM + MLM, IAIS per the variant), finetune with the paper's hard-negative recipe (IAIS per the
variant), and evaluate on a held-out set built with another seed (`--split test`): R@1/5/10 both
ways, relation-sensitivity accuracy by kind (ITM and embedding), ISD (L, V) and ISDa. Variants:
`off` (no IAIS), `exp` (the official schedule, exp(5 (p - 1))), `constant` (full weight from the
start). The seed sets `train.seed` (weights, dropout, sampling) and `data.seed` (data order) alike.
Every stage is the project's own command line (`python -m pretrain | finetune | finetune evaluate`).

Prints one JSON line per run, then one per variant with mean and sample standard deviation, and
writes `<out>/table.md`. Sized for about 30 minutes on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env


def _run(args: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        code = subprocess.run(
            [sys.executable, *args], cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT
        ).returncode
    if code != 0:
        tail = log.read_text()[-2000:]
        raise SystemExit(f"iais_effect: `{' '.join(args[:3])}` failed with exit {code} (log {log}):\n{tail}")


def _dataset(out: Path, samples: int, seed: int, split: str) -> Path:
    if not (out / "dataset.json").is_file():
        _run(
            [
                "-m",
                "data_tools",
                "build",
                "synthetic",
                "--samples",
                str(samples),
                "--seed",
                str(seed),
                "--split",
                split,
                "--out",
                str(out),
            ],
            out.parent / f"build-{out.name}.log",
        )
    return out


def _iais(variant: str) -> list[str]:
    if variant == "off":
        return ["iais.enabled=false"]
    return ["iais.enabled=true", f"iais.schedule={variant}"]


def pretrain_finetune_evaluate(
    args: argparse.Namespace,
    root: Path,
    train: Path,
    test: Path,
    common: list[str],
    evaluation: list[str],
    plots: int = 1,
) -> dict:
    """The three command lines of one run (each skipped when its output exists: resumable), -> report.json."""
    pre, ft = root / "pretrain", root / "finetune"
    if not (pre / "checkpoints" / "latest").is_file():
        _run(
            [
                "-m",
                "pretrain",
                "--config",
                TINY,
                f"data.paths=[{train}]",
                f"run.dir={pre}",
                f"train.steps={args.pretrain_steps}",
                *common,
            ],
            root / "pretrain.log",
        )
    if not (ft / "checkpoints" / "latest").is_file():
        _run(
            [
                "-m",
                "finetune",
                "--config",
                TINY,
                "--init",
                str(pre),
                f"data.paths=[{train}]",
                f"run.dir={ft}",
                f"train.steps={args.finetune_steps}",
                f"finetune.candidates={args.candidates}",
                f"finetune.hard={args.hard}",
                *common,
            ],
            root / "finetune.log",
        )
    report = root / "eval" / "report.json"
    if not report.is_file():
        _run(
            [
                "-m",
                "finetune",
                "evaluate",
                str(ft),
                "--data",
                str(test),
                *evaluation,
                "--out",
                str(root / "eval"),
                "--plots",
                str(plots),
                "--no-progress",
            ],
            root / "evaluate.log",
        )
    return json.loads(report.read_text())


def one_run(args: argparse.Namespace, train: Path, test: Path, seed: int, variant: str) -> dict:
    root = args.out / f"{variant}-seed{seed}"
    common = [
        f"train.seed={seed}",
        f"data.seed={seed}",
        "metrics.enabled=false",
        "train.log_every=25",
        f"data.batch_size={args.batch}",
        *_iais(variant),
    ]
    start = time.perf_counter()
    report = pretrain_finetune_evaluate(args, root, train, test, common, ["--mode", "rerank", "--k", str(args.k)])
    flat = _flatten(report)
    flat.update(variant=variant, seed=seed, seconds=round(time.perf_counter() - start, 1))
    return flat


def _flatten(report: dict) -> dict:
    """The report's headline numbers under the metric names of finetune.evaluate.flat_metrics."""
    from finetune.evaluate import flat_metrics

    return {k: v for k, v in flat_metrics(report).items() if isinstance(v, (int, float)) or v is None}


def summarise(runs: list[dict], variants: list[str], keys: Sequence[str] | None = None) -> list[dict]:
    """Mean and sample sd per variant of `keys` (default: every recall, relation and ISD figure; on synthetic
    scenes also the recall counting any true caption, `recall_any_true/`)."""
    if keys is None:
        keys = sorted({k for r in runs for k in r if k.startswith(("recall/", "recall_any_true/", "relation/", "isd"))})
    rows = []
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        row: dict = {"variant": variant, "seeds": len(mine)}
        for key in keys:
            values = [r[key] for r in mine if r.get(key) is not None]
            if values:
                row[key] = round(statistics.mean(values), 4)
                row[key + ":sd"] = round(statistics.stdev(values), 4) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k not in ("variant", "seeds") and not k.endswith(":sd")]
    head = "| variant | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
    body = "".join(
        "| "
        + r["variant"]
        + " | "
        + " | ".join(f"{r[k]:.3f} ± {r[k + ':sd']:.3f}" if k in r else "-" for k in keys)
        + " |\n"
        for r in rows
    )
    return head + body


def add_run_arguments(parser: argparse.ArgumentParser, variants: Sequence[str], out: Path) -> None:
    """The arguments every pretrain-finetune-evaluate comparison takes (here and bench/architectures.py)."""
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(variants), choices=list(variants))
    parser.add_argument("--train-samples", type=int, default=1024)
    parser.add_argument("--test-samples", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--finetune-steps", type=int, default=30)
    parser.add_argument("--candidates", type=int, default=15)
    parser.add_argument("--hard", type=int, default=3)
    parser.add_argument("--k", type=int, default=16, help="rerank depth of the (cross-modal models') evaluation")
    parser.add_argument("--out", type=Path, default=out)


def run_comparison(
    args: argparse.Namespace,
    name: str,
    one: Callable[..., dict],
    summary: Callable[[list[dict], list[str]], list[dict]],
    render: Callable[[list[dict]], str],
) -> None:
    """Same data for every run (train seed 0, held-out seed 1000), every seed x variant, JSON lines, table.md."""
    args.out.mkdir(parents=True, exist_ok=True)
    train = _dataset(args.out / "train", args.train_samples, 0, "train")
    test = _dataset(args.out / "test", args.test_samples, 1000, "test")
    runs = []
    for seed in args.seeds:
        for variant in args.variants:
            run = one(args, train, test, seed, variant)
            runs.append(run)
            print(json.dumps({"bench": name, **run}), flush=True)
    rows = summary(runs, args.variants)
    for row in rows:
        print(json.dumps({"bench": f"{name}_summary", **row}), flush=True)
    (args.out / "table.md").write_text(render(rows))
    print(f"table: {args.out / 'table.md'}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, ["off", "exp", "constant"], REPO / "bench_out" / "iais_effect")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    run_comparison(args, "iais_effect", one_run, summarise, table)


if __name__ == "__main__":
    main()
