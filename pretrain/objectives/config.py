"""The `objectives` configuration section: how the enabled terms combine, and one section per term.

    objectives = ObjectivesConfig.from_tree({"itm": {"weight": 0.5}, "mlm": False}, build)
    objectives.sampling                  # 'joint' | 'per_batch'
    objectives.terms["itm"].weight       # every registered term present, in the order the terms run

The YAML keeps one flat mapping (`objectives.itm.weight`, `objectives.sampling`), so its keys are not
fixed fields: the schema (pretrain.config_schema) builds this section with `from_tree` and writes it
back with `as_tree`. The built-in terms are named here explicitly; a plugin's term is registered by
its module (`plugins:` in the configuration, imported before this section is built).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

from data_tools.errors import ConfigError

from .base import TERMS, Term, TermConfig
from .itc import ITC
from .itm import ITM
from .mlm import MLM
from .mrm import MRM
from .position import Position
from .tags import Tags
from .wra import WRA

BUILTIN_TERMS: tuple[type[Term], ...] = (ITC, ITM, MLM, MRM, Position, Tags, WRA)
"""The terms of this package (each also in `TERMS` by its `register` decorator)."""


def term_classes() -> dict[str, type[Term]]:
    """Every configurable term by name, in the order they run: the built-in ones and the plugins'."""
    classes = {**{cls.name: cls for cls in BUILTIN_TERMS}, **TERMS}
    return dict(sorted(classes.items(), key=lambda item: (item[1].order, item[0])))


@dataclasses.dataclass
class ObjectivesConfig:
    """How the enabled terms combine, and each registered term's own section."""

    sampling: Literal["joint", "per_batch"] = "joint"
    """joint: every enabled term on every batch, weighted sum; per_batch (UNITER): one term per optimizer step, drawn
    with probability weight / sum of weights from (train.seed, step), its loss unweighted; IAIS runs on every step"""
    terms: dict[str, TermConfig] = dataclasses.field(default_factory=dict)
    """One section per registered term (`objectives.<name>`), in the order the terms run."""

    def enabled(self, name: str) -> bool:
        """Whether term `name` is configured and switched on."""
        section = self.terms.get(name)
        return section is not None and section.enabled

    def as_tree(self) -> dict[str, Any]:
        """The flat mapping of the YAML: one key per term, then `sampling`."""
        return {**self.terms, "sampling": self.sampling}

    @classmethod
    def from_tree(cls, tree: Any, build: Callable[..., Any]) -> "ObjectivesConfig":
        """The `objectives` mapping -> ObjectivesConfig, every registered term present (defaults where
        not configured; `objectives.itm=false` is short for `enabled: false`). `build` is the schema's
        dataclass builder."""
        tree = {} if tree is None else tree
        if not isinstance(tree, dict):
            raise ConfigError("objectives", tree, "a mapping of objective names to sections")
        tree = dict(tree)
        sampling = build(cls, {"sampling": tree.pop("sampling", "joint")}, "objectives").sampling
        classes = term_classes()
        unknown = sorted(set(tree) - set(classes))
        if unknown:
            raise ConfigError(
                f"objectives.{unknown[0]}",
                tree[unknown[0]],
                f"one of the objectives {', '.join(sorted(classes))} (or a plugins module that registers it)",
            )
        terms = {}
        for name, term in classes.items():
            value = tree.get(name, {})
            if isinstance(value, bool):
                value = {"enabled": value}
            if not isinstance(value, dict):
                raise ConfigError(f"objectives.{name}", value, "true, false or a mapping of its fields")
            terms[name] = build(term.Config, value, f"objectives.{name}")
        return cls(sampling=sampling, terms=terms)


def build_sections(tree: Any, build: Callable[..., Any]) -> ObjectivesConfig:
    """The `objectives` mapping -> ObjectivesConfig (see `ObjectivesConfig.from_tree`)."""
    return ObjectivesConfig.from_tree(tree, build)
