"""The experiment relalign exists for: does IAIS change retrieval, relation sensitivity and ISD?

    python bench/iais_effect.py [--seeds 0 1 ... 7] [--variants off exp constant] [--out bench_out/iais_effect]

Paired seeds on the synthetic relational scenes with the relation recipe (configs/tiny_relations.yaml: the
tiny model, 32 px scenes, the relation curriculum whose phases end when learned): for every seed and
variant, pretrain (IAIS per the variant), finetune with the paper's hard-negative recipe (IAIS per the
variant), and evaluate on a held-out set built with another seed (`--split test`): R@1/5/10 both ways,
relation-sensitivity accuracy by kind (ITM and embedding), ISD (L, V) and ISDa, and where the curriculum's
phases ended. Variants: `off` (no IAIS), `exp` (the official schedule, exp(5 (p - 1))), `constant` (full
weight from the start). A seed sets `train.seed` (weights, dropout, sampling) and `data.seed` (data
order) alike, so `off` and `exp` at one seed see the same data in the same order from the same weights
(the curriculum's hold, where IAIS waits, is the same run in both).
Every stage is the project's own command line (`python -m pretrain | finetune | finetune evaluate`).

Prints one JSON line per run, then one per variant with mean and sample standard deviation, then one per
IAIS variant with the mean paired difference to `off` and its 95 % interval (Student's t), and writes
`<out>/table.md`. Runs are resumable (a finished stage is skipped), so seeds can run side by side in
separate processes with the same `--out` (build the datasets once first: `--seeds` with one seed). Because
finished runs are skipped, an `--out` keeps the recipe its runs were trained with (`recipe.json`: preset and
its sha256, `--set` overrides, sizes) and a rerun with another one stops with one line naming what differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file: the project's packages beside it

from pretrain.run_config import run_finished  # noqa: E402

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


def _optional(name: str, value: object) -> list[str]:
    """`name=value` when the bench's argument is set; nothing when it is None (the preset's own)."""
    return [] if value is None else [f"{name}={value}"]


def pretrain_finetune_evaluate(
    args: argparse.Namespace,
    root: Path,
    train: Path,
    test: Path,
    common: list[str],
    evaluation: list[str],
    plots: int = 1,
) -> dict:
    """The three command lines of one run (each skipped when its output exists: resumable), -> report.json.
    `args.preset`: the YAML every stage starts from; the step counts, batch size and mining sizes are the
    preset's unless the bench's arguments set them."""
    pre, ft = root / "pretrain", root / "finetune"
    preset = str(REPO / args.preset)
    sizes = [*_optional("data.batch_size", args.batch)]
    if not run_finished(pre):
        _run(
            [
                "-m",
                "pretrain",
                "--config",
                preset,
                f"data.paths=[{train}]",
                f"run.dir={pre}",
                *_optional("train.steps", args.pretrain_steps),
                *sizes,
                *args.overrides,
                *common,
            ],
            root / "pretrain.log",
        )
    if not run_finished(ft):
        _run(
            [
                "-m",
                "finetune",
                "--config",
                preset,
                "--init",
                str(pre),
                f"data.paths=[{train}]",
                f"run.dir={ft}",
                *_optional("train.steps", args.finetune_steps),
                *_optional("finetune.candidates", args.candidates),
                *_optional("finetune.hard", args.hard),
                *sizes,
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


def phase_ends(run_dir: Path) -> dict:
    """Where the curriculum's phases ended in a finished run (its last checkpoint's run state), as
    `phase_end/<phase>` (the step; None: at the preset's step limit or no curriculum)."""
    from pretrain.checkpoint import latest_checkpoint
    from pretrain.run_state import read_run_state

    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    ended = read_run_state(checkpoint).progress.objective.get("position", {}).get("ended", {}) if checkpoint else {}
    return {f"phase_end/{phase}": step for phase, step in ended.items()}


def one_run(args: argparse.Namespace, train: Path, test: Path, seed: int, variant: str) -> dict:
    root = args.out / f"{variant}-seed{seed}"
    common = [
        f"train.seed={seed}",
        f"data.seed={seed}",
        "metrics.enabled=false",
        *_iais(variant),
    ]
    start = time.perf_counter()
    report = pretrain_finetune_evaluate(args, root, train, test, common, ["--mode", "rerank", "--k", str(args.k)])
    flat = _flatten(report)
    flat.update(phase_ends(root / "pretrain"))
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


def add_run_arguments(
    parser: argparse.ArgumentParser,
    variants: Sequence[str],
    out: Path,
    preset: str = "configs/tiny.yaml",
    **defaults: object,
) -> None:
    """The arguments every pretrain-finetune-evaluate comparison takes (here and bench/architectures.py);
    `defaults` replaces the default of any of them (`chosen`: of --variants; a size of None: the preset's own)."""
    known = dict(
        seeds=[0, 1, 2],
        chosen=list(variants),
        train_samples=1024,
        test_samples=200,
        batch=16,
        pretrain_steps=150,
        finetune_steps=30,
        candidates=15,
        hard=3,
    )
    known.update(defaults)
    parser.add_argument("--preset", default=preset, help="the YAML every stage starts from (relative to the repo)")
    parser.add_argument("--seeds", type=int, nargs="+", default=known["seeds"])
    parser.add_argument("--variants", nargs="+", default=known["chosen"], choices=list(variants))
    parser.add_argument("--train-samples", type=int, default=known["train_samples"])
    parser.add_argument("--test-samples", type=int, default=known["test_samples"])
    for name in ("batch", "pretrain_steps", "finetune_steps", "candidates", "hard"):
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            default=known[name],
            help="default: the preset's" if known[name] is None else None,
        )
    parser.add_argument("--k", type=int, default=16, help="rerank depth of the (cross-modal models') evaluation")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override of pretraining (repeatable), e.g. objectives.position.hold_steps=3000",
    )
    parser.add_argument("--out", type=Path, default=out)


RECIPE_FILE = "recipe.json"
"""What an --out's runs were trained with; finished runs are skipped, so a rerun must ask for the same."""


def recipe(args: argparse.Namespace) -> dict:
    """Everything that decides a run besides its seed and variant: the preset's bytes, the overrides, the sizes."""
    preset = REPO / args.preset
    sizes = ("train_samples", "test_samples", "batch", "pretrain_steps", "finetune_steps", "candidates", "hard", "k")
    return {
        "preset": args.preset,
        "preset_sha256": hashlib.sha256(preset.read_bytes()).hexdigest() if preset.is_file() else None,
        "overrides": list(args.overrides),
        **{name: getattr(args, name) for name in sizes},
    }


def check_recipe(out: Path, wanted: dict) -> None:
    """Record the recipe in a fresh --out; refuse (one line) an --out whose runs had another one."""
    path = out / RECIPE_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())
        changed = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
        if changed:
            raise SystemExit(
                f"{out}: its runs were trained with another recipe ({', '.join(changed)} differ from "
                f"{path.name}); give another --out, or remove it to start over"
            )
    else:
        path.write_text(json.dumps(wanted, indent=1) + "\n")


def run_comparison(
    args: argparse.Namespace,
    name: str,
    one: Callable[..., dict],
    summary: Callable[[list[dict], list[str]], list[dict]],
    render: Callable[[list[dict]], str],
) -> None:
    """Same data for every run (train seed 0, held-out seed 1000), every seed x variant, JSON lines, table.md."""
    args.out.mkdir(parents=True, exist_ok=True)
    check_recipe(args.out, recipe(args))
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


PAIRED = (
    "recall/rsum",
    "recall/i2t@1",
    "recall/t2i@1",
    "relation/relation",
    "relation/attribute",
    "isd/L",
    "isd/V",
    "isda",
)
"""The figures of the paired comparison (IAIS variant minus `off`, same seed)."""


def paired(runs: list[dict], variants: Sequence[str], keys: Sequence[str] = PAIRED) -> list[dict]:
    """Per variant other than `off`: the mean over seeds of (variant - off) at the same seed, with a 95 %
    confidence interval from Student's t (n - 1 degrees of freedom), for each of `keys`."""
    from scipy import stats

    base = {r["seed"]: r for r in runs if r["variant"] == "off"}
    rows = []
    for variant in (v for v in variants if v != "off"):
        row: dict = {"variant": f"{variant} - off", "pairs": 0}
        for key in keys:
            diffs = [
                r[key] - base[r["seed"]][key]
                for r in runs
                if r["variant"] == variant
                and r["seed"] in base
                and r.get(key) is not None
                and base[r["seed"]].get(key) is not None
            ]
            row["pairs"] = max(row["pairs"], len(diffs))
            if len(diffs) < 2:
                continue
            mean = statistics.mean(diffs)
            half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
            row[key] = round(mean, 4)
            row[key + ":ci95"] = [round(mean - half, 4), round(mean + half, 4)]
        rows.append(row)
    return rows


def paired_table(rows: list[dict], keys: Sequence[str] = PAIRED) -> str:
    head = "| paired difference | pairs | " + " | ".join(keys) + " |\n|---|---|" + "---|" * len(keys) + "\n"
    return head + "".join(
        f"| {r['variant']} | {r['pairs']} | "
        + " | ".join(
            f"{r[k]:+.3f} [{r[k + ':ci95'][0]:+.3f}, {r[k + ':ci95'][1]:+.3f}]" if k in r else "-" for k in keys
        )
        + " |\n"
        for r in rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(
        parser,
        ["off", "exp", "constant"],
        REPO / "bench_out" / "iais_effect",
        preset="configs/tiny_relations.yaml",
        seeds=list(range(8)),
        chosen=["off", "exp"],
        train_samples=8192,
        batch=None,
        pretrain_steps=None,
        finetune_steps=None,
        candidates=None,
        hard=None,
    )
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))

    def summary(runs: list[dict], variants: list[str]) -> list[dict]:
        return summarise(runs, variants) + paired(runs, variants)

    def render(rows: list[dict]) -> str:
        means = [r for r in rows if "seeds" in r]
        diffs = [r for r in rows if "pairs" in r]
        return table(means) + ("\n" + paired_table(diffs) if diffs else "")

    run_comparison(args, "iais_effect", one_run, summary, render)


if __name__ == "__main__":
    main()
