"""README.md states the two commands and the exit-code table; both must match the code."""
from __future__ import annotations

import re

import pytest

from data_tools.errors import ExitCode
from tests.conftest import REPO


def test_readme_opens_with_demo_and_test_commands():
    text = (REPO / "README.md").read_text()
    first_block = text.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    ci = (REPO / ".ci" / "run").read_text()
    assert ci.rstrip().splitlines()[-1] == "bash scripts/test.sh"


def test_readme_exit_code_table_matches_exit_code_enum():
    text = (REPO / "README.md").read_text()
    table = text.split("## Exit codes", 1)[1].split("##", 1)[0]
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", table, flags=re.M)}
    assert documented == {int(code) for code in ExitCode}


def test_readme_cluster_section_names_what_the_cluster_tests_run():
    text = (REPO / "README.md").read_text()
    section = text.split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]
    for path in set(re.findall(r"\bcluster/[\w./-]+\.(?:sbatch|yaml|yml|json)\b", section)):
        assert (REPO / path).is_file(), path
    slurm_test = (REPO / "tests" / "cluster" / "test_slurm.py").read_text()
    for option in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"):
        assert option in section and f'"{option}"' in slurm_test, option
    assert "scancel --signal=USR1" in section and '"scancel", "--signal=USR1"' in slurm_test
    finetune_test = (REPO / "tests" / "cluster" / "test_slurm_finetune.py").read_text()
    assert "cluster/slurm/finetune.sbatch" in section and "finetune.sbatch" in finetune_test
    for setting in ("finetune.candidates=6", "finetune.hard=2", "data.batch_size=4", 'EVAL_K="8"'):
        assert setting.replace('"', "") in section and setting in finetune_test, setting
    ssh_test = (REPO / "tests" / "cluster" / "test_deepspeed_ssh.py").read_text()
    assert "--hostfile hostfile --ssh_port 2222" in section and '"--ssh_port"' in ssh_test


REPO_PATH = re.compile(r"`((?:data_tools|pretrain|finetune|cluster|configs|bench|scripts|docs|tests)/[\w./-]+?)`")
LINK = re.compile(r"\]\(([^)#:]+)\)")


def test_files_and_links_the_readme_names_exist():
    """Every repository path the README names in backticks (a module, template, preset, script...) and
    every relative link exists, so renames cannot leave the README pointing at nothing."""
    text = (REPO / "README.md").read_text()
    named = {m for m in REPO_PATH.findall(text) if "*" not in m and "<" not in m}
    named |= set(LINK.findall(text))
    assert len(named) >= 15  # the pattern still finds the README's paths
    missing = sorted(p for p in named if not (REPO / p.rstrip("/")).exists())
    assert missing == [], f"README.md names paths that do not exist: {missing}"


def readme_test_commands() -> list[str]:
    """The lines of every ```bash readme-test block of README.md."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash readme-test\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_commands_marked_for_testing_run_on_tiny_inputs(tmp_path):
    import os
    import shlex
    import subprocess
    import sys

    commands = readme_test_commands()
    assert len(commands) >= 8
    (tmp_path / "configs").symlink_to(REPO / "configs")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                                            str(REPO / ".cache" / "torch_extensions"))}
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "python", command
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"README command failed: {command}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "runs" / "tiny-ft" / "eval").is_dir() and (tmp_path / "eval-export" / "report.json").is_file()
