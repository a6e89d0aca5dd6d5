"""The configuration reference, generated from the schema itself (`python -m finetune config-reference`).

Every section of `pretrain.config.Config`, the sections the entry point declares (`generate(sections)`:
`python -m finetune` passes finetuning's) and one section per objective term
(`pretrain.objectives.config.term_classes`: `objectives.<name>.*`), each field with its type,
default and docstring: the string literal after the field in the dataclass source, read with `ast`
(the convention of STYLE.md: "every field with a one-line docstring"). `docs/configuration.md`
(REFERENCE_FILE) holds a copy of this text between `<!-- config-reference -->` markers;
tests/test_config_reference.py fails when they differ, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing

import yaml

MARK_BEGIN = "<!-- config-reference -->"
MARK_END = "<!-- /config-reference -->"
COMMAND = "python -m finetune config-reference"
REFERENCE_FILE = "docs/configuration.md"
"""Where the committed copy lives, relative to the repository root (README.md links to it)."""


def field_docs(cls: type) -> dict[str, str]:
    """{field name: docstring collapsed to one line} of a dataclass and its dataclass bases (a
    subclass's own docstring wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # defined where no source is available
            continue
        body = next(node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)).body
        for stmt, after in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(after.value.value.split())
    return docs


def _default(field: dataclasses.Field) -> str:
    from pretrain.config_schema import to_dict

    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    text = yaml.safe_dump(to_dict(value), default_flow_style=True, width=1000).strip()
    return f"`{text.removesuffix('...').strip()}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _rows(cls: type, prefix: str) -> list[str]:
    """Table rows `| dotted | type | default | doc |`; a dataclass-typed field expands in place."""
    from pretrain.config_schema import _type_name

    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    rows = []
    if hasattr(cls, "preset") and prefix == "model":
        from pretrain.model.config import PRESETS

        names = _cell(" | ".join(repr(p) for p in PRESETS))
        rows.append(
            f"| `{prefix}.preset` | {names} | `null` | A named shape; the section's other keys override its fields. |"
        )
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        dotted = f"{prefix}.{field.name}"
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            rows += _rows(tp, dotted)
            continue
        rows.append(
            f"| `{dotted}` | {_cell(_type_name(tp))} | {_cell(_default(field))} | {_cell(docs.get(field.name, ''))} |"
        )
    return rows


def _section(title: str, cls: type, prefix: str, note: str = "") -> list[str]:
    summary = " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())
    lines = [
        f"### `{title}`",
        "",
        f"{summary} (`{cls.__module__}.{cls.__qualname__}`){note}",
        "",
        "| field | type | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    return lines + _rows(cls, prefix) + [""]


def generate(sections: dict[str, type] | None = None) -> str:
    """The reference as Markdown (deterministic: the same text for the same code). `sections`: the
    top-level sections an entry point declares (pretrain.config.config_from_dict), e.g. finetuning's."""
    from pretrain.config import Config
    from pretrain.config_schema import _type_name
    from pretrain.objectives.config import ObjectivesConfig, term_classes

    sections = sections or {}

    hints = typing.get_type_hints(Config)
    docs = field_docs(Config)
    out = [
        f"Generated from the schema by `{COMMAND}`. Every key is also a dotted override "
        '(`train.steps=100`, `objectives.itm.weight=0.5`, `"data.paths=[a, b]"`).',
        "",
    ]
    top = ["### top level", "", "| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    for field in dataclasses.fields(Config):
        tp = hints[field.name]
        if tp is ObjectivesConfig:  # its keys are the registered terms: one table each
            sampling = next(f for f in dataclasses.fields(ObjectivesConfig) if f.name == "sampling")
            out += [
                "### `objectives`",
                "",
                "How the enabled terms combine (`pretrain.objectives.composite`).",
                "",
                "| field | type | default | meaning |",
                "| --- | --- | --- | --- |",
                f"| `objectives.sampling` | {_cell(_type_name(typing.get_type_hints(ObjectivesConfig)['sampling']))} | "
                f"{_cell(_default(sampling))} | {_cell(field_docs(ObjectivesConfig)['sampling'])} |",
                "",
            ]
            for name, term in term_classes().items():
                out += _section(
                    f"objectives.{name}",
                    term.Config,
                    f"objectives.{name}",
                    f"; `objectives.{name}=false` is short for `enabled: false`",
                )
        elif dataclasses.is_dataclass(tp):
            out += _section(field.name, tp, field.name)
        elif field.name in sections:
            out += _section(field.name, sections[field.name], field.name, f"; read by `python -m {field.name}`")
        else:
            top.append(
                f"| `{field.name}` | {_cell(_type_name(tp))} | {_cell(_default(field))} | "
                f"{_cell(docs.get(field.name, ''))} |"
            )
    return "\n".join(out + top).rstrip() + "\n"


def write_reference(path: str, sections: dict[str, type] | None = None) -> None:
    """Replace the text between the markers of a Markdown file (REFERENCE_FILE) with the generated reference."""
    from pathlib import Path

    from data_tools.errors import UserError, atomic_write_text

    text = Path(path).read_text(encoding="utf-8")
    if committed_copy(text) is None:
        raise UserError(f"--readme {path}: no {MARK_BEGIN} ... {MARK_END} markers to write between")
    head, rest = text.split(MARK_BEGIN, 1)
    tail = rest.split(MARK_END, 1)[1]
    atomic_write_text(Path(path), f"{head}{MARK_BEGIN}\n{generate(sections)}{MARK_END}{tail}")


write_readme = write_reference  # the name `python -m finetune config-reference --readme PATH` calls


def committed_copy(text: str) -> str | None:
    """The text between a Markdown file's markers (None when they are missing)."""
    if MARK_BEGIN not in text or MARK_END not in text:
        return None
    return text.split(MARK_BEGIN, 1)[1].split(MARK_END, 1)[0].strip("\n") + "\n"
