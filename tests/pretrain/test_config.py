"""The configuration schema: presets, overrides, one-line errors with exit code 2, resume identity,
batch geometry, parameter groups and the learning-rate schedule."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from data_tools.errors import ConfigError, ExitCode, run_cli
from pretrain.__main__ import main
from pretrain.checkpoint import RESUME_MUTABLE, check_resume, config_hash, resume_differences
from pretrain.config import apply_override, load_config, save_config, to_dict
from pretrain.run_state import RunState, TrainState, write_run_state
from pretrain.engine import batch_geometry, lr_lambda, param_groups

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def _error_line(capsys, argv: list[str]) -> tuple[int, str]:
    code = run_cli(main, argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("preset", ["tiny", "small", "base", "large"])
def test_presets_validate(preset: str, dataset: Path) -> None:
    cfg = load_config(REPO / "configs" / f"{preset}.yaml", [f"data.paths=[{dataset}]"])
    assert cfg.model.num_layers == {"tiny": 2, "small": 6, "base": 12, "large": 24}[preset]
    assert cfg.data.paths == [str(dataset)]


def test_overrides_are_typed_by_yaml_and_schema(dataset: Path) -> None:
    cfg = load_config(
        TINY,
        [
            f"data.paths={dataset}",
            "optimizer.lr=1e-4",
            "train.steps=7",
            "optimizer.betas=[0.8, 0.9]",
            "optimizer.lr_multipliers={encoder: 0.5}",
            "zero.stage=2",
            "precision=bf16",
            "model.num_layers=3",
            "iais.layers=[0, -1]",
        ],
    )
    assert cfg.optimizer.lr == pytest.approx(1e-4) and isinstance(cfg.optimizer.lr, float)
    assert cfg.train.steps == 7
    assert cfg.optimizer.betas == (0.8, 0.9)
    assert cfg.optimizer.lr_multipliers == {"encoder": 0.5}
    assert (cfg.zero.stage, cfg.precision, cfg.model.num_layers) == (2, "bf16", 3)
    assert cfg.model.width == 64  # the rest of the tiny preset is kept
    assert cfg.iais.layers == [0, -1]
    assert cfg.data.paths == [str(dataset)]  # a bare string for a list field is one element


@pytest.mark.parametrize(
    "override, field, words",
    [
        ("train.bogus=1", "train.bogus", "one of the keys"),
        ("bogus.x=1", "bogus", "one of the keys"),
        ("train.steps=abc", "train.steps", "an integer"),
        ("train.steps=1.5", "train.steps", "an integer"),
        ("optimizer.lr=-1", "optimizer.lr", "> 0"),
        ("optimizer.betas=[0.9]", "optimizer.betas", "2 values"),
        ("zero.stage=4", "zero.stage", "0, 1, 2 or 3"),
        ("precision=fp8", "precision", "'fp32' | 'bf16' | 'fp16'"),
        ("model.preset=huge", "model.preset", "tiny"),
        ("model.num_heads=5", "model.num_heads", "divisor"),
        ("iais.mode=fancy", "iais.mode", "singular"),
        ("train.log_every=0", "train.log_every", ">= 1"),
        ("data.paths=[/nonexistent/relalign]", "data.paths[0]", "dataset.json"),
    ],
)
def test_config_mistakes_are_one_line_and_exit_2(capsys, dataset: Path, override: str, field: str, words: str) -> None:
    argv = ["--config", str(TINY), f"data.paths=[{dataset}]", override]
    code, err = _error_line(capsys, argv)
    assert code == ExitCode.USAGE == 2
    assert len(err.splitlines()) == 1, err
    assert f"config: {field}=" in err and words in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed where CUDA exists")
def test_fp16_without_cuda_is_refused(capsys, dataset: Path) -> None:
    code, err = _error_line(capsys, ["--config", str(TINY), f"data.paths=[{dataset}]", "precision=fp16"])
    assert code == 2 and "config: precision='fp16'" in err and "CUDA" in err and len(err.splitlines()) == 1


def test_missing_config_file_and_bad_yaml(capsys, tmp_path: Path) -> None:
    code, err = _error_line(capsys, ["--config", str(tmp_path / "nope.yaml")])
    assert code == 2 and "nope.yaml" in err and len(err.splitlines()) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    code, err = _error_line(capsys, ["--config", str(bad)])
    assert code == 2 and "not valid YAML" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps({"builder": "x", "arguments": {}, "total_samples": 3}),
        json.dumps({"builder": "x", "arguments": {}, "shards": [], "total_samples": 3}),
    ],
)
def test_malformed_dataset_json_is_a_data_error_before_any_process_group(capsys, tmp_path: Path, content: str) -> None:
    """Defect: a malformed dataset.json was found only after the process group started, with exit 2.
    It is read with the configuration now: one line naming the file, exit 3 (data)."""
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "dataset.json").write_text(content)
    code, err = _error_line(capsys, ["--config", str(TINY), f"data.paths=[{folder}]", f"run.dir={tmp_path / 'run'}"])
    assert code == ExitCode.DATA == 3, err
    assert len(err.splitlines()) == 1 and "data.paths[0]" in err and str(folder / "dataset.json") in err, err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_raw_deepspeed_json_must_exist(capsys, dataset: Path, tmp_path: Path) -> None:
    code, err = _error_line(
        capsys, ["--config", str(TINY), f"data.paths=[{dataset}]", f"zero.deepspeed_config={tmp_path}/ds.json"]
    )
    assert code == 2 and "zero.deepspeed_config" in err


def test_resolved_config_round_trips(dataset: Path, tmp_path: Path) -> None:
    cfg = load_config(TINY, [f"data.paths=[{dataset}]", "optimizer.lr=3e-4", "optimizer.lr_multipliers={visual: 2.0}"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert config_hash(again) == config_hash(cfg)


def test_resume_identity_ignores_mutable_fields_only(dataset: Path) -> None:
    base = load_config(TINY, [f"data.paths=[{dataset}]"])
    mutable = load_config(
        TINY,
        [
            f"data.paths=[{dataset}]",
            "data.workers=2",
            "data.batch_size=4",
            "train.log_every=3",
            "run.dir=/tmp/elsewhere",
            "metrics.port=0",
        ],
    )
    assert resume_differences(to_dict(base), mutable) == []
    assert config_hash(base) == config_hash(mutable)
    changed = load_config(TINY, [f"data.paths=[{dataset}]", "optimizer.lr=5e-5", "zero.stage=2"])
    diffs = resume_differences(to_dict(base), changed)
    assert [d.split(":")[0] for d in diffs] == ["optimizer.lr", "zero.stage"]
    assert "data.workers" in RESUME_MUTABLE


def test_a_field_added_after_the_checkpoint_counts_at_its_default(dataset: Path) -> None:
    cfg = load_config(TINY, [f"data.paths=[{dataset}]"])
    older = to_dict(cfg)
    del older["model"]["gradient_checkpointing"], older["objectives"]["itc"]  # not in the schema back then
    assert resume_differences(older, cfg) == []
    older["model"]["width"] = 32
    assert resume_differences(older, cfg) == ["model.width: 32 -> 64"]


def test_apply_override_rejects_malformed() -> None:
    tree: dict = {"train": {"steps": 1}}
    with pytest.raises(Exception, match="dotted.field=value"):
        apply_override(tree, "train.steps")
    with pytest.raises(ConfigError, match="train.steps"):
        apply_override(tree, "train.steps.x=1")


def _geometry(cfg, world: int):
    return batch_geometry(cfg.data.batch_size, cfg.train.grad_accumulation, world, cfg.train.global_batch_size)


@pytest.mark.parametrize("world, per_rank, accum", [(2, 6, 1), (1, 6, 2), (3, 4, 1), (4, 3, 1), (6, 2, 1)])
def test_global_batch_fixed_across_world_sizes(dataset: Path, world: int, per_rank: int, accum: int) -> None:
    cfg = load_config(TINY, [f"data.paths=[{dataset}]", "data.batch_size=6", "train.global_batch_size=12"])
    geometry = _geometry(cfg, world)
    assert (geometry.per_rank, geometry.accumulation) == (per_rank, accum)
    assert geometry.per_rank * geometry.world_size * geometry.accumulation == 12
    with pytest.raises(ConfigError, match="multiple of the world size 5"):
        _geometry(cfg, 5)


def test_schedule_warmup_then_decay(dataset: Path) -> None:
    cfg = load_config(
        TINY,
        [f"data.paths=[{dataset}]", "schedule.warmup_steps=4", "schedule.decay=linear", "schedule.min_lr_ratio=0.1"],
    )
    f = lr_lambda(cfg.schedule, total_steps=14)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5) and f(14) == pytest.approx(0.1)
    cos = lr_lambda(
        load_config(TINY, [f"data.paths=[{dataset}]", "schedule.warmup_steps=0", "schedule.decay=cosine"]).schedule,
        total_steps=10,
    )
    assert cos(0) == pytest.approx(1.0) and cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0)


def test_schedule_warmup_stable_decay(dataset: Path) -> None:
    """schedule.decay_steps: the peak holds after warm-up, and only the last decay_steps decay."""
    cfg = load_config(
        TINY, [f"data.paths=[{dataset}]", "schedule.warmup_steps=2", "schedule.decay=linear", "schedule.decay_steps=4"]
    )
    f = lr_lambda(cfg.schedule, total_steps=10)
    assert [f(s) for s in range(11)] == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0.0])
    longer = lr_lambda(dataclasses.replace(cfg.schedule, decay_steps=50), total_steps=10)  # longer than the run
    assert longer(2) == pytest.approx(1.0) and longer(6) == pytest.approx(0.5)  # decays after warm-up, as 0 does
    with pytest.raises(ConfigError, match="schedule.decay_steps"):
        load_config(TINY, [f"data.paths=[{dataset}]", "schedule.decay_steps=-1"])


def test_param_groups_decay_and_multipliers(dataset: Path) -> None:
    from pretrain.model import RelAlignModel

    cfg = load_config(
        TINY,
        [
            f"data.paths=[{dataset}]",
            "optimizer.weight_decay=0.05",
            "optimizer.lr_multipliers={visual: 0.1, encoder.layer.0: 0.5}",
        ],
    )
    import dataclasses

    model = RelAlignModel(dataclasses.replace(cfg.model, vocab_size=50))
    groups = param_groups(model, cfg.optimizer)
    by_name = {n: g for g in groups for n in g["names"]}
    assert sorted(by_name) == sorted(n for n, _ in model.named_parameters())
    for name, group in by_name.items():
        param = dict(model.named_parameters())[name]
        no_decay = param.ndim < 2 or "position" in name or "norm" in name.lower()
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
        expected = 0.1 if name.startswith("visual.") else 0.5 if name.startswith("encoder.layer.0.") else 1.0
        assert group["lr"] == pytest.approx(cfg.optimizer.lr * expected), name
    assert any("position" in n for n in by_name)  # the rule is exercised
    bad = load_config(TINY, [f"data.paths=[{dataset}]", "optimizer.lr_multipliers={nothing: 0.1}"])
    with pytest.raises(ConfigError, match="optimizer.lr_multipliers.nothing"):
        param_groups(model, bad.optimizer)


def _fake_checkpoint(root: Path, cfg) -> Path:
    """A committed checkpoint folder as far as resume validation reads it (client_state.json)."""
    tag = root / "checkpoints" / "step00000004"
    tag.mkdir(parents=True)
    write_run_state(
        tag,
        RunState(
            progress=TrainState(step=4),
            total_steps=8,
            global_batch=32,
            task="pretrain",
            config=to_dict(cfg),
            config_hash=config_hash(cfg),
            world_size=2,
        ),
    )
    (root / "checkpoints" / "latest").write_text("step00000004\n")
    return tag


def test_resume_with_changed_training_fields_is_refused(capsys, dataset: Path, tmp_path: Path) -> None:
    saved = load_config(TINY, [f"data.paths=[{dataset}]", "optimizer.lr=1e-3"])
    _fake_checkpoint(tmp_path / "old", saved)
    code, err = _error_line(
        capsys,
        ["--config", str(TINY), f"data.paths=[{dataset}]", "optimizer.lr=2e-3", "--resume", str(tmp_path / "old")],
    )
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "different configuration" in err and "optimizer.lr: 0.001 -> 0.002" in err
    code, err = _error_line(
        capsys, ["--config", str(TINY), f"data.paths=[{dataset}]", "--resume", str(tmp_path / "missing")]
    )
    assert code == 2 and "not a complete checkpoint" in err and len(err.splitlines()) == 1
    torn = tmp_path / "old" / "checkpoints" / ".tmp-step00000008"
    torn.mkdir()
    code, err = _error_line(capsys, ["--config", str(TINY), f"data.paths=[{dataset}]", "--resume", str(torn)])
    assert code == 2 and "incomplete checkpoint" in err


def test_resume_auto_picks_latest_complete_and_ignores_torn(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = load_config(TINY, [f"data.paths=[{dataset}]", f"run.dir={run}", "resume=auto"])
    assert check_resume(cfg) is None  # a fresh run: nothing to resume
    tag = _fake_checkpoint(run, cfg)
    (run / "checkpoints" / ".tmp-step00000008").mkdir()  # a crash during the next save
    (run / "checkpoints" / "step00000012").mkdir()  # no client_state.json: never committed
    assert check_resume(cfg).path == tag and check_resume(cfg).state.progress.step == 4


def test_raw_deepspeed_json_settings_win_and_show_in_config(dataset: Path, tmp_path: Path) -> None:
    from pretrain.engine import EngineSpec, deepspeed_config

    raw = tmp_path / "ds.json"
    raw.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 2, "overlap_comm": True},
                "bf16": {"enabled": True},
                "gradient_clipping": 0.5,
            }
        )
    )
    cfg = load_config(TINY, [f"data.paths=[{dataset}]", "zero.stage=0", f"zero.deepspeed_config={raw}"])
    assert (cfg.zero.stage, cfg.precision) == (2, "bf16")
    spec = EngineSpec(cfg.optimizer, cfg.schedule, cfg.zero, cfg.precision, cfg.train.grad_clip)
    ds = deepspeed_config(spec, _geometry(cfg, 2))
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True
    assert ds["train_batch_size"] == cfg.data.batch_size * 2 and ds["gradient_accumulation_steps"] == 1


def test_checkpoint_deepspeed_cannot_convert_is_one_clear_error(tmp_path: Path) -> None:
    from data_tools.errors import UserError
    from pretrain.checkpoint import convert_to_universal

    broken = tmp_path / "checkpoints" / "step00000003"
    broken.mkdir(parents=True)  # no optimizer shards: nothing DeepSpeed can convert
    with pytest.raises(UserError, match="cannot convert .*step00000003 to a universal checkpoint") as err:
        convert_to_universal(broken, rank=0)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "checkpoints" / "step00000003.universal").exists()
