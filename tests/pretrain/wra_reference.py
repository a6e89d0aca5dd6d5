"""A direct, slow reference of UNITER's WRA: one pair at a time, only its real words and visual
tokens (no padding, so no masks), IPOT written entry by entry as in Xie et al.'s Algorithm 1:

    sigma = 1/m' (words), T = ones, A = exp(-C / beta)
    repeat: Q = A * T; (k times) delta_j = 1 / (m_regions * sum_i Q_ij sigma_i),
                                 sigma_i = 1 / (n_words * sum_j Q_ij delta_j)
            T_ij = sigma_i Q_ij delta_j
    distance = sum_ij T_ij C_ij, T without gradient

Compared with pretrain.objectives.wra (batched, padded, masked) in value and gradient."""

from __future__ import annotations

import torch


def cosine_cost(words: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    n, m = words.shape[0], regions.shape[0]
    rows = []
    for i in range(n):
        row = []
        for j in range(m):
            a, b = words[i], regions[j]
            row.append(1 - (a @ b) / (a.norm().clamp_min(1e-5) * b.norm().clamp_min(1e-5)))
        rows.append(torch.stack(row))
    return torch.stack(rows)  # [n, m]


def ipot(cost: torch.Tensor, beta: float, iterations: int, inner: int) -> torch.Tensor:
    n, m = cost.shape
    a = [[float(torch.exp(-cost[i, j] / beta)) for j in range(m)] for i in range(n)]
    t = [[1.0] * m for _ in range(n)]
    sigma = [1.0 / n] * n
    delta = [0.0] * m
    for _ in range(iterations):
        q = [[a[i][j] * t[i][j] for j in range(m)] for i in range(n)]
        for _ in range(inner):
            delta = [1.0 / (m * sum(q[i][j] * sigma[i] for i in range(n))) for j in range(m)]
            sigma = [1.0 / (n * sum(q[i][j] * delta[j] for j in range(m))) for i in range(n)]
        t = [[sigma[i] * q[i][j] * delta[j] for j in range(m)] for i in range(n)]
    return torch.tensor(t, dtype=cost.dtype)


def wra_pair(
    words: torch.Tensor, regions: torch.Tensor, beta: float = 0.5, iterations: int = 50, inner: int = 1
) -> torch.Tensor:
    """Transport cost of one pair: words [n, W], regions [m, W] (real ones only)."""
    cost = cosine_cost(words, regions)
    plan = ipot(cost.detach(), beta, iterations, inner)
    return (plan * cost).sum()
