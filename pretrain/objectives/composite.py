"""The objective the loop trains: the enabled terms, combined (`objectives.sampling`).

`joint` computes every enabled term on every batch and sums `weight(progress) x loss`; `per_batch`
(UNITER) computes one term per optimizer step, drawn by `sampled_term`, plus the regularisers that
ride on another term's pass (IAIS). A term that holds the others back (a curriculum phase) is computed
alone. What a term is, and how it registers: base.py.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from data_tools.errors import UserError
from pretrain.profiling import term_range

from .base import TERMS, ObjectiveOutput, Progress, StepContext, Term

if TYPE_CHECKING:
    from .config import ObjectivesConfig


def sampled_term(names: list[str], weights: list[float], seed: int, step: int) -> int:
    """Index of the term drawn for optimizer step `step` with probability weight / sum(weights).

    A pure function of (seed, step): every rank, every micro-batch of the step and a resumed run
    draw the same term, whatever happened before (no RNG state to save). The names enter the hash, so
    another set of terms draws independently of this one."""
    total = sum(weights)
    if total <= 0:
        raise UserError(f"objectives.sampling=per_batch: the terms {', '.join(names)} all have weight 0")
    digest = hashlib.blake2b(f"{seed}:{step}:{','.join(names)}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2.0**64 * total  # uniform in [0, total)
    edge = 0.0
    for i, w in enumerate(weights):
        edge += w
        if u < edge and w > 0:
            return i
    return max(i for i, w in enumerate(weights) if w > 0)  # u rounded up to total


class CompositeObjective:
    """Weighted sum of terms in their registered order (or one drawn term per step, `per_batch`);
    logs `loss/<name>` and `loss/total`."""

    def __init__(self, terms: list[Term], sampling: str = "joint", seed: int = 0):
        if not terms:
            raise UserError("objectives: every objective is switched off; enable at least one")
        self.terms = sorted(terms, key=lambda t: t.order)
        self.want_attention = any(getattr(t, "reads_attention", False) for t in self.terms)
        self.sampling, self.seed = sampling, seed
        self.candidates = [t for t in self.terms if t.sampled]
        if sampling == "per_batch" and not self.candidates:
            raise UserError(
                "objectives.sampling=per_batch: no objective term to draw (enable one of itc, itm, mlm, ...)"
            )
        self.heads = nn.ModuleDict()
        """The terms' own parameters by term name (empty until `build_heads`)."""

    @classmethod
    def from_sections(
        cls, objectives: "ObjectivesConfig", extra: list[Term] = (), seed: int = 0
    ) -> "CompositeObjective":
        """The enabled terms of the `objectives` section plus `extra` ones (e.g. IAIS); `seed` draws
        the per-batch term (train.seed)."""
        terms = [TERMS[name](section) for name, section in objectives.terms.items() if section.enabled]
        return cls(terms + list(extra), objectives.sampling, seed)

    def build_heads(self, model_config: Any, categories: list[str]) -> nn.ModuleDict:
        """Build every term's own parameters once (call right after the model, on every rank alike)."""
        for term in self.terms:
            head = term.build_head(model_config, categories)
            if head is not None:
                term.head = self.heads[term.name] = head
        return self.heads

    def bind_text(self, tokenizer: Any, categories: list[str]) -> None:
        """Give every term the run's tokenizer and box categories (call once, after `build_heads`)."""
        for term in self.terms:
            term.bind_text(tokenizer, categories)

    def observe(self, progress: Progress) -> list[str]:
        """Every term's `observe`, in order (on logging steps, every rank at once)."""
        return [line for term in self.terms for line in term.observe(progress)]

    def state_dict(self) -> dict[str, Any]:
        """{term name: its state} for the terms that keep one (saved as the run state's `objective`)."""
        return {term.name: state for term in self.terms if (state := term.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for term in self.terms:
            if term.name in state:
                term.load_state_dict(state[term.name])

    def active_terms(self, progress: Progress) -> list[Term]:
        """The terms this step computes: the ones holding the others back this step (a curriculum
        phase), else all (`joint`), or the drawn one plus the regularisers (`per_batch`)."""
        holding = [t for t in self.terms if t.holds_others(progress)]
        if holding:
            return holding
        if self.sampling == "joint":
            return self.terms
        names = [t.name for t in self.candidates]
        weights = [float(t.weight(progress)) for t in self.candidates]
        drawn = self.candidates[sampled_term(names, weights, self.seed, progress.step)]
        return [t for t in self.terms if t is drawn or not t.sampled]

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any], progress: Progress) -> ObjectiveOutput:
        model = getattr(model, "module", model)
        ctx = StepContext(model, batch, progress, self.want_attention)
        terms = self.active_terms(progress)
        for term in self.terms:  # every enabled term, drawn or not: MLM sees the tags on every step
            term.prepare(ctx)
        total: Tensor | None = None
        for term in terms:
            with record_function(term_range(term.name)):
                loss = term.loss(ctx)
            weight = term.weight(progress) if self.sampling == "joint" or not term.sampled else 1.0
            contribution = weight * loss
            total = contribution if total is None else total + contribution
            ctx.logs.setdefault(f"loss/{term.name}", loss.detach())
        ctx.logs["loss/total"] = total.detach()
        return ObjectiveOutput(total=total, logs=ctx.logs)
