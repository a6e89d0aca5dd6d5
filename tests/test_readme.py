"""README.md states the two commands and the exit-code table; both must match the code."""
from __future__ import annotations

import re

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
