"""A run folder never makes the code import anything (docs/trust.md): `plugins` named only in a run's
saved configuration (its checkpoint's client_state.json and config.yaml) are not imported on resume
(the saved configuration is compared, never loaded: a mismatch is one line, exit 2) nor by a
finetuning start from that run. Also end to end: a `pipe:` dataset trains with data.allow_pipe_from."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from data_tools.errors import ExitCode
from tests.pretrain.runs import PYTHON, REPO, RUN_TIMEOUT_S, base_args, env_for

pytestmark = pytest.mark.slow


def pretrain(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "pretrain", *args],
        cwd=REPO,
        env=env_for(**env),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def piped(tmp_path_factory) -> tuple[Path, Path]:
    """(16 synthetic samples whose shard 1 is `pipe:touch MARK; cat <shard>`, MARK)."""
    from tests.data_tools.conftest import build

    root = tmp_path_factory.mktemp("untrusted_run")
    local, folder, marker = root / "local", root / "piped", root / "PIPE_RAN"
    assert build("build", "synthetic", "--samples", "16", "--shard-samples", "8", "--out", str(local)) == 0
    shutil.copytree(local, folder)
    info = json.loads((folder / "dataset.json").read_text())
    info["shards"][1]["location"] = f"pipe:touch {marker}; cat {folder / info['shards'][1]['location']}"
    (folder / "dataset.json").write_text(json.dumps(info))
    return folder, marker


def planted_run(run: Path, args: list[str], plugin: str, tokenizer: Path) -> None:
    """A run folder with one complete checkpoint whose saved configuration is `args`' plus `plugins: [plugin]`
    (the run state through its own writer; no weights: nothing here may get as far as loading them)."""
    from pretrain.config import load_config
    from pretrain.config_schema import to_dict
    from pretrain.run_state import RunState, TrainState, write_run_state

    preset = args[args.index("--config") + 1]
    overrides = [a for a in args if "=" in a and not a.startswith("--")]
    saved = to_dict(load_config(preset, overrides))
    saved["plugins"] = [plugin]
    checkpoint = run / "checkpoints" / "step00000001"
    checkpoint.mkdir(parents=True)
    write_run_state(
        checkpoint,
        RunState(TrainState(step=1), total_steps=1, global_batch=4, task="pretrain", config=saved, config_hash=""),
    )
    shutil.copytree(tokenizer, checkpoint / "tokenizer")
    (run / "checkpoints" / "latest").write_text(checkpoint.name)
    (run / "config.yaml").write_text(json.dumps(saved))


def test_plugins_named_only_by_a_run_folder_are_never_imported(piped, tmp_path):
    folder, marker = piped
    plugin = f"planted_plugin_{uuid.uuid4().hex[:8]}"  # importable below: an import would create its marker
    plugin_dir, imported = tmp_path / "plugins", tmp_path / "PLUGIN_IMPORTED"
    plugin_dir.mkdir()
    (plugin_dir / f"{plugin}.py").write_text(f"import pathlib\npathlib.Path({str(imported)!r}).touch()\n")
    run = tmp_path / "run"
    args = base_args(folder, run, "train.steps=1", "data.batch_size=4", f"data.allow_pipe_from=[{folder}]")
    planted_run(run, args, plugin, folder / "tokenizer")

    resumed = pretrain([*args, "--resume", "auto"], PYTHONPATH=f"{plugin_dir}:{REPO}")
    assert resumed.returncode == ExitCode.USAGE, resumed.stderr[-3000:]
    line = resumed.stderr.strip()
    assert "\n" not in line and line.startswith("pretrain: error: resume: ") and f"plugins: ['{plugin}'] -> []" in line
    assert not imported.exists()

    from pretrain.weights import find_model_weights

    sys.path.insert(0, str(plugin_dir))
    try:
        weights = find_model_weights(run)  # what `finetune.init=<run>` reads: the saved model section only
    finally:
        sys.path.remove(str(plugin_dir))
    assert weights.model_config is not None
    assert not imported.exists() and plugin not in sys.modules


def test_a_pipe_dataset_trains_only_with_the_opt_in(piped, tmp_path):
    folder, marker = piped
    refused = pretrain(base_args(folder, tmp_path / "refused", "train.steps=1", "data.batch_size=4"))
    assert refused.returncode == ExitCode.DATA and "data.allow_pipe_from=" in refused.stderr, refused.stderr[-3000:]
    assert not marker.exists()
    run = pretrain(
        base_args(folder, tmp_path / "run", "train.steps=1", "data.batch_size=4", f"data.allow_pipe_from=[{folder}]")
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert marker.exists()
