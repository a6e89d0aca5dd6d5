"""`objectives.position`, the relation curriculum as a term of the one loop (pretrain/objectives/position.py):
it trains alone for `hold_steps` (the other terms, IAIS included, are not computed), scores single-shape
views for `single_steps` and the full scenes after, draws the same pairs for the same (step, batch) on
any rank or after a resume, and trains the model's ITM head."""

from __future__ import annotations

import random
import subprocess

import pytest
import torch

from data_tools.collate import TextEncoder
from data_tools.curriculum import position_pairs, single_shape_view
from data_tools.loader import DataConfig, Loader
from data_tools.transforms import normalise
from pretrain.config_schema import build
from pretrain.iais import IAISConfig, IAISRegularizer
from pretrain.model import ModelConfig, RelAlignModel
from pretrain.objectives import Progress, build_sections, pretraining_objective
from pretrain.objectives.position import CAPTION_TOKENS, position_itm_logits, two_way_loss
from tests.pretrain.runs import PYTHON, REPO, env_for

SIZE = 32


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> tuple[Loader, dict]:
    out = tmp_path_factory.mktemp("position") / "scenes"
    subprocess.run(
        [PYTHON, "-m", "data_tools", "build", "synthetic", "--samples", "48", "--out", str(out)],
        cwd=REPO,
        env=env_for(),
        check=True,
        capture_output=True,
        timeout=300,
    )
    loader = Loader(
        DataConfig(paths=[str(out)], batch_size=16, image_size=SIZE, max_text_len=16, crop_scale=(1.0, 1.0))
    )
    return loader, next(iter(loader))


def objective_and_model(loader: Loader, **position):
    torch.manual_seed(0)
    model = RelAlignModel(ModelConfig.preset("tiny", vocab_size=len(loader.tokenizer), image_size=SIZE))
    regularizer = IAISRegularizer(IAISConfig(schedule="constant"), model.config.num_layers)
    regularizer.attach(model)
    sections = build_sections({"position": {"enabled": True, **position}, "mlm": False}, build)
    objective = pretraining_objective(sections, regularizer)
    categories = sorted(loader.categories, key=loader.categories.get)
    objective.bind_text(loader.tokenizer, categories)
    return objective, model, categories


def by_hand(model, loader, categories, batch, step: int, single: bool) -> torch.Tensor:
    rng = random.Random(f"position:{step}:{','.join(batch['key'])}")
    pairs = position_pairs(batch, categories, SIZE, rng)
    return two_way_loss(position_itm_logits(model, TextEncoder(loader.tokenizer, CAPTION_TOKENS), batch, pairs, single))


def test_position_trains_alone_while_holding_then_beside_the_others(scenes):
    loader, batch = scenes
    objective, model, categories = objective_and_model(loader, single_steps=1, hold_steps=2, weight=0.5)
    held = objective(model, batch, Progress(step=1, total_steps=10))
    assert set(held.logs) == {"loss/position", "loss/total"}  # ITC, ITM, IAIS not computed
    assert held.total.item() == pytest.approx(0.5 * held.logs["loss/position"].item(), rel=1e-6)
    after = objective(model, batch, Progress(step=2, total_steps=10))
    assert {"loss/position", "loss/itc", "loss/itm", "loss/iais"} <= set(after.logs)
    logs = {k: v.item() for k, v in after.logs.items()}
    expected = 0.5 * logs["loss/position"] + logs["loss/itc"] + logs["loss/itm"] + logs["loss/iais"]
    assert after.total.item() == pytest.approx(expected, rel=1e-5)


def test_single_shape_views_until_single_steps_then_full_scenes(scenes):
    loader, batch = scenes
    objective, model, categories = objective_and_model(loader, single_steps=3, hold_steps=10)
    for step, single in ((2, True), (3, False)):
        got = objective(model, batch, Progress(step=step, total_steps=10)).logs["loss/position"]
        assert got.item() == pytest.approx(by_hand(model, loader, categories, batch, step, single).item(), rel=1e-6)
        other = by_hand(model, loader, categories, batch, step, not single).item()
        assert abs(got.item() - other) > 1e-4  # the views differ


def test_same_step_and_batch_draw_the_same_pairs_and_the_loss_trains_the_itm_head(scenes):
    loader, batch = scenes
    objective, model, _ = objective_and_model(loader)
    first = objective(model, batch, Progress(step=5, total_steps=10))
    again = objective(model, batch, Progress(step=5, total_steps=10))
    assert torch.equal(first.total, again.total)  # a resumed run or another rank draws the same
    first.total.backward()
    assert model.itm.classifier.weight.grad.abs().sum() > 0
    assert model.visual.position.grad.abs().sum() > 0


def test_single_shape_view_of_normalised_pixels_equals_the_uint8_view(scenes):
    loader, batch = scenes
    categories = sorted(loader.categories, key=loader.categories.get)
    pairs = position_pairs(batch, categories, SIZE, random.Random(0))
    assert pairs
    uint8 = single_shape_view(batch, pairs)["pixel_uint8"]
    device_batch = {k: v for k, v in batch.items() if k != "pixel_uint8"} | {
        "pixel_values": normalise(batch["pixel_uint8"])
    }
    normalised = single_shape_view(device_batch, pairs)["pixel_values"]
    assert torch.allclose(normalised, normalise(uint8), atol=1e-6)
    assert not torch.equal(uint8, batch["pixel_uint8"])  # something was painted over


@pytest.mark.timeout(600)
def test_curriculum_in_the_real_loop_on_2_ranks_resumes_bit_for_bit(tmp_path):
    """`python -m pretrain` on 2 ranks (ZeRO 2): the hold phase logs only the position loss, the rest
    joins at hold_steps; SIGKILL after step 3 and `--resume auto` (from the step-2 checkpoint: inside
    the hold, after the single-shape phase) gives the uninterrupted run's losses exactly."""
    import signal

    from tests.conftest import free_port
    from tests.pretrain.runs import (
        base_args,
        build_synthetic,
        kill_all,
        latest_tag,
        logs_text,
        run_ranks,
        start_ranks,
        train_records,
        wait_for_line,
    )

    data = build_synthetic(tmp_path / "data", samples=96)
    common = [
        "train.steps=5",
        "zero.stage=2",
        "model.visual_position_std=1.0",
        "data.image_size=32",
        "model.image_size=32",
        "checkpoint.every_steps=2",
        "objectives.position.enabled=true",
        "objectives.position.single_steps=1",
        "objectives.position.hold_steps=3",
    ]
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    assert run_ranks(2, base_args(data, whole, *common), free_port(), tmp_path / "whole_logs") == [0, 0], logs_text(
        tmp_path / "whole_logs"
    )
    procs = start_ranks(2, base_args(data, parted, *common), free_port(), tmp_path / "first")
    wait_for_line(tmp_path / "first" / "rank0.log", "step 3/5 ", procs)
    kill_all(procs, signal.SIGKILL)
    tag = latest_tag(parted)  # step 2's; step 4's only if the kill came late
    assert tag in ("step00000002", "step00000004")
    codes = run_ranks(2, [*base_args(data, parted, *common), "--resume", "auto"], free_port(), tmp_path / "resumed")
    assert codes == [0, 0], logs_text(tmp_path / "resumed")
    assert f"at step {int(tag[4:])} " in (tmp_path / "resumed" / "rank0.log").read_text()
    a, b = train_records(whole), train_records(parted)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in (1, 2, 3):
        assert {k for k in a[step] if k.startswith("loss/")} == {"loss/position", "loss/total"}
    assert {"loss/itc", "loss/itm", "loss/mlm", "loss/iais", "loss/position"} <= set(a[4])
    for step in a:
        for key in (k for k in a[step] if k.startswith("loss/")):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])
