"""Retrieval finetuning on the one loop: hard-negative mining (planted scores), the hinge against a
direct computation, a hinge + IAIS run on 2 ranks under ZeRO 2 that resumes bit for bit after kill -9,
the itc_itm recipe, and the one-line errors for weights of another model."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools.errors import ExitCode
from finetune.candidates import draw_candidates, hardest
from pretrain.metrics import read_jsonl
from tests.conftest import free_port
from tests.pretrain.runs import (
    PYTHON,
    REPO,
    RUN_TIMEOUT_S,
    TINY,
    assert_same_weights,
    build_synthetic,
    env_for,
    kill_all,
    latest_tag,
    logs_text,
    model_state,
    run_ranks,
    start_ranks,
    train_records,
    wait_for_line,
)


def test_candidates_are_distinct_never_the_anchors_image_and_the_hardest_are_kept() -> None:
    pool_image = np.array([0, 0, 1, 1, 2, 3, 4, 5, 5, 6])  # pool entry -> image code
    anchors = [0, 5, 1, -1]
    gens = [torch.Generator().manual_seed(i) for i in range(3)] + [None]  # the last one is a padding slot
    draw = draw_candidates(pool_image, anchors, 6, gens)
    assert draw.valid.tolist() == [True, True, True, False]
    for b in range(3):
        ids = draw.ids[b].tolist()
        assert len(set(ids)) == 6  # distinct
        assert all(pool_image[i] != anchors[b] for i in ids)  # never a caption of the same image
    assert not draw_candidates(pool_image, [0], 9, [torch.Generator().manual_seed(0)]).valid.any()  # too few others
    # planted scores: candidate j of row b scores planted[b, j]; the H highest are kept, ties to the earlier one
    planted = torch.tensor([[0.1, 0.9, 0.3, 0.9, 0.2, 0.8], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0], [0, 0, 0, 0, 0, 1.0]])
    kept = hardest(planted, draw.ids[:3], 3)
    expected = [
        [draw.ids[0][j] for j in (1, 3, 5)],
        [draw.ids[1][j] for j in (0, 1, 2)],
        [draw.ids[2][j] for j in (5, 0, 1)],
    ]
    assert kept.tolist() == [[int(x) for x in row] for row in expected]


def test_draws_are_reproducible_from_their_seed() -> None:
    pool_image = np.arange(50) // 2
    a = draw_candidates(pool_image, [3], 10, [torch.Generator().manual_seed(7)]).ids
    b = draw_candidates(pool_image, [3], 10, [torch.Generator().manual_seed(7)]).ids
    assert torch.equal(a, b)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Path]:
    """A synthetic dataset and a short single-process pretraining run to finetune from."""
    root = tmp_path_factory.mktemp("ft")
    data = build_synthetic(root / "data", samples=48)
    run = root / "pretrain"
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "pretrain",
            "--config",
            TINY,
            f"data.paths=[{data}]",
            f"run.dir={run}",
            "metrics.enabled=false",
            "train.steps=2",
            "data.batch_size=8",
        ],
        cwd=REPO,
        env=env_for(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, run


STEPS = 6
SETTINGS = (
    "zero.stage=2",
    "data.batch_size=4",
    "finetune.candidates=6",
    "finetune.hard=2",
    "train.steps=6",
    "checkpoint.every_steps=2",
    "checkpoint.keep_last=10",
    "train.log_every=1",
    "metrics.enabled=false",
    "iais.schedule=constant",
    "train.lost_rank_timeout_s=60",
)


def _args(data: Path, init: Path, run: Path, *extra: str) -> list[str]:
    # --init between overrides, as the demo writes it: options and overrides may intermix
    return ["--config", TINY, f"data.paths=[{data}]", "--init", str(init), f"run.dir={run}", *SETTINGS, *extra]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_hinge_iais_on_two_ranks_zero2_resumes_bitwise_after_kill9(pretrained, tmp_path: Path) -> None:
    data, init = pretrained
    reference = tmp_path / "reference"
    codes = run_ranks(2, _args(data, init, reference), free_port(), tmp_path / "logs0", module="finetune")
    assert codes == [0, 0], logs_text(tmp_path / "logs0")
    theirs = train_records(reference)
    assert sorted(theirs) == list(range(1, STEPS + 1))
    for record in theirs.values():
        # mean(max(0, margin + sigmoid(s_neg) - sigmoid(s_pos))) with margin 0.2: each term at most 1.2, and
        # a model two pretraining steps old cannot yet put every positive 0.2 above its hardest negatives
        assert 0 < record["loss/hinge"] <= 1.2 and record["loss/iais"] > 0
        assert record["loss/total"] == pytest.approx(record["loss/hinge"] + record["loss/iais"], rel=1e-5)
        assert record["candidates_per_second"] > 0 and record["mining_seconds"] > 0

    run = tmp_path / "run"
    procs = start_ranks(2, _args(data, init, run), free_port(), tmp_path / "logs1", module="finetune")
    wait_for_line(tmp_path / "logs1" / "rank0.log", f"step 3/{STEPS} ", procs)
    kill_all(procs, signal.SIGKILL)
    assert int(latest_tag(run)[4:]) in (2, 3, 4)
    codes = run_ranks(
        2, [*_args(data, init, run), "--resume", "auto"], free_port(), tmp_path / "logs2", module="finetune"
    )
    assert codes == [0, 0], logs_text(tmp_path / "logs2")
    final = f"step{STEPS:08d}"
    assert_same_weights(model_state(reference / "checkpoints" / final), model_state(run / "checkpoints" / final))
    ours = train_records(run)
    for step in theirs:
        for key in ("loss/total", "loss/hinge", "loss/iais", "lr", "grad_norm"):
            assert ours[step][key] == theirs[step][key], (step, key)


@pytest.mark.slow
def test_itc_itm_recipe_trains_itc_and_itm_only(pretrained, tmp_path: Path) -> None:
    data, init = pretrained
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "finetune",
            *_args(
                data,
                init,
                run,
                "finetune.recipe=itc_itm",
                "zero.stage=0",
                "train.steps=2",
                "eval.every_steps=2",
                f"eval.paths=[{data}]",
                "finetune.eval_mode=rerank",
                "finetune.eval_k=4",
            ),
        ],
        cwd=REPO,
        env=env_for(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = train_records(run)[2]
    assert (
        {"loss/itc", "loss/itm", "loss/iais"} <= set(record) and "loss/mlm" not in record and "loss/hinge" not in record
    )
    evals = read_jsonl(run, "eval")  # the retrieval evaluator of the finetuning task, at the last step
    assert [e["step"] for e in evals] == [2]
    assert all(0.0 <= evals[0][f"recall/{d}@{k}"] <= 1.0 for d in ("t2i", "i2t") for k in (1, 5, 10))
    assert evals[0]["recall/t2i@10"] >= evals[0]["recall/t2i@1"]
    assert any(k.startswith("relation/") for k in evals[0])  # relation sensitivity from the samples' negatives


def test_weights_of_another_model_are_one_line_exit_2(pretrained, tmp_path: Path) -> None:
    data, init = pretrained
    proc = subprocess.run(
        [PYTHON, "-m", "finetune", *_args(data, init, tmp_path / "run", "model.width=32")],
        cwd=REPO,
        env=env_for(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == ExitCode.USAGE, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "finetune.init" in lines[0] and "width: 64 (weights) vs 32 (config)" in lines[0], (
        proc.stderr
    )
    assert not (tmp_path / "run").exists()
    proc = subprocess.run(
        [PYTHON, "-m", "finetune", *_args(data, tmp_path / "nowhere", tmp_path / "run")],
        cwd=REPO,
        env=env_for(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == ExitCode.USAGE and len(proc.stderr.strip().splitlines()) == 1 and "nowhere" in proc.stderr
