"""`objectives.sampling=per_batch` (UNITER): one term per optimizer step, drawn by weight as a pure
function of (seed, step), so every rank and a resumed run draw the same; regularisers run always."""

from __future__ import annotations

import collections

import pytest
import torch

from pretrain.config_schema import build
from pretrain.objectives import Progress, Term, TermConfig, build_sections, pretraining_objective, sampled_term


def test_draw_is_a_pure_function_of_seed_and_step() -> None:
    names, weights = ["itc", "itm", "mlm"], [1.0, 2.0, 1.0]
    first = [sampled_term(names, weights, seed=7, step=s) for s in range(200)]
    assert first == [sampled_term(names, weights, seed=7, step=s) for s in range(200)]  # same on every rank/resume
    assert first[150:] == [sampled_term(names, weights, seed=7, step=s) for s in range(150, 200)]  # no hidden state
    assert first != [sampled_term(names, weights, seed=8, step=s) for s in range(200)]  # the seed matters


def test_draws_follow_the_weights() -> None:
    names, weights = ["itc", "itm", "mlm", "wra"], [1.0, 2.0, 1.0, 0.0]
    counts = collections.Counter(sampled_term(names, weights, seed=0, step=s) for s in range(8000))
    assert counts[3] == 0  # weight 0: never drawn
    for i, share in ((0, 0.25), (1, 0.5), (2, 0.25)):
        assert counts[i] / 8000 == pytest.approx(share, abs=0.02)


class _Constant(Term):
    """A term whose loss is a fixed number (sampling needs no model)."""

    name, sampled = "c", True

    def __init__(self, name: str, value: float, weight: float, sampled: bool = True):
        super().__init__(TermConfig(weight=weight))
        self.name, self.value, self.sampled, self.calls = name, value, sampled, 0

    def loss(self, ctx) -> torch.Tensor:
        self.calls += 1
        return torch.tensor(self.value)


def _objective(sampling: str):
    from pretrain.objectives import CompositeObjective

    terms = [_Constant("a", 1.0, 1.0), _Constant("b", 10.0, 3.0), _Constant("reg", 100.0, 0.5, sampled=False)]
    return CompositeObjective(terms, sampling, seed=3), terms


def test_per_batch_computes_the_drawn_term_unweighted_plus_regularisers() -> None:
    batch = {"sample_mask": torch.ones(2, dtype=torch.bool)}
    objective, (a, b, reg) = _objective("per_batch")
    seen = collections.Counter()
    for step in range(400):
        out = objective(torch.nn.Module(), batch, Progress(step, 400))
        drawn = "a" if "loss/a" in out.logs else "b"
        assert ("loss/b" in out.logs) == (drawn == "b") and "loss/reg" in out.logs
        assert float(out.total) == pytest.approx((1.0 if drawn == "a" else 10.0) + 0.5 * 100.0)
        seen[drawn] += 1
    assert reg.calls == 400 and a.calls + b.calls == 400
    assert seen["b"] / 400 == pytest.approx(0.75, abs=0.07)
    joint, _ = _objective("joint")
    assert float(joint(torch.nn.Module(), batch, Progress(0, 1)).total) == pytest.approx(1 + 30 + 50)


def test_sampling_is_configured_beside_the_terms() -> None:
    sections = build_sections({"sampling": "per_batch", "itc": False}, build)
    objective = pretraining_objective(sections, seed=5)
    assert objective.sampling == "per_batch" and objective.seed == 5
    assert [t.name for t in objective.terms] == ["itm", "mlm"]
    assert build_sections({}, build).sampling == "joint"
