"""What an objective is, and how terms register so that a new one is one file.

The loop backpropagates `ObjectiveOutput.total` and logs `ObjectiveOutput.logs`; anything callable as
`objective(model, batch, progress)` can be trained. Pretraining and finetuning objectives are built
from *terms*: small classes registered by name with their own config section,

    @register("itc", order=10)
    class ITC(Term):
        Config = ITCConfig            # a TermConfig dataclass: enabled, weight, own fields
        def loss(self, ctx: StepContext) -> Tensor: ...

which become `objectives.<name>` in the configuration (`objectives.itc.weight=0.5`, or
`objectives.itc=false` as a shorthand for `enabled: false`). `CompositeObjective` runs the enabled
terms in `order`, sums `weight(progress) x loss`, and logs `loss/<name>` for each (the metrics
exporter turns every `loss/<name>` into `relalign_loss{objective="<name>"}`: no list to edit).
Terms share one `StepContext` per micro-batch: the visual tokens are embedded once, ITC leaves its
similarities for ITM's hard negatives, and the first joint pass over the matched pairs leaves their
IAIS attention blocks for the IAIS term. A plugin module named in the config's `plugins` list is
imported before validation, so its terms are configurable like the built-in ones.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
from typing import Any, Callable, ClassVar, Protocol

import torch
from torch import Tensor

from data_tools.errors import ConfigError, UserError, check


@dataclasses.dataclass
class Progress:
    """Where training stands, for objectives with schedules (IAIS weight, alternate directions)."""

    step: int
    total_steps: int


@dataclasses.dataclass
class ObjectiveOutput:
    """`total`: the scalar to backpropagate. `logs`: detached scalars named like the metrics keys
    (`loss/itc`, `loss/total`, `iais_weight`, `isd/L`, ...)."""

    total: Tensor
    logs: dict[str, Tensor]


class Objective(Protocol):
    def __call__(self, model: torch.nn.Module, batch: dict[str, Any], progress: Progress) -> ObjectiveOutput: ...


@dataclasses.dataclass
class TermConfig:
    """Fields every term has; a term's own Config subclasses this."""

    enabled: bool = True
    """Compute this term."""
    weight: float = 1.0
    """Its weight in the total loss."""

    def __post_init__(self) -> None:
        check("weight", self.weight, self.weight >= 0, "a weight >= 0")


class Term:
    """One loss of a composite objective. Subclasses set `Config` and implement `loss`."""

    name: ClassVar[str] = ""
    order: ClassVar[int] = 50
    Config: ClassVar[type[TermConfig]] = TermConfig

    def __init__(self, config: TermConfig):
        self.config = config

    def weight(self, progress: Progress) -> float:
        return self.config.weight

    def loss(self, ctx: "StepContext") -> Tensor:
        raise NotImplementedError


TERMS: dict[str, type[Term]] = {}
"""Registered terms by name (the keys of the `objectives` config section)."""


def register(name: str, order: int = 50) -> Callable[[type[Term]], type[Term]]:
    """Class decorator: make a Term configurable as `objectives.<name>`; lower `order` runs first."""
    def wrap(cls: type[Term]) -> type[Term]:
        if name in TERMS and TERMS[name] is not cls:
            raise ValueError(f"objective term {name!r} registered twice ({TERMS[name].__module__}, {cls.__module__})")
        cls.name, cls.order = name, order
        TERMS[name] = cls
        return cls
    return wrap


def import_plugins(modules: list[str]) -> None:
    """Import the modules of the config's `plugins` list (they register terms)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError("plugins", module, f"an importable module ({err})") from None


def build_sections(tree: Any, build: Callable[[type, dict[str, Any], str], Any]) -> dict[str, TermConfig]:
    """The `objectives` mapping -> {name: that term's Config}, every registered term present
    (defaults where not configured). `build` is the schema's dataclass builder."""
    from pretrain import objectives as _builtin  # noqa: F401  (registers the built-in terms)

    tree = {} if tree is None else tree
    if not isinstance(tree, dict):
        raise ConfigError("objectives", tree, "a mapping of objective names to sections")
    unknown = sorted(set(tree) - set(TERMS))
    if unknown:
        raise ConfigError(f"objectives.{unknown[0]}", tree[unknown[0]],
                          f"one of the objectives {', '.join(sorted(TERMS))} (or a plugins module that registers it)")
    sections = {}
    for name, cls in sorted(TERMS.items(), key=lambda item: (item[1].order, item[0])):
        value = tree.get(name, {})
        if isinstance(value, bool):  # `objectives.itm=false` shorthand
            value = {"enabled": value}
        if not isinstance(value, dict):
            raise ConfigError(f"objectives.{name}", value, "true, false or a mapping of its fields")
        sections[name] = build(cls.Config, value, f"objectives.{name}")
    return sections


def image_id_codes(image_ids: list[str]) -> Tensor:
    """[B] int64 codes of the image ids (stable across processes; "" for padding slots -> -1)."""
    codes = [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=7).digest(), "little") if s else -1
             for s in image_ids]
    return torch.tensor(codes, dtype=torch.long)


def wide(x: Tensor) -> Tensor:
    """At least float32 for a loss (bf16/fp16 logits lose too much in log-softmax); float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def masked_mean(values: Tensor, weights: Tensor) -> Tensor:
    """Mean of `values` over the rows where `weights` is True; other rows (padding slots, whose
    values may be inf: every key masked) are selected away, not multiplied by zero."""
    keep = weights.bool()
    return torch.where(keep, values, torch.zeros_like(values)).sum() / keep.sum().clamp(min=1).to(values.dtype)


class StepContext:
    """What the terms of one micro-batch share (computed once, on first use).

    Padding slots (`sample_mask` False, DESIGN.md 3) weigh zero in every term: as queries, keys and
    negatives.
    """

    def __init__(self, model: torch.nn.Module, batch: dict[str, Any], progress: Progress, want_attention: bool):
        self.model, self.batch, self.progress = model, batch, progress
        self.want_attention = want_attention
        """Some term reads IAIS attention blocks: the first joint pass over the matched pairs computes them."""
        self.sample_mask: Tensor = batch["sample_mask"]  # [B] bool
        self.logs: dict[str, Tensor] = {}
        self.itc_similarity: Tensor | None = None
        """[B text, B image] temperature-scaled similarities left by ITC (hard-negative sampling)."""
        self.matched_attention: dict[int, Any] | None = None
        """IAIS attention blocks of the matched pairs, left by the first joint pass that computed them."""
        self.iais_direction: str | None = None
        """A term may choose the IAIS direction of this micro-batch (finetuning: V on image-built batches)."""
        self._codes: Tensor | None = None
        self._visual: tuple[Tensor, Tensor] | None = None

    @property
    def codes(self) -> Tensor:
        """[B] image-id codes on the batch's device."""
        if self._codes is None:
            self._codes = image_id_codes(self.batch["image_id"]).to(self.batch["input_ids"].device)
        return self._codes

    @property
    def visual(self) -> tuple[Tensor, Tensor]:
        """(visual tokens [B, M, D], visual mask [B, M]) embedded once per micro-batch."""
        if self._visual is None:
            self._visual = self.model.embed_visual(self.batch)
        return self._visual

    def joint(self, input_ids: Tensor, text_mask: Tensor, visual_tokens: Tensor, visual_mask: Tensor,
              matched_rows: Tensor | None = None) -> Any:
        """A joint pass; `matched_rows` [rows] bool marks the matched pairs whose IAIS blocks are
        computed (when a term wants them and none were computed yet)."""
        iais_rows = matched_rows if self.want_attention and self.matched_attention is None else None
        out = self.model(input_ids, text_mask, visual_tokens, visual_mask, iais_rows=iais_rows)
        if iais_rows is not None:
            self.matched_attention = out.attention
        return out


class CompositeObjective:
    """Weighted sum of terms in their registered order; logs `loss/<name>` and `loss/total`."""

    def __init__(self, terms: list[Term]):
        if not terms:
            raise UserError("objectives: every objective is switched off; enable at least one")
        self.terms = sorted(terms, key=lambda t: t.order)
        self.want_attention = any(getattr(t, "reads_attention", False) for t in self.terms)

    @classmethod
    def from_sections(cls, sections: dict[str, TermConfig], extra: list[Term] = ()) -> "CompositeObjective":
        """The enabled terms of the `objectives` sections plus `extra` ones (e.g. IAIS)."""
        return cls([TERMS[name](section) for name, section in sections.items() if section.enabled] + list(extra))

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any], progress: Progress) -> ObjectiveOutput:
        model = getattr(model, "module", model)
        ctx = StepContext(model, batch, progress, self.want_attention)
        total: Tensor | None = None
        for term in self.terms:
            loss = term.loss(ctx)
            contribution = term.weight(progress) * loss
            total = contribution if total is None else total + contribution
            ctx.logs.setdefault(f"loss/{term.name}", loss.detach())
        ctx.logs["loss/total"] = total.detach()
        return ObjectiveOutput(total=total, logs=ctx.logs)
