"""Evaluation reports on disk: `<out>/report.json`, `<out>/report.md` (tables) and PNG plots.

Every file is written with `data_tools.errors.atomic_write` (a reader sees the old file or the new
one, never half of one); `report.json` is written last, so its presence means the plots and the
Markdown beside it are complete. Only rank 0 calls `write_report`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_tools.errors import atomic_write, atomic_write_text

from .recall import DIRECTIONS, KS

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.2f}"


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables (recalls and shares in percent)."""
    lines = [
        f"# Evaluation: {report['name']}",
        "",
        f"weights `{report['weights']}`, data `{report['data']}`, mode **{report['mode']}**"
        + (f" (k = {report['k']})" if report["mode"] == "rerank" else "")
        + f", score `{report['score']}`; {report['images']} images, {report['captions']} captions",
        "",
    ]
    recall = report["recall"]
    lines += ["## Retrieval (R@K, %)", "", "| direction | R@1 | R@5 | R@10 |", "|---|---|---|---|"]
    names = {"i2t": "text retrieval (image -> captions)", "t2i": "image retrieval (caption -> images)"}
    for d in DIRECTIONS:
        lines.append(f"| {names[d]} | " + " | ".join(_pct(recall[f"{d}@{k}"]) for k in KS) + " |")
    lines += ["", f"mean {_pct(recall['mean'])}, rsum {recall['rsum']:.2f}", ""]
    if report.get("recall_folds"):
        folds = report["recall_folds"]
        lines += [
            f"{report['folds']}-fold average (COCO 1K protocol): "
            + ", ".join(f"{key} {_pct(folds[key])}" for key in ("i2t@1", "t2i@1", "mean"))
            + f", rsum {folds['rsum']:.2f}",
            "",
        ]
    any_true = report.get("recall_any_true")
    if any_true:
        lines += [
            "Counting any caption true of the image (synthetic scenes: every caption checked against every "
            f"image's shapes; {any_true['true_captions_per_image']:.2f} true captions per image, "
            f"{any_true['own_captions_per_image']:.2f} own): "
            + ", ".join(f"{d} R@{k} {_pct(any_true[f'{d}@{k}'])}" for d in DIRECTIONS for k in KS),
            "",
        ]
    relation = report.get("relation") or {}
    for source, result in relation.items():
        if not result.get("embedding"):
            continue
        lines += [
            f"## Relation sensitivity: {source} (true caption scored higher, %)",
            "",
            "| kind | triples | ITM | embedding |",
            "|---|---|---|---|",
        ]
        for kind, embedding in result["embedding"].items():
            itm = (result.get("itm") or {}).get(kind)  # none for a dual encoder (no ITM)
            lines.append(
                f"| {kind} | {embedding['count']} | {_pct(itm['accuracy']) if itm else '-'} | "
                f"{_pct(embedding['accuracy'])} |"
            )
        lines.append("")
    isd = report.get("isd")
    if isd and isd["layers"]:  # none for a dual encoder (no cross-modal attention to measure)
        lines += [
            f"## ISD and ISDa (eval mode, {isd['mode']} alignment)",
            "",
            "| layer | ISD L | ISD V | ISDa | pairs | annotated pairs |",
            "|---|---|---|---|---|---|",
        ]
        for layer, values in isd["layers"].items():
            lines.append(
                f"| {layer} | {_num(values['L'])} | {_num(values['V'])} | {_num(values['isda'])} | "
                f"{values['pairs']} | {values['isda_pairs']} |"
            )
        lines.append(f"| mean | {_num(isd['L'])} | {_num(isd['V'])} | {_num(isd['isda'])} | | |")
        lines.append("")
    cost = report["cost"]
    lines += [
        "## Cost",
        "",
        "| what | value |",
        "|---|---|",
        f"| ITM pair forwards (gallery) | {cost['pair_forwards']} |",
        f"| ITM pair forwards (relation triples) | {cost['relation_pair_forwards']} |",
        f"| pair scoring seconds | {cost['pair_seconds']:.2f} |",
        f"| pairs per second | {cost['pairs_per_second']:.1f} |",
        f"| wall seconds (whole evaluation) | {cost['wall_seconds']:.2f} |",
        f"| ranks | {cost['world_size']} |",
        "",
    ]
    if report.get("plots"):
        lines += ["## Attention plots", ""] + [f"![{name}]({name})" for name in report["plots"]] + [""]
    return "\n".join(lines)


def write_report(out_dir: str | Path, report: dict[str, Any], plots: dict[str, bytes]) -> Path:
    """Write plots, report.md, then report.json (the commit marker) into `out_dir`; return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in plots.items():
        with atomic_write(out / name, "wb") as fh:
            fh.write(data)
    atomic_write_text(out / REPORT_MD, markdown(report))
    atomic_write_text(out / REPORT_JSON, json.dumps(report, indent=1, sort_keys=False) + "\n")
    return out
