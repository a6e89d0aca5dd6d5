"""README.md states the two commands and the exit-code table; both must match the code. README.md and
docs/*.md name only paths that exist."""

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


def test_readme_cluster_section_holds_the_commands_the_cluster_tests_run():
    """tests/cluster/ submits the README's own command lines (tests/cluster/readme_commands.py reads them
    from README.md); they belong in *Running on a cluster*, and the files they name exist."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]
    for path in set(re.findall(r"\bcluster/[\w./-]+\.(?:sbatch|yaml|yml|json)\b", section)):
        assert (REPO / path).is_file(), path
    lines = " ".join(re.findall(r"```bash\n(.*?)```", section, flags=re.S)).replace("\\\n", " ")
    for template in ("pretrain.sbatch", "finetune.sbatch", "build_shards.sbatch"):
        assert len(re.findall(rf"\bsbatch\b[^\n]*cluster/slurm/{template}", lines)) == 1, template
    for option in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"):
        assert option in lines, option
    assert "scancel --signal=USR1 JOBID" in lines
    assert "deepspeed --hostfile hostfile --ssh_port 2222" in lines


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


def test_files_and_links_the_docs_name_exist():
    """The same for docs/*.md: paths in backticks are relative to the repository, links to the page."""
    missing = []
    for page in sorted((REPO / "docs").glob("*.md")):
        text = page.read_text()
        named = {m for m in REPO_PATH.findall(text) if "*" not in m and "<" not in m}
        missing += [f"{page.name}: {p}" for p in named if not (REPO / p.rstrip("/")).exists()]
        missing += [f"{page.name}: {p}" for p in LINK.findall(text) if not (page.parent / p).exists()]
    assert missing == [], f"docs/ names paths that do not exist: {sorted(missing)}"


def _anchors(page) -> set[str]:
    """The anchors GitHub gives a Markdown page's headings (lower case, punctuation dropped, - for space)."""
    return {
        re.sub(r"[^\w\- ]", "", m.strip().lower()).replace(" ", "-")
        for m in re.findall(r"^#+ (.*)$", page.read_text(), flags=re.M)
    }


def test_anchored_links_of_the_readme_and_docs_reach_a_heading():
    broken = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#\s:]*)#([^)\s]+)\)", page.read_text()):
            if anchor not in _anchors(page.parent / target if target else page):
                broken.append(f"{page.name}: {target}#{anchor}")
    assert broken == [], f"links to headings that do not exist: {broken}"


def test_readme_stays_a_front_door():
    """At most 350 lines: records of experiments, benchmark tables and the configuration reference live in
    docs/ (experiments.md, benchmarks.md, configuration.md), linked from the README."""
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 350, "README.md is over 350 lines: move details into a docs/ page and link it"
    for page in ("docs/experiments.md", "docs/benchmarks.md", "docs/configuration.md", "docs/scaling.md"):
        assert f"]({page}" in text, page


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
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
    }
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "python", command
        proc = subprocess.run(
            [sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, f"README command failed: {command}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "runs" / "tiny-ft" / "eval").is_dir() and (tmp_path / "eval-export" / "report.json").is_file()
