"""The Andes selection problem and its two solvers.

For each candidate batch size B_c pick at most B_c requests maximizing the summed value
subject to their KV blocks fitting in the capacity, then keep the best candidate:

    max_c max_x sum_i v[c, i] x_i   s.t.  sum_i x_i <= B_c,  sum_i w_i x_i <= M,  x_i in {0, 1}

Values are non-negative QoE gains, so "at most B" and "exactly B" pick the same sets whenever
B requests fit. ``greedy`` is the paper's heuristic (priority = value / weight), vectorized
over all candidates at once; ``exact`` is a dynamic program for validation on small inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from andes.policies.base import FloatArray, IntArray

EXACT_MAX_CELLS = 20_000_000
"""Largest DP table (requests x batch x KV blocks) the exact solver builds."""

_FILL_PASSES = 2
"""Extra passes that fill capacity left by an item that did not fit (skip-and-continue)."""


@dataclass(frozen=True)
class Selection:
    candidate: int
    """Index of the winning batch-size candidate."""
    selected: np.ndarray
    """Boolean mask over requests."""
    objective: float
    priority: FloatArray
    """Priority of every request at the winning candidate (higher = served first)."""


def greedy(
    values: FloatArray,
    weights: IntArray,
    capacity: int,
    batch_sizes: IntArray,
    must: np.ndarray | None = None,
    rank_weights: IntArray | None = None,
) -> Selection:
    """Greedy by value density for every candidate at once; ``must`` rows are taken first.

    ``rank_weights`` (default: ``weights``) divide the values for ranking only; capacity is
    always checked with ``weights``.
    """
    count = weights.size
    values = np.atleast_2d(values)
    n_cand = values.shape[0]
    ranking = weights if rank_weights is None else rank_weights
    safe_weights = np.maximum(ranking, 1).astype(np.float64)
    priority = values / safe_weights[None, :]
    if must is not None:
        priority = np.where(must[None, :], np.inf, priority)
    order = np.argsort(-priority, axis=1, kind="stable")
    take = _pack(order, weights, capacity, batch_sizes)
    objective = np.where(take, np.take_along_axis(values, order, axis=1), 0.0).sum(axis=1)
    # Ties go to the larger batch: same QoE, more throughput.
    best = int(n_cand - 1 - np.argmax(objective[::-1]))
    selected = np.zeros(count, dtype=bool)
    selected[order[best][take[best]]] = True
    best_objective = float(objective[best])
    # Density ordering fails when one valuable request is large; packing by value alone at
    # the winning batch size covers that case (the classic greedy-knapsack safeguard).
    by_value = np.argsort(-np.where(np.isinf(priority[best]), np.inf, values[best]), kind="stable")
    take_v = _pack(by_value[None, :], weights, capacity, batch_sizes[best : best + 1])[0]
    value_objective = float(values[best][by_value[take_v]].sum())
    if value_objective > best_objective + 1e-12:
        selected = np.zeros(count, dtype=bool)
        selected[by_value[take_v]] = True
        best_objective = value_objective
    return Selection(best, selected, best_objective, priority[best])


def _pack(
    order: IntArray, weights: IntArray, capacity: int, batch_sizes: IntArray
) -> np.ndarray:
    """Take items in each row's order while they fit (count and KV), skipping misfits."""
    w_sorted = weights[order]
    count = order.shape[1]
    take = (np.cumsum(w_sorted, axis=1) <= capacity) & (
        np.arange(count)[None, :] < batch_sizes[:, None]
    )
    for _ in range(_FILL_PASSES):
        room = capacity - np.where(take, w_sorted, 0).sum(axis=1)
        slots = batch_sizes - take.sum(axis=1)
        eligible = ~take & (w_sorted <= room[:, None])
        cum_w = np.cumsum(np.where(eligible, w_sorted, 0), axis=1)
        cum_n = np.cumsum(eligible, axis=1)
        more = eligible & (cum_w <= room[:, None]) & (cum_n <= slots[:, None])
        if not more.any():
            break
        take |= more
    return take


def exact(
    values: FloatArray, weights: IntArray, capacity: int, batch_sizes: IntArray
) -> Selection:
    """Optimal selection by dynamic programming over (item count, KV used); small inputs only."""
    values = np.atleast_2d(values)
    count = weights.size
    table_cells = count * (min(int(batch_sizes.max(initial=0)), count) + 1) * (capacity + 1)
    if table_cells > EXACT_MAX_CELLS:
        raise ValueError(
            f"the exact solver is for validation on small instances: {count} requests x "
            f"{capacity} KV blocks needs {table_cells} DP cells (limit {EXACT_MAX_CELLS})"
        )
    best_obj = -np.inf
    best_c = 0
    best_mask = np.zeros(count, dtype=bool)
    for c, limit in enumerate(batch_sizes):
        k_max = int(min(limit, count))
        # dp[k, m]: best value with k items using at most m blocks; keep[i] for backtracking.
        dp = np.zeros((k_max + 1, capacity + 1))
        dp[1:, :] = -np.inf
        keep = np.zeros((count, k_max + 1, capacity + 1), dtype=bool)
        for i in range(count):
            w = int(weights[i])
            if w > capacity:
                continue
            cand = np.full_like(dp, -np.inf)
            cand[1:, w:] = dp[:-1, : capacity + 1 - w] + values[c, i]
            better = cand > dp
            keep[i] = better
            dp = np.where(better, cand, dp)
        k_best, m_best = np.unravel_index(int(np.argmax(dp)), dp.shape)
        objective = float(dp[k_best, m_best])
        if objective > best_obj + 1e-12 or (abs(objective - best_obj) <= 1e-12 and c > best_c):
            mask = np.zeros(count, dtype=bool)
            k, m = int(k_best), int(m_best)
            for i in range(count - 1, -1, -1):
                if k > 0 and keep[i, k, m]:
                    mask[i] = True
                    m -= int(weights[i])
                    k -= 1
            best_obj, best_c, best_mask = objective, c, mask
    density = values[best_c] / np.maximum(weights, 1)
    return Selection(best_c, best_mask, float(best_obj), density)
