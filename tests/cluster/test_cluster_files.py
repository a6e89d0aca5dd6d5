"""The files under cluster/: they parse, the tools that read them accept them, and they name what exists.

DeepSpeed configs go through DeepSpeed's own config parser (and a real engine step per stage),
the accelerate config through accelerate's loader, the Prometheus files through `promtool` (check
and rule unit tests), and every `relalign_*` name in alerts and dashboard must be a series that
pretrain/metrics/names.py declares and the Prometheus exporter exports. The Slurm templates only get a
syntax and directive check here: they run against a real local Slurm in tests/cluster/test_slurm.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import yaml

from data_tools.errors import ExitCode
from pretrain.metrics import MetricsConfig, MetricsLogger
from tests.conftest import REPO, require

CLUSTER = REPO / "cluster"


@pytest.fixture
def promtool() -> str:
    """Prometheus's own checker; absent: skipped outside CI, failed in CI."""
    require(shutil.which("promtool") is not None, "promtool absent (apt: prometheus)")
    return shutil.which("promtool")


def test_every_json_and_yaml_file_parses():
    files = sorted(CLUSTER.rglob("*.json")) + sorted(CLUSTER.rglob("*.yml")) + sorted(CLUSTER.rglob("*.yaml"))
    assert len(files) >= 8
    for path in files:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
        assert isinstance(data, dict), path


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_configs_pass_deepspeeds_parser(stage):
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads((CLUSTER / "deepspeed" / f"zero{stage}.json").read_text())
    # The trainer merges these over the configuration it generates (batch, precision, optimiser).
    parsed = DeepSpeedConfig({**raw, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1})
    assert parsed.zero_optimization_stage == stage
    assert parsed.train_batch_size == 2


@pytest.mark.slow
@pytest.mark.multiprocess
def test_deepspeed_configs_train_a_real_engine():
    """Each ZeRO file drives a real DeepSpeed engine for two steps (one CPU process, gloo)."""
    code = textwrap.dedent("""
        import json, sys, torch, deepspeed
        from pretrain import dist_env
        dist_env.init_distributed(dist_env.detect(), timeout_s=120)
        for stage in range(4):
            raw = json.load(open(f"cluster/deepspeed/zero{stage}.json"))
            raw.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1,
                       optimizer={"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}})
            torch.manual_seed(0)
            model = torch.nn.Linear(8, 1)
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=raw)
            assert engine.zero_optimization_stage() == stage
            losses = []
            for _ in range(2):
                loss = engine(torch.ones(2, 8)).pow(2).mean()  # [batch, 1] -> scalar
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
            assert losses[1] < losses[0], (stage, losses)
            print("stage", stage, "ok", flush=True)
        dist_env.shutdown()
        dist_env.exit_process(0)
    """)
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=environ, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line for line in proc.stdout.splitlines() if line.startswith("stage")] == [
        f"stage {s} ok" for s in range(4)
    ]


def test_accelerate_config_loads_and_points_at_a_zero_file():
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CLUSTER / "accelerate" / "deepspeed.yaml"))
    assert str(config.distributed_type) in ("DEEPSPEED", "DistributedType.DEEPSPEED")
    ds_file = REPO / config.deepspeed_config["deepspeed_config_file"]
    assert ds_file.parent == CLUSTER / "deepspeed" and ds_file.is_file()
    assert config.num_processes >= 1 and not config.use_cpu  # use_cpu would drop the DeepSpeed plugin


def test_hostfile_example_lines_are_host_and_slots():
    lines = [
        line
        for line in (CLUSTER / "deepspeed" / "hostfile.example").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines and all(re.fullmatch(r"\S+ slots=\d+", line) for line in lines)


def exported_metric_names(tmp_path) -> set[str]:
    """Sample names of every series MetricsLogger exports, each series touched once."""
    metrics = MetricsLogger(MetricsConfig(enabled=False, jsonl=False), str(tmp_path), "r", 0, 0)
    step = {f"loss/{o}": 1.0 for o in ("itc", "itm", "mlm", "iais", "hinge", "total")}
    step.update(
        samples=8,
        samples_per_second=1,
        step_seconds=1,
        data_wait_seconds=0,
        lr=1,
        grad_norm=1,
        loss_scale=1,
        iais_weight=1,
        nonfinite_steps=1,
        **{"isd/L": 1, "isd/V": 1},
    )
    metrics.log_step(1, step)
    metrics.log_eval(1, {"loss/itm": 1, "recall/t2i@1": 0.5, "isd/L": 1})
    metrics.add_bad_samples({"decode_error": 1})
    metrics.checkpoint_saved(1.0, ok=True)
    names = {sample.name for family in metrics.registry.collect() for sample in family.samples}
    metrics.close()
    return names


def referenced_metric_names(text: str) -> set[str]:
    return set(re.findall(r"\brelalign_[a-z0-9_]+", text))


def test_alerts_and_dashboard_use_only_exported_names(tmp_path):
    exported = exported_metric_names(tmp_path)
    alerts = referenced_metric_names((CLUSTER / "prometheus" / "alerts.yml").read_text())
    dashboard = json.loads((CLUSTER / "grafana" / "relalign.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    used = referenced_metric_names(exprs)
    assert alerts and used
    assert alerts <= exported, alerts - exported
    assert used <= exported, used - exported
    # the dashboard shows every series except bookkeeping ones
    assert {n for n in exported if not n.endswith("_created")} - used <= {"relalign_samples_total"}


def test_dashboard_panels_are_well_formed():
    dashboard = json.loads((CLUSTER / "grafana" / "relalign.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] and dashboard["title"]
    for panel in dashboard["panels"]:
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"])
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "run"}


def test_scrape_config_targets_the_default_per_rank_ports():
    config = yaml.safe_load((CLUSTER / "prometheus" / "prometheus.yml").read_text())
    port = MetricsConfig().port
    targets = [t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert f"127.0.0.1:{port}" in targets and f"127.0.0.1:{port + 1}" in targets
    assert config["rule_files"] == ["alerts.yml"]


def test_promtool_accepts_config_and_rules(promtool):
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        proc = subprocess.run([promtool, *args], cwd=CLUSTER / "prometheus", capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr


RULE_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'relalign_steps_total{{rank="0",run="stuck"}}'
        values: '0+10x10 100x30'
      - series: 'relalign_steps_total{{rank="0",run="fine"}}'
        values: '0+10x40'
      - series: 'relalign_nonfinite_steps_total{{rank="0",run="stuck"}}'
        values: '0x5 1x35'
      - series: 'relalign_samples_total{{rank="0",run="stuck"}}'
        values: '0+100x40'
      - series: 'relalign_bad_samples_total{{rank="0",run="stuck",reason="decode_error"}}'
        values: '0+5x40'
      - series: 'relalign_bad_samples_total{{rank="0",run="fine",reason="decode_error"}}'
        values: '0x40'
      - series: 'relalign_samples_total{{rank="0",run="fine"}}'
        values: '0+100x40'
    alert_rule_test:
      - eval_time: 8m
        alertname: RelalignNoStepProgress
        exp_alerts: []
      - eval_time: 30m
        alertname: RelalignNoStepProgress
        exp_alerts:
          - exp_labels: {{severity: critical, rank: "0", run: stuck}}
            exp_annotations:
              summary: "relalign run stuck rank 0: no optimiser step for 15 minutes"
              description: "A stalled loader, a hung collective or a lost rank.
                Check the job log and the watchdog's message."
      - eval_time: 10m
        alertname: RelalignNonFiniteLoss
        exp_alerts:
          - exp_labels: {{severity: warning, rank: "0", run: stuck}}
            exp_annotations:
              summary: "relalign run stuck: non-finite loss (skipped steps: 1)"
              description: "Steps are being skipped; after train.max_nonfinite in a row the run stops with exit code 4."
      - eval_time: 35m
        alertname: RelalignBadSampleRate
        exp_alerts:
          - exp_labels: {{severity: warning, run: stuck}}
            exp_annotations:
              summary: "relalign run stuck: 5% of samples are bad"
              description: "More than 1% of samples are skipped (see relalign_bad_samples_total by reason);
                check the shards with `python -m data_tools verify`."
  - interval: 1m
    input_series:
      - series: 'relalign_checkpoint_last_success_timestamp_seconds{{rank="0",run="old"}}'
        values: '0x300'
      - series: 'relalign_checkpoint_last_success_timestamp_seconds{{rank="0",run="new"}}'
        values: '0+60x300'
    alert_rule_test:
      - eval_time: 2h
        alertname: RelalignCheckpointStale
        exp_alerts: []
      - eval_time: 4h
        alertname: RelalignCheckpointStale
        exp_alerts:
          - exp_labels: {{severity: warning, rank: "0", run: old}}
            exp_annotations:
              summary: "relalign run old: no successful checkpoint for 4h 0m 0s"
              description: "A preemption now would lose that much work. Check checkpoint.every_steps and the storage."
"""


def test_alert_rules_fire_on_the_situations_they_name(tmp_path, promtool):
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(RULE_TESTS.format(rules=json.dumps(str(CLUSTER / "prometheus" / "alerts.yml"))))
    proc = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- Slurm scripts (run against a real Slurm in tests/cluster/test_slurm.py) ----------------------
def test_sbatch_files_are_valid_bash_with_the_right_directives():
    for name in ("pretrain.sbatch", "finetune.sbatch", "build_shards.sbatch", "training.sh"):
        proc = subprocess.run(["bash", "-n", str(CLUSTER / "slurm" / name)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    for name in ("pretrain.sbatch", "finetune.sbatch"):
        text = (CLUSTER / "slurm" / name).read_text()
        assert "#SBATCH --signal=USR1@120" in text and "#SBATCH --requeue" in text
        assert 'source "$here/training.sh"' in text
    assert f"PREEMPTED={int(ExitCode.PREEMPTED)}" in (CLUSTER / "slurm" / "training.sh").read_text()
    assert "#SBATCH --array=" in (CLUSTER / "slurm" / "build_shards.sbatch").read_text()


def test_sbatch_output_files_need_no_folder_the_job_would_create():
    """Slurm opens --output before the script runs: a folder in it must already exist at submission, and
    the README submits from a fresh clone, so every output file goes straight into the submit folder."""
    for name in ("pretrain.sbatch", "finetune.sbatch", "build_shards.sbatch"):
        code = [line for line in (CLUSTER / "slurm" / name).read_text().splitlines() if not line.startswith("# ")]
        outputs = re.findall(r"--output=\"?([^\s\"]+)", "\n".join(code))
        assert outputs and all("/" not in o for o in outputs), (name, outputs)


def test_readme_submits_each_template_once_as_typed_from_the_repository_root():
    """The lines tests/cluster/test_slurm*.py submit unchanged: relative template paths, no --output."""
    from tests.cluster.readme_commands import sbatch_command

    for name in ("pretrain.sbatch", "finetune.sbatch", "build_shards.sbatch"):
        argv = sbatch_command(name).argv
        assert f"cluster/slurm/{name}" in argv and not any(a.startswith(("--output", "-o")) for a in argv), argv
