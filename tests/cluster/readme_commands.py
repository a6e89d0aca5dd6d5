"""The cluster commands README.md tells users to type, read from README.md itself.

The Slurm tests submit these exact command lines (program and arguments unchanged, from a folder laid
out like a fresh clone), so a template that fails the way the README submits it fails a test, and the
README cannot drift from what the tests ran. Only the environment is the test's: the README's
`VAR=value` assignments are applied over it, and a test may replace the values that name this host's
resources (the Prometheus target folder, ports), as the README tells users to.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
from pathlib import Path

from tests.conftest import REPO

README = REPO / "README.md"
CLONED = ("cluster", "configs")
"""What a fresh clone brings that the jobs read from their working directory (the Python packages come
from the installed distribution / PYTHONPATH)."""


@dataclasses.dataclass(frozen=True)
class Command:
    """One command line of a README code block."""

    env: dict[str, str]
    """The leading `VAR=value` assignments."""
    argv: list[str]
    """The program and its arguments, as the shell would split them."""


def readme_commands(text: str | None = None) -> list[Command]:
    """Every command line of the README's ```bash blocks (continuation lines joined, comments dropped)."""
    text = README.read_text(encoding="utf-8") if text is None else text
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            env = {}
            while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
                name, value = tokens.pop(0).split("=", 1)
                env[name] = value
            if tokens:
                commands.append(Command(env, tokens))
    return commands


def sbatch_command(template: str) -> Command:
    """The README's one `sbatch` line that submits cluster/slurm/<template>."""
    found = [c for c in readme_commands() if c.argv[0] == "sbatch" and f"cluster/slurm/{template}" in c.argv]
    assert len(found) == 1, f"README.md should show exactly one `sbatch ... cluster/slurm/{template}` line: {found}"
    return found[0]


def readme_command(program: str, *words: str) -> Command:
    """The README's one line that runs `program` with all of `words` among its arguments."""
    found = [c for c in readme_commands() if c.argv[0] == program and all(w in c.argv for w in words)]
    assert len(found) == 1, f"README.md should show exactly one `{program} {' '.join(words)}` line: {found}"
    return found[0]


def fresh_clone(where: Path) -> Path:
    """A folder laid out like the repository root of a fresh clone (the templates and presets, no logs/,
    no runs/), where a README command is typed."""
    where.mkdir(parents=True, exist_ok=True)
    for name in CLONED:
        shutil.copytree(REPO / name, where / name)
    assert not (where / "logs").exists()
    return where
