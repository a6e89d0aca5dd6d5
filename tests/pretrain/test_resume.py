"""Checkpoints and resume with real processes (2 ranks, ZeRO 2, CPU fp32):

- SIGKILL at a random step, then a kill in the middle of a checkpoint save, then `--resume auto`:
  the same losses and final weights, bit for bit, as the run that was never interrupted;
- SIGTERM to one rank: every rank finishes the step, a checkpoint is saved, exit 75, resume continues
  to the same final weights;
- elastic: the 2-rank checkpoint resumes on 1 and on 3 ranks (universal checkpoint conversion), the
  global batch stays 12, and every sample of the epoch is trained exactly once.
"""

from __future__ import annotations

import collections
import random
import shutil
import signal
from pathlib import Path

import pytest

from data_tools.errors import ExitCode
from pretrain.checkpoint import TMP_PREFIX
from pretrain.testing_hooks import KILL_DURING_SAVE_ENV
from tests.conftest import free_port
from tests.pretrain.runs import (
    assert_same_weights,
    base_args,
    build_synthetic,
    kill_all,
    latest_tag,
    logs_text,
    model_state,
    read_keys,
    run_ranks,
    start_ranks,
    train_records,
    wait_all,
    wait_for_line,
)

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

STEPS = 22  # one epoch: 256 samples / (2 ranks x 6), the last batch padded
SETTINGS = (
    "zero.stage=2",
    "data.batch_size=6",
    "train.global_batch_size=12",
    "train.epochs=1",
    "checkpoint.every_steps=3",
    "checkpoint.keep_last=10",
    "train.record_keys=true",
    "schedule.warmup_steps=3",
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return build_synthetic(tmp_path_factory.mktemp("data") / "synthetic")


@pytest.fixture(scope="module")
def reference(synthetic: Path, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run every interrupted one is compared with."""
    run = tmp_path_factory.mktemp("reference") / "run"
    logs = run.parent / "logs"
    codes = run_ranks(2, base_args(synthetic, run, *SETTINGS), free_port(), logs)
    assert codes == [0, 0], logs_text(logs)
    assert latest_tag(run) == f"step{STEPS:08d}"
    return run


def _assert_same_as_reference(run: Path, reference: Path) -> None:
    final = f"step{STEPS:08d}"
    assert latest_tag(run) == final
    assert_same_weights(model_state(reference / "checkpoints" / final), model_state(run / "checkpoints" / final))
    ours, theirs = train_records(run), train_records(reference)
    assert sorted(ours) == sorted(theirs) == list(range(1, STEPS + 1))
    assert theirs[STEPS]["nonfinite_steps"] == 0  # the padded last batch is trained, not skipped
    for step in theirs:
        for key in ("loss/total", "loss/itc", "loss/itm", "loss/mlm", "loss/iais", "lr", "grad_norm"):
            assert ours[step][key] == theirs[step][key], (step, key)


def test_sigkill_anywhere_then_resume_is_bitwise(synthetic: Path, reference: Path, tmp_path: Path) -> None:
    run, args = tmp_path / "run", base_args(synthetic, tmp_path / "run", *SETTINGS, "train.lost_rank_timeout_s=10")
    kill_step = random.Random().randint(4, 10)
    print(f"SIGKILL after step {kill_step}")

    # 1. SIGKILL every rank once step `kill_step` is logged (between checkpoints or right after one).
    procs = start_ranks(2, args, free_port(), tmp_path / "logs1")
    wait_for_line(tmp_path / "logs1" / "rank0.log", f"step {kill_step}/{STEPS} ", procs)
    kill_all(procs, signal.SIGKILL)
    resumed_from = latest_tag(run)
    assert int(resumed_from[4:]) <= kill_step

    # 2. Resume; rank 1 dies in the middle of writing the next checkpoint (its files written, not committed).
    torn = f"step{int(resumed_from[4:]) + 3:08d}"
    procs = start_ranks(
        2, [*args, "--resume", "auto"], free_port(), tmp_path / "logs2", extra_env={1: {KILL_DURING_SAVE_ENV: torn}}
    )
    assert procs[1].wait(timeout=300) == -signal.SIGKILL, logs_text(tmp_path / "logs2")
    kill_all(procs, signal.SIGKILL)
    assert (run / "checkpoints" / (TMP_PREFIX + torn)).is_dir()  # the half-written save is left behind...
    assert latest_tag(run) == resumed_from  # ...and not committed

    # 3. Resume again: the incomplete checkpoint is ignored, the run ends as if never interrupted.
    codes = run_ranks(2, [*args, "--resume", "auto"], free_port(), tmp_path / "logs3")
    assert codes == [0, 0], logs_text(tmp_path / "logs3")
    assert (
        f"resumed from {run / 'checkpoints' / resumed_from} at step {int(resumed_from[4:])}"
        in (tmp_path / "logs3" / "rank0.log").read_text()
    )
    assert not (run / "checkpoints" / (TMP_PREFIX + torn)).exists()  # cleaned by later saves
    _assert_same_as_reference(run, reference)


def test_sigterm_saves_exits_75_and_resume_continues(synthetic: Path, reference: Path, tmp_path: Path) -> None:
    run, args = tmp_path / "run", base_args(synthetic, tmp_path / "run", *SETTINGS)
    procs = start_ranks(2, args, free_port(), tmp_path / "logs1")
    wait_for_line(tmp_path / "logs1" / "rank0.log", f"step 5/{STEPS} ", procs)
    procs[1].send_signal(signal.SIGTERM)  # one rank is told; the all-reduced flag stops both
    codes = wait_all(procs)
    assert codes == [ExitCode.PREEMPTED, ExitCode.PREEMPTED] == [75, 75], logs_text(tmp_path / "logs1")
    log = (tmp_path / "logs1" / "rank0.log").read_text()
    assert "preempted" in log
    stopped = int(latest_tag(run)[4:])
    assert 5 <= stopped < STEPS and f"checkpoint {run / 'checkpoints' / latest_tag(run)}" in log

    codes = run_ranks(2, [*args, "--resume", "auto"], free_port(), tmp_path / "logs2")
    assert codes == [0, 0], logs_text(tmp_path / "logs2")
    assert f"at step {stopped} " in (tmp_path / "logs2" / "rank0.log").read_text()
    _assert_same_as_reference(run, reference)


@pytest.mark.parametrize("world, per_rank, accumulation", [(1, 6, 2), (3, 4, 1)])
def test_elastic_resume_exactly_once(
    synthetic: Path, reference: Path, tmp_path: Path, world: int, per_rank: int, accumulation: int
) -> None:
    source = tmp_path / "source"  # a copy: the conversion writes beside the checkpoint
    shutil.copytree(reference / "checkpoints" / "step00000006", source / "checkpoints" / "step00000006")
    (source / "checkpoints" / "latest").write_text("step00000006\n")
    run = tmp_path / "run"
    args = base_args(synthetic, run, *SETTINGS, "--resume", str(source))
    codes = run_ranks(world, args, free_port(), tmp_path / "logs")
    assert codes == [0] * world, logs_text(tmp_path / "logs")
    log = (tmp_path / "logs" / "rank0.log").read_text()
    assert f"saved by 2 ranks, now {world}" in log
    assert f"global batch 12 = {world} ranks x {per_rank} x {accumulation} accumulation" in log
    assert (source / "checkpoints" / "step00000006.universal").is_dir()

    # Exactly once: the reference's keys before step 6 plus the resumed run's keys of epoch 0.
    before = [key for epoch, step, key in read_keys(reference) if epoch == 0 and step < 6]
    after = [key for epoch, step, key in read_keys(run) if epoch == 0]
    everything = {key for epoch, _, key in read_keys(reference) if epoch == 0}
    counts = collections.Counter(before + after)
    assert len(everything) == 256
    assert set(counts) == everything and max(counts.values()) == 1, counts.most_common(3)
    records, theirs = train_records(run), train_records(reference)
    assert records[STEPS]["samples"] == STEPS * 12
    assert [records[s]["lr"] for s in (7, STEPS)] == [theirs[s]["lr"] for s in (7, STEPS)]  # scheduler restored


@pytest.mark.full_matrix
def test_elastic_resume_zero3_two_to_one(synthetic: Path, tmp_path: Path) -> None:
    """ZeRO 3 converts to a universal checkpoint too (DeepSpeed 0.19.8): 2 ranks -> 1."""
    settings = (
        "zero.stage=3",
        "data.batch_size=6",
        "train.global_batch_size=12",
        "train.steps=6",
        "checkpoint.every_steps=3",
        "train.record_keys=true",
    )
    source = tmp_path / "source"
    codes = run_ranks(2, base_args(synthetic, source, *settings), free_port(), tmp_path / "logs1")
    assert codes == [0, 0], logs_text(tmp_path / "logs1")
    run = tmp_path / "run"
    args = base_args(synthetic, run, *settings, "--resume", str(source / "checkpoints" / "step00000003"))
    codes = run_ranks(1, args, free_port(), tmp_path / "logs2")
    assert codes == [0], logs_text(tmp_path / "logs2")
    assert "saved by 2 ranks, now 1" in (tmp_path / "logs2" / "rank0.log").read_text()
    before = [key for _, step, key in read_keys(source) if step < 3]
    after = [key for _, _, key in read_keys(run)]
    assert len(before) + len(after) == len(set(before + after)) == 6 * 12
