"""The demo's last word: headline numbers next to chance, and where everything is.

    python scripts/demo_summary.py demo_out

Reads `<out>/finetune/eval/heldout/report.json` (written by `python -m finetune evaluate`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def curriculum_line(run: Path) -> str:
    """Where the relation curriculum's phases ended, from the pretraining run's last checkpoint."""
    try:
        tag = (run / "checkpoints" / "latest").read_text().strip()
        state = json.loads((run / "checkpoints" / tag / "client_state.json").read_text())
    except (OSError, ValueError):
        return "curriculum   (no pretraining checkpoint to read)"
    ended = state.get("objective", {}).get("position", {}).get("ended")
    if not ended:
        return "curriculum   fixed phase ends (objectives.position.advance_below = 0) or none"
    config = state.get("config", {}).get("objectives", {}).get("position", {})

    def end(phase: str, limit: str) -> str:
        step = ended.get(phase)
        return f"step {step}" if step is not None else f"its limit, step {config.get(limit)} (not learned before)"

    return (
        f"curriculum   single-shape position ended at {end('single', 'single_steps')}, position alone at "
        f"{end('hold', 'hold_steps')}; then every objective to step {state.get('total_steps')}"
    )


def main(out: Path) -> int:
    report_path = out / "finetune" / "eval" / "heldout" / "report.json"
    if not report_path.is_file():
        print(f"demo: no evaluation report at {report_path}", file=sys.stderr)
        return 3
    report = json.loads(report_path.read_text())
    recall, images, captions = report["recall"], report["images"], report["captions"]
    print()
    print(
        f"relalign demo: tiny model pretrained with IAIS and the relation curriculum, finetuned (hard negatives + "
        f"IAIS), evaluated on {images} held-out scenes / {captions} captions"
    )
    print(f"{'':24s}{'R@1':>8s}{'R@5':>8s}{'R@10':>8s}   (chance R@1/5/10)")
    # chance: a random ranking puts one of a query's `hits` true items among the first K of `gallery` (mean hits)
    for direction, label, gallery, hits in (
        ("i2t", "text retrieval", captions, captions / images),
        ("t2i", "image retrieval", images, 1.0),
    ):
        numbers = "".join(f"{100 * recall[f'{direction}@{k}']:8.1f}" for k in (1, 5, 10))
        chance = "/".join(f"{100 * min(1.0, k * hits / gallery):.1f}" for k in (1, 5, 10))
        print(f"{label:24s}{numbers}   ({chance})")
    relation = report.get("relation", {}).get("dataset", {}).get("itm", {})
    for kind, values in sorted(relation.items()):
        print(
            f"relation sensitivity, {kind:10s} {100 * values['accuracy']:6.1f}% of {values['count']} triples "
            f"(chance 50%)"
        )
    print(curriculum_line(out / "pretrain"))
    isd = report.get("isd", {})
    isda = isd.get("isda")
    print(
        f"ISD L {isd.get('L', float('nan')):.4f}  V {isd.get('V', float('nan')):.4f}  ISDa "
        f"{'n/a' if isda is None else f'{isda:.4f}'}  (lower: the text's and the image's relations agree)"
    )
    plots = sorted(report_path.parent.glob("*.png"))
    print()
    print(f"report       {report_path.parent / 'report.md'}")
    print(f"plots        {', '.join(str(p) for p in plots[:3])}{' ...' if len(plots) > 3 else ''}")
    print(f"checkpoints  {out / 'pretrain' / 'checkpoints'}  {out / 'finetune' / 'checkpoints'}")
    print(f"export       {out / 'export'}")
    print(f"metrics      {out / 'pretrain' / 'metrics.jsonl'}  {out / 'finetune' / 'metrics.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo_out")))
