"""WRA: the batched, padded IPOT transport cost equals a direct per-pair computation (value and
gradient), and the plan has UNITER's marginals."""

from __future__ import annotations

import pytest
import torch

from pretrain.objectives import ipot_transport, wra_distance
from tests.pretrain.wra_reference import wra_pair


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    words = torch.randn(3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)  # [P, n, W]
    regions = torch.randn(3, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)  # [P, m, W]
    word_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    region_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    return words, regions, word_mask, region_mask


@pytest.mark.parametrize("beta,iterations,inner", [(0.5, 50, 1), (0.1, 7, 2)])
def test_wra_equals_direct_per_pair_computation(beta: float, iterations: int, inner: int) -> None:
    words, regions, word_mask, region_mask = _inputs()
    fast = wra_distance(words, regions, word_mask, region_mask, beta, iterations, inner)  # [P]
    fast.sum().backward()
    fast_grads = (words.grad.clone(), regions.grad.clone())
    words.grad = regions.grad = None
    slow = torch.stack(
        [wra_pair(words[p][word_mask[p]], regions[p][region_mask[p]], beta, iterations, inner) for p in range(3)]
    )
    slow.sum().backward()
    assert torch.allclose(fast, slow, rtol=1e-9, atol=1e-12)
    assert torch.allclose(fast_grads[0], words.grad, rtol=1e-9, atol=1e-12)
    assert torch.allclose(fast_grads[1], regions.grad, rtol=1e-9, atol=1e-12)
    assert words.grad[1, 2:].abs().sum() == 0 and regions.grad[2, 1:].abs().sum() == 0  # padding untouched


def test_plan_has_uniform_marginals_and_zero_padding() -> None:
    words, regions, word_mask, region_mask = _inputs(1)
    cost = torch.rand(3, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    plan = ipot_transport(cost, word_mask, region_mask, iterations=200)
    for p in range(3):
        n, m = int(word_mask[p].sum()), int(region_mask[p].sum())
        real = plan[p][word_mask[p]][:, region_mask[p]]
        assert torch.allclose(real.sum(dim=1), torch.full((n,), 1 / n, dtype=torch.float64), atol=1e-6)
        assert torch.allclose(real.sum(dim=0), torch.full((m,), 1 / m, dtype=torch.float64), atol=1e-6)
        assert plan[p].sum() == pytest.approx(real.sum().item())  # nothing on padded rows or columns


def test_transport_cost_is_lower_for_aligned_pairs() -> None:
    g = torch.Generator().manual_seed(5)
    words = torch.randn(1, 4, 8, generator=g, dtype=torch.float64)
    aligned = words[:, [2, 0, 3, 1]] + 0.01 * torch.randn(1, 4, 8, generator=g, dtype=torch.float64)
    unrelated = torch.randn(1, 4, 8, generator=g, dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert wra_distance(words, aligned, mask, mask).item() < 0.05 < wra_distance(words, unrelated, mask, mask).item()
