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
    return two_way_loss(
        position_itm_logits(model, TextEncoder(loader.tokenizer, CAPTION_TOKENS), batch, pairs, pairs if single else [])
    )


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


def test_single_replay_keeps_a_drawn_share_of_single_shape_views_and_gates_on_the_full_scenes(scenes):
    loader, batch = scenes
    objective, model, categories = objective_and_model(
        loader, single_steps=3, hold_steps=10, advance_below=0.1, single_replay=0.5
    )
    term = next(t for t in objective.terms if t.name == "position")
    step = 4  # after the single-shape phase
    got = objective(model, batch, Progress(step=step, total_steps=10)).logs["loss/position"].item()
    rng = random.Random(f"position:{step}:{','.join(batch['key'])}")
    pairs = position_pairs(batch, categories, SIZE, rng)
    kept = [rng.random() < 0.5 for _ in pairs]  # the term's draw, after the pairs', from the same generator
    full = [pair for pair, keep in zip(pairs, kept) if not keep]
    single = [pair for pair, keep in zip(pairs, kept) if keep]
    assert full and single  # the fixture's batch mixes both
    encode = TextEncoder(loader.tokenizer, CAPTION_TOKENS)
    rows = two_way_loss(position_itm_logits(model, encode, batch, full + single, single), "none").view(2, -1)
    assert got == pytest.approx(rows.mean().item(), rel=1e-6)
    all_full = two_way_loss(position_itm_logits(model, encode, batch, pairs, [])).item()
    assert abs(got - all_full) > 1e-4  # the replayed views differ from the full scenes
    # the phase's gate reads the full-scene pairs' loss only
    assert term._window[-1].item() == pytest.approx(rows[:, : len(full)].mean().item(), rel=1e-6)


def test_single_replay_must_be_a_fraction_below_1():
    from data_tools.errors import ConfigError
    from pretrain.objectives.position import PositionConfig

    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="single_replay"):
            PositionConfig(single_replay=bad)


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


def gated(**fields):
    from pretrain.objectives.position import Position, PositionConfig

    return Position(PositionConfig(enabled=True, single_steps=1000, hold_steps=2000, advance_below=0.3, **fields))


def feed(term, losses: list[float], step: int) -> list[str]:
    """The losses `loss` would have accumulated since the last logging step, then the logging step `step`."""
    term._window.extend(torch.tensor(x) for x in losses)
    return term.observe(Progress(step=step, total_steps=3000))


def test_advance_below_ends_each_phase_at_the_logging_step_where_it_is_learned():
    term = gated()
    assert feed(term, [0.69, 0.1], step=100) == []  # window mean 0.395: not yet
    assert term.in_phase("single", 150) and term.holds_others(Progress(150, 3000))
    lines = feed(term, [0.25, 0.2], step=200)
    assert len(lines) == 1 and "single-shape phase ended at step 200" in lines[0]
    assert term.in_phase("single", 199) and not term.in_phase("single", 200)  # step 200 is the first full-scene one
    assert term.holds_others(Progress(200, 3000))  # still alone, now on full scenes
    assert feed(term, [0.6] * 3, step=300) == [] and term.holds_others(Progress(350, 3000))
    assert "other terms join" in feed(term, [0.29] * 3, step=400)[0]
    assert term.holds_others(Progress(399, 3000)) and not term.holds_others(Progress(400, 3000))
    assert feed(term, [0.01], step=500) == []  # nothing left to end
    assert term.state_dict() == {"ended": {"single": 200, "hold": 400}}


def test_the_step_limits_bound_the_phases_and_a_resumed_term_continues_them():
    term = gated()
    feed(term, [0.69], step=100)
    assert not term.in_phase("single", 1000) and term.in_phase("hold", 1999) and not term.in_phase("hold", 2000)
    feed(term, [0.1], step=1100)  # the hold's window; the single-shape phase had ended at its limit
    assert term.state_dict() == {"ended": {"single": None, "hold": 1100}}
    resumed = gated()
    resumed.load_state_dict(term.state_dict())
    assert (
        [resumed.in_phase(p, s) for p in ("single", "hold") for s in (999, 1000, 1099, 1100)]
        == [term.in_phase(p, s) for p in ("single", "hold") for s in (999, 1000, 1099, 1100)]
        == [True, False, False, False, True, True, True, False]
    )


def test_fixed_phases_keep_no_state_and_read_nothing():
    from pretrain.objectives.position import Position, PositionConfig

    term = Position(PositionConfig(enabled=True, single_steps=3, hold_steps=5))
    assert feed(term, [0.0], step=2) == [] and term.state_dict() == {}
    assert term.in_phase("single", 2) and not term.in_phase("single", 3) and term.holds_others(Progress(4, 9))
    assert not term.holds_others(Progress(5, 9))


def test_advance_below_must_be_a_loss_below_ln_2():
    from data_tools.errors import ConfigError
    from pretrain.objectives.position import PositionConfig

    for bad in (-0.1, 0.7, 1.0):
        with pytest.raises(ConfigError, match="advance_below"):
            PositionConfig(advance_below=bad)


def test_the_composite_objective_saves_and_restores_the_phase_state(scenes):
    loader, batch = scenes
    objective, model, _ = objective_and_model(loader, single_steps=10, hold_steps=20, advance_below=0.6)
    position = next(t for t in objective.terms if t.name == "position")
    position.ended = {"single": 4, "hold": 8}
    assert objective.state_dict() == {"position": {"ended": {"single": 4, "hold": 8}}}
    fresh, _, _ = objective_and_model(loader, single_steps=10, hold_steps=20, advance_below=0.6)
    before = fresh(model, batch, Progress(step=9, total_steps=30)).logs  # no state: still holding at step 9
    assert set(before) == {"loss/position", "loss/total"}
    fresh.load_state_dict(objective.state_dict())
    logs = fresh(model, batch, Progress(step=9, total_steps=30)).logs  # after the saved hold end: everything
    assert {"loss/position", "loss/itc", "loss/itm", "loss/iais"} <= set(logs)
    model.eval()
    fresh(model, batch, Progress(step=9, total_steps=30))
    position = next(t for t in fresh.terms if t.name == "position")
    assert len(position._window) == 2  # the two training calls only: evaluation does not feed the gate


@pytest.mark.timeout(600)
def test_the_loop_saves_where_the_phases_ended_and_a_resume_continues_from_it(tmp_path):
    """`python -m pretrain` with `advance_below`: every checkpoint's run state (format 2) holds the phase
    ends; a checkpoint that says the hold ended at step 2 resumes with every term from step 3 on, where the
    run that saved it (its window never below 0.05) still trained the position term alone."""
    import json

    from pretrain.run_state import CLIENT_STATE
    from tests.pretrain.runs import PYTHON, base_args, build_synthetic, env_for

    data, run = build_synthetic(tmp_path / "data", samples=96), tmp_path / "run"
    args = base_args(
        data,
        run,
        "train.steps=4",
        "checkpoint.every_steps=2",
        "model.visual_position_std=1.0",
        "data.image_size=32",
        "model.image_size=32",
        "objectives.position.enabled=true",
        "objectives.position.single_steps=1",
        "objectives.position.hold_steps=100",
        "objectives.position.advance_below=0.05",
    )

    def pretrain(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PYTHON, "-m", "pretrain", *args, *extra],
            cwd=REPO,
            env=env_for(),
            capture_output=True,
            text=True,
            timeout=300,
        )

    first = pretrain()
    assert first.returncode == 0, first.stderr[-3000:]
    assert "step 3/4 | position" in first.stderr and "itc" not in first.stderr.split("step 3/4")[1].split("\n")[0]
    step2 = run / "checkpoints" / "step00000002"
    saved = json.loads((step2 / CLIENT_STATE).read_text())
    assert saved["format"] == 2 and saved["objective"] == {"position": {"ended": {"single": None, "hold": None}}}
    saved["objective"]["position"]["ended"]["hold"] = 2
    (step2 / CLIENT_STATE).write_text(json.dumps(saved))
    resumed = pretrain("--resume", str(step2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step3 = resumed.stderr.split("step 3/4 | ")[1].split("\n")[0]
    assert "itc" in step3 and "itm" in step3 and "position" in step3
    final = json.loads((run / "checkpoints" / "step00000004" / CLIENT_STATE).read_text())
    assert final["objective"]["position"]["ended"]["hold"] == 2


def test_the_relation_preset_validates_on_synthetic_scenes_and_refuses_other_data(tmp_path):
    """configs/tiny_relations.yaml (the demo's and bench/iais_effect.py's recipe): the curriculum with phases
    that end when learned; on a dataset without box labels it is one config error naming the field."""
    from data_tools.errors import ConfigError
    from pretrain.config import load_config
    from tests.pretrain.runs import build_synthetic

    preset = REPO / "configs" / "tiny_relations.yaml"
    scenes = build_synthetic(tmp_path / "scenes", samples=16)
    cfg = load_config(preset, [f"data.paths=[{scenes}]"])
    position = cfg.objectives.terms["position"]
    assert position.enabled and 0 < position.advance_below < 0.693
    assert position.single_steps <= position.hold_steps < cfg.train.steps
    assert cfg.model.image_size == cfg.data.image_size == 32
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "dataset.json").write_text(
        (scenes / "dataset.json").read_text().replace('"box_labels"', '"unused_labels"')
    )
    with pytest.raises(ConfigError, match="objectives.position.enabled"):
        load_config(preset, [f"data.paths=[{tmp_path / 'plain'}]"])
