"""The demo's closing summary (scripts/demo_summary.py) prints what the evaluation wrote: each relation
sensitivity figure, its triple count, and the recall, read from `<out>/finetune/eval/heldout/report.json`.
The README quotes this output; nothing in it is typed by hand."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

SUMMARY = REPO / "scripts" / "demo_summary.py"


def _report(relation: dict[str, tuple[float, int]]) -> dict:
    """A report.json as `python -m finetune evaluate` writes it, reduced to the keys the summary reads."""
    recall = {f"{d}@{k}": 0.01 * k + (0.002 if d == "t2i" else 0.0) for d in ("i2t", "t2i") for k in (1, 5, 10)}
    itm = {kind: {"accuracy": accuracy, "count": count} for kind, (accuracy, count) in relation.items()}
    return {
        "images": 200,
        "captions": 501,
        "recall": recall,
        "relation": {"dataset": {"itm": itm, "embedding": itm}},
        "isd": {"L": 0.0123, "V": 0.0045, "isda": 0.2031},
    }


def _summary(out: Path, report: dict) -> str:
    folder = out / "finetune" / "eval" / "heldout"
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(report))
    done = subprocess.run(
        [sys.executable, str(SUMMARY), str(out)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _relation_lines(text: str) -> dict[str, tuple[float, int]]:
    """{kind: (percent, triples)} from the summary's `relation sensitivity, <kind> <p>% of <n> triples` lines."""
    found = re.findall(r"^relation sensitivity, (\w+)\s+([\d.]+)% of (\d+) triples", text, flags=re.M)
    return {kind: (float(percent), int(count)) for kind, percent, count in found}


def test_summary_prints_the_relation_figures_of_the_report(tmp_path: Path):
    relation = {"all": (0.7126, 501), "attribute": (0.6827, 249), "relation": (0.7421, 252)}
    text = _summary(tmp_path / "a", _report(relation))
    assert _relation_lines(text) == {kind: (round(100 * acc, 1), n) for kind, (acc, n) in relation.items()}
    other = {"all": (0.4511, 501), "attribute": (0.4498, 249), "relation": (0.4523, 252)}
    assert _relation_lines(_summary(tmp_path / "b", _report(other))) == {
        kind: (round(100 * acc, 1), n) for kind, (acc, n) in other.items()
    }
    assert "R@1" in text and "held-out scenes" in text
    assert re.search(r"^text retrieval\s+1\.0\s+5\.0\s+10\.0", text, flags=re.M), text
    assert "ISD L 0.0123  V 0.0045  ISDa 0.2031" in text


def test_summary_without_a_report_names_the_missing_file(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, str(SUMMARY), str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 3 and "report.json" in done.stderr


def test_summary_says_where_the_curriculum_phases_ended(tmp_path: Path):
    """Read from the pretraining run's last checkpoint: a phase that ended when learned names its step, one
    that reached its limit says so."""
    checkpoint = tmp_path / "pretrain" / "checkpoints" / "step00003000"
    checkpoint.mkdir(parents=True)
    (tmp_path / "pretrain" / "checkpoints" / "latest").write_text("step00003000")
    state = {
        "total_steps": 3000,
        "objective": {"position": {"ended": {"single": 650, "hold": None}}},
        "config": {"objectives": {"position": {"single_steps": 1000, "hold_steps": 2200}}},
    }
    (checkpoint / "client_state.json").write_text(json.dumps(state))
    text = _summary(tmp_path, _report({"relation": (0.7, 10)}))
    assert "single-shape position ended at step 650, position alone at its limit, step 2200" in text
    assert "every objective to step 3000" in text
