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
) -> Selection:
    """Greedy by value density for every candidate at once; ``must`` rows are taken first."""
    count = weights.size
    values = np.atleast_2d(values)
    n_cand = values.shape[0]
    safe_weights = np.maximum(weights, 1).astype(np.float64)
    priority = values / safe_weights[None, :]
    if must is not None:
        priority = np.where(must[None, :], np.inf, priority)
    order = np.argsort(-priority, axis=1, kind="stable")
    w_sorted = weights[order]
    rank_limit = batch_sizes[:, None]
    take = (np.cumsum(w_sorted, axis=1) <= capacity) & (np.arange(count)[None, :] < rank_limit)
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
    selected_sorted = take
    v_sorted = np.take_along_axis(values, order, axis=1)
    objective = np.where(selected_sorted, v_sorted, 0.0).sum(axis=1)
    # Ties go to the larger batch: same QoE, more throughput.
    best = int(n_cand - 1 - np.argmax(objective[::-1]))
    selected = np.zeros(count, dtype=bool)
    selected[order[best][selected_sorted[best]]] = True
    return Selection(best, selected, float(objective[best]), priority[best])


def exact(
    values: FloatArray, weights: IntArray, capacity: int, batch_sizes: IntArray
) -> Selection:
    """Optimal selection by dynamic programming over (item count, KV used); small inputs only."""
    values = np.atleast_2d(values)
    count = weights.size
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
