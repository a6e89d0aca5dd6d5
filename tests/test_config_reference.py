"""The configuration reference is generated from the schema, and docs/configuration.md holds an exact copy."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing

from finetune.config import SECTIONS
from pretrain.config_reference import (
    COMMAND,
    MARK_BEGIN,
    MARK_END,
    REFERENCE_FILE,
    committed_copy,
    field_docs,
    generate,
)
from tests.conftest import REPO

UNDOCUMENTED: set[str] = set()
"""Fields whose dataclass source has no docstring yet: this list may only shrink."""


def _rows(text: str) -> dict[str, list[str]]:
    """{dotted field: [type, default, meaning]} of every table row."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.replace("\\|", "\x00").strip("|").split("|")]
            rows[cells[0].strip("`")] = [c.replace("\x00", "|") for c in cells[1:]]
    return rows


def test_reference_lists_every_field_of_every_section_with_type_default_and_docstring():
    from finetune.config import FinetuneConfig
    from pretrain.config import Config
    from pretrain.objectives import TERMS

    rows = _rows(generate(SECTIONS))
    hints = typing.get_type_hints(Config)
    expected = set()
    for field in dataclasses.fields(Config):
        section = {"finetune": FinetuneConfig}.get(field.name, hints[field.name])
        if field.name == "objectives":
            expected |= {
                f"objectives.{name}.{f.name}" for name, term in TERMS.items() for f in dataclasses.fields(term.Config)
            }
            expected.add("objectives.sampling")  # a mode beside the terms, not a term
        elif dataclasses.is_dataclass(section):
            expected |= {f"{field.name}.{f.name}" for f in dataclasses.fields(section)}
        else:
            expected.add(field.name)
    assert expected | {"model.preset"} == set(rows)
    assert rows["train.steps"] == ["int", "`0`", "Optimizer steps; 0 = derived from `epochs`."]
    assert rows["iais.layers"][:2] == ["list[int]", "`[-1]`"]
    assert rows["finetune.recipe"][:2] == ["'hard_negative' | 'itc_itm' | 'itc'", "`hard_negative`"]
    assert rows["objectives.itm.hard_negatives"][1] == "`true`"
    assert rows["objectives.sampling"][:2] == ["'joint' | 'per_batch'", "`joint`"]
    assert rows["objectives.itm.weight"][2] == "Its weight in the total loss."  # inherited from TermConfig
    assert rows["finetune.init"][2].startswith("Start from: a pretraining run directory")  # two source lines, one here
    undocumented = {name for name, (_, _, meaning) in rows.items() if not meaning}
    assert undocumented <= UNDOCUMENTED, f"fields without a docstring in their dataclass: {undocumented - UNDOCUMENTED}"


def test_field_docs_reads_the_string_after_each_field_only():
    @dataclasses.dataclass
    class Sample:
        a: int = 1
        """First."""
        b: int = 2
        c: str = "x"
        """Third,
        on two lines."""

    assert field_docs(Sample) == {"a": "First.", "c": "Third, on two lines."}


def test_command_prints_the_reference():
    proc = subprocess.run(
        [sys.executable, "-m", "finetune", "config-reference"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == generate(SECTIONS)


def test_committed_copy_matches_the_generated_reference():
    copy = committed_copy((REPO / REFERENCE_FILE).read_text())
    assert copy is not None, f"{REFERENCE_FILE} lacks the {MARK_BEGIN} ... {MARK_END} markers"
    assert copy == generate(SECTIONS), (
        f"{REFERENCE_FILE}'s configuration reference differs from the schema: "
        f"regenerate it with `{COMMAND} --readme {REFERENCE_FILE}` (or paste "
        f"`{COMMAND}`'s output between {MARK_BEGIN} and {MARK_END})"
    )


def test_readme_links_the_reference_and_holds_no_second_copy():
    readme = (REPO / "README.md").read_text()
    assert f"]({REFERENCE_FILE})" in readme
    assert MARK_BEGIN not in readme, "one copy of the reference: docs/configuration.md"
