"""The joint pass learns ITM in the `tiny` preset: `python -m pretrain --config configs/tiny.yaml` with nothing
changed but the data and the step count (ITC, ITM, MLM and IAIS together, as the demo and the benchmarks run
them) brings the ITM loss well below its label prior within 600 steps on 2,048 synthetic scenes.

Why it matters: rerank and full retrieval, the hinge finetuning recipe and relation sensitivity all read ITM
scores. An ITM loss at the prior means the head ignores its input: with negatives drawn by ITC similarity
(1-in-3 matched rows) the preset's loss stayed at 0.636 for all 600 steps, and the exported model ranked a
gallery at chance.
"""

from __future__ import annotations

import math
import subprocess
import time
from pathlib import Path

import pytest

import pretrain.objectives.itm as itm_module
from data_tools.errors import ConfigError
from pretrain.objectives import Progress, pretraining_objective
from tests.pretrain.runs import PYTHON, REPO, base_args, build_synthetic, env_for, train_records
from tests.pretrain.test_objectives import _batch, _sections, tiny_model  # noqa: F401 (fixture)

SCENES, STEPS, LAST = 2048, 600, 100
PRIOR = -(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3)  # 0.6365: cross-entropy of always answering 1-in-3
THRESHOLD = 0.5
# Measured (this machine, one thread): mean ITM loss over the last 100 steps 0.426 (train.seed 0; 0.47 at seed 1
# over every 10th of them); the loss leaves the prior near step 150. With optimizer.lr 1e-3 it left it only near
# step 350 and ended at 0.53-0.56; with hard negatives (also after 300 steps of random ones) it stayed at or went
# back to 0.62-0.64 (docs/experiments.md, ITM in the joint pass).


@pytest.mark.slow
@pytest.mark.timeout(900)  # 600 steps: about 2 min on 2 idle cores
def test_tiny_preset_joint_pass_brings_itm_below_its_label_prior(tmp_path: Path):
    data = build_synthetic(tmp_path / "scenes", samples=SCENES)
    run_dir = tmp_path / "run"
    start = time.perf_counter()
    subprocess.run(
        [PYTHON, "-m", "pretrain", *base_args(data, run_dir, f"train.steps={STEPS}", "checkpoint.every_steps=100000")],
        cwd=REPO,
        env=env_for(),
        check=True,
        capture_output=True,
        timeout=850,
    )
    records = train_records(run_dir)
    itm = [records[step]["loss/itm"] for step in range(STEPS - LAST + 1, STEPS + 1)]
    mean = sum(itm) / len(itm)
    print(
        f"ITM loss, mean of the last {LAST} steps: {mean:.3f} (prior {PRIOR:.3f}), {time.perf_counter() - start:.0f} s"
    )
    assert max(records) == STEPS
    assert mean <= THRESHOLD, f"ITM loss {mean:.3f} over the last {LAST} steps (label prior {PRIOR:.3f})"


def test_hard_negatives_after_draws_uniform_negatives_until_that_step(tiny_model, monkeypatch):  # noqa: F811
    """objectives.itm.hard_negatives_after=N: before step N the negatives ignore the ITC similarities
    (uniform), from step N on they are drawn by them."""
    seen = []
    draw = itm_module.sample_hard_negatives
    monkeypatch.setattr(
        itm_module,
        "sample_hard_negatives",
        lambda similarity, *rest: seen.append(similarity is not None) or draw(similarity, *rest),
    )
    objective = pretraining_objective(_sections(mlm=False, itm={"hard_negatives_after": 3}))
    for step in range(5):
        objective(tiny_model, _batch(), Progress(step, 10))
    assert seen == [False, False, False, True, True]
    with pytest.raises(ConfigError, match="hard_negatives_after"):
        _sections(itm={"hard_negatives_after": -1})
