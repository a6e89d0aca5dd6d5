"""`profile.enabled`: a real training run records a few steps with torch.profiler and summarises
where the time goes (pretrain.profiling); the loop reads its logged values only on logged steps."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from pretrain.profiling import _busy_union
from pretrain.train import as_floats
from tests.pretrain.runs import PYTHON, REPO, RUN_TIMEOUT_S, base_args, build_synthetic, env_for, train_records


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return build_synthetic(tmp_path_factory.mktemp("data") / "synthetic", samples=128)


def _train(data: Path, run: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = base_args(data, run, "data.batch_size=8", "checkpoint.at_end=false", *overrides)
    proc = subprocess.run(
        [PYTHON, "-m", "pretrain", *args],
        cwd=REPO,
        env=env_for(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_a_profiled_run_summarises_its_steps_and_trains_the_same(synthetic: Path, tmp_path: Path) -> None:
    plain, profiled = tmp_path / "plain", tmp_path / "profiled"
    _train(synthetic, plain, "train.steps=6")
    _train(synthetic, profiled, "train.steps=6", "profile.enabled=true", "profile.warmup_steps=2", "profile.steps=3")
    # profiling observes: the logged losses are the unprofiled run's
    for step, record in train_records(plain).items():
        assert train_records(profiled)[step]["loss/total"] == record["loss/total"], step

    summary = json.loads((profiled / "profile" / "rank0.json").read_text())
    assert summary["profiled_steps"] == 3 and summary["window_complete"] and summary["device"] == "cpu"
    assert summary["step_ms"] > 0
    ranges = summary["ranges"]
    for name in (
        "data",
        "forward",
        "finite_check",
        "backward",
        "optimizer",
        "iais_loss",
        "term.itc",
        "term.itm",
        "term.mlm",
        "term.iais",
    ):
        assert ranges[f"relalign.{name}"]["calls_per_step"] >= 1, name
    terms = sum(v["host_ms_per_step"] for k, v in ranges.items() if k.startswith("relalign.term."))
    assert 0 < terms <= ranges["relalign.forward"]["host_ms_per_step"]  # the terms nest in the forward
    assert ranges["relalign.iais_loss"]["host_ms_per_step"] <= ranges["relalign.term.iais"]["host_ms_per_step"]
    loop = sum(ranges[f"relalign.{k}"]["host_ms_per_step"] for k in ("forward", "backward", "optimizer"))
    assert loop <= summary["step_ms"]
    tops = summary["top_ops"]
    assert tops and all(not t["name"].startswith(("relalign.", "ProfilerStep")) for t in tops)
    assert sum(t["share"] for t in tops) <= 1.0 and tops[0]["self_ms_per_step"] >= tops[-1]["self_ms_per_step"]
    assert 0 < summary["attention_share"] < 1  # every layer's scaled_dot_product_attention
    reads = summary["scalar_reads_per_step_by_range"]
    # The finite-loss agreement reads its flag with one `.tolist()`, which the profiler does not record as
    # a scalar read (no aten op); tests/pretrain/test_host_syncs.py counts it exactly (one per micro-batch).
    assert reads.get("relalign.finite_check", 0) <= 1.0
    # logged values are read on logged steps only (one stacked read), not per value and step as before
    assert reads.get("outside ranges", 0) <= 1.0
    trace = json.loads((profiled / "profile" / "rank0.trace.json").read_text())
    assert sum(e.get("name", "").startswith("ProfilerStep#") for e in trace["traceEvents"]) == 3


@pytest.mark.slow
def test_a_run_that_ends_inside_the_window_still_writes_its_summary(synthetic: Path, tmp_path: Path) -> None:
    run = tmp_path / "short"
    _train(
        synthetic,
        run,
        "train.steps=3",
        "profile.enabled=true",
        "profile.warmup_steps=2",
        "profile.steps=5",
        "profile.trace=false",
    )
    summary = json.loads((run / "profile" / "rank0.json").read_text())
    assert summary["profiled_steps"] == 1 and summary["window_complete"] is False
    assert not (run / "profile" / "rank0.trace.json").exists()


@pytest.mark.parametrize(
    "override, needle",
    [
        ("profile.steps=0", "profile.steps"),
        ("profile.warmup_steps=0", "profile.warmup_steps"),
        ("profile.enabled=maybe", "profile.enabled"),
        ("optimizer.fused=1", "optimizer.fused"),
    ],
)
def test_bad_profile_settings_name_the_field(synthetic: Path, tmp_path: Path, override: str, needle: str) -> None:
    proc = subprocess.run(
        [PYTHON, "-m", "pretrain", *base_args(synthetic, tmp_path / "r", override)],
        cwd=REPO,
        env=env_for(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_fused_adamw_makes_the_same_update_up_to_rounding(synthetic: Path, tmp_path: Path) -> None:
    records = {}
    for fused in ("false", "true"):
        _train(
            synthetic,
            tmp_path / fused,
            "train.steps=4",
            "zero.stage=2",
            f"optimizer.fused={fused}",
            "optimizer.lr=2e-3",
        )
        records[fused] = train_records(tmp_path / fused)
    assert records["false"][1]["loss/total"] == records["true"][1]["loss/total"]  # same start
    for step in (2, 3, 4):
        assert records["true"][step]["loss/total"] == pytest.approx(records["false"][step]["loss/total"], rel=1e-4)


def test_logged_values_are_read_once_per_device() -> None:
    values = {
        "loss/a": torch.tensor(1.5),
        "loss/b": torch.tensor([2.0]),
        "weight": 0.25,
        "half": torch.tensor(3.0, dtype=torch.bfloat16),
    }
    assert as_floats(values) == {"loss/a": 1.5, "loss/b": 2.0, "weight": 0.25, "half": 3.0}


def test_busy_union_counts_overlapping_kernels_once() -> None:
    assert _busy_union([(0, 10), (5, 15), (20, 30), (22, 25)]) == 25
    assert _busy_union([]) == 0
