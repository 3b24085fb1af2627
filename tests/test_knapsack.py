"""The Andes selection problem: the greedy heuristic against the exact dynamic program.

The acceptance check runs both solvers on realistic planning instances: snapshots of a small
worker whose KV memory binds, values from the same predictor and value function the policy
uses, weights in KV blocks.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from andes.latency import load_profile
from andes.policies import knapsack
from andes.policies.andes import AndesPolicy, candidate_batch_sizes
from andes.policies.base import RequestTable, Snapshot, State, blocks_for
from andes.policies.outlook import make_outlook
from andes.qoe import TokenPacer

PROFILE = load_profile("a100-opt13b")
POLICY = AndesPolicy()
INSTANCES = 300


# -- realistic planning instances -----------------------------------------------------------


def random_snapshot(seed: int) -> Snapshot:
    """N <= 20 requests on a worker with 40-120 KV blocks, with a random delivery history."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 21))
    total = int(rng.integers(40, 121))
    states = rng.choice(
        np.array([State.WAITING, State.RUNNING, State.PREEMPTED], dtype=np.int64),
        size=n,
        p=[0.4, 0.4, 0.2],
    )
    prompt = rng.integers(20, 401, size=n)
    generated = np.where(
        states == State.WAITING,
        0,
        np.where(states == State.PREEMPTED, rng.integers(1, 301, size=n),
                 rng.integers(0, 301, size=n)),
    )
    tds = rng.uniform(3.3, 5.1, size=n)
    ttft = np.maximum(1.0, prompt / 5000.0)
    now = 500.0
    arrival = np.empty(n)
    digest_max = np.full(n, -np.inf)
    delay_sum = np.zeros(n)
    for i in range(n):
        pacer = TokenPacer(ttft=float(ttft[i]), tds=float(tds[i]))
        # First token early or late, then tokens faster or slower than the user reads, with
        # an occasional stall (a preemption or a long prefill of someone else).
        t = float(rng.uniform(0.2, 3.0) * ttft[i])
        interval = float(rng.uniform(0.3, 1.6) / tds[i])
        for _ in range(int(generated[i])):
            pacer.deliver(1, t)
            t += interval * float(rng.uniform(0.5, 1.5))
            if rng.random() < 0.01:
                t += float(rng.exponential(3.0))
        elapsed = (t if generated[i] else 0.0) + float(rng.uniform(0.0, 8.0))
        arrival[i] = now - elapsed
        digest_max[i] = pacer.digest_max
        delay_sum[i] = pacer.delay_sum
    context = prompt + generated
    kv = np.where(states == State.RUNNING, blocks_for(context, PROFILE.block_size), 0)
    table = RequestTable(
        request_id=np.arange(n, dtype=np.int64) + 1000,
        state=states.astype(np.int64),
        arrival_s=arrival,
        ttft_s=ttft,
        tds=tds,
        prompt_tokens=prompt.astype(np.int64),
        generated_tokens=generated.astype(np.int64),
        max_tokens=np.full(n, 1024, dtype=np.int64),
        digest_max=digest_max,
        delay_sum=delay_sum,
        kv_blocks=kv.astype(np.int64),
        preemptions=rng.integers(0, 2, size=n).astype(np.int64),
        admitted_seq=np.where(states == State.WAITING, -1, np.arange(n)).astype(np.int64),
        served_since_admit=generated.astype(np.int64),
    )
    return Snapshot(
        now_s=now,
        requests=table,
        profile=PROFILE,
        kv_blocks_total=total,
        kv_blocks_free=max(0, total - int(kv.sum())),
        max_batch=PROFILE.max_batch,
    )


def planning_instance(seed: int) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """(values C x N, weights N, capacity, batch sizes C) exactly as the policy builds them."""
    snapshot = random_snapshot(seed)
    capacity = int(snapshot.kv_blocks_total * (1.0 - POLICY.kv_reserve))
    sizes = candidate_batch_sizes(snapshot, capacity, POLICY.max_candidates)
    outlook = make_outlook(snapshot, sizes, POLICY.horizon_s)
    values = POLICY._values(outlook)
    weights = blocks_for(snapshot.requests.context_tokens, snapshot.block_size)
    return values, weights, capacity, sizes


def assert_feasible(
    selection: knapsack.Selection, values: np.ndarray, weights: np.ndarray, capacity: int,
    sizes: np.ndarray,
) -> None:
    mask = selection.selected
    assert mask.dtype == bool and mask.shape == weights.shape
    assert 0 <= selection.candidate < sizes.size
    assert int(weights[mask].sum()) <= capacity
    assert int(mask.sum()) <= int(sizes[selection.candidate])
    v = np.atleast_2d(values)[selection.candidate]
    assert selection.objective == pytest.approx(float(v[mask].sum()), abs=1e-9)


def test_greedy_reaches_98_percent_of_exact_on_realistic_instances() -> None:
    ratios = []
    binding = 0
    for seed in range(INSTANCES):
        values, weights, capacity, sizes = planning_instance(seed)
        assert np.all(values >= 0.0) and np.all(np.isfinite(values))
        binding += int(weights.sum()) > capacity
        greedy = knapsack.greedy(values, weights, capacity, sizes)
        exact = knapsack.exact(values, weights, capacity, sizes)
        assert_feasible(greedy, values, weights, capacity, sizes)
        assert_feasible(exact, values, weights, capacity, sizes)
        assert greedy.objective <= exact.objective + 1e-9, f"seed {seed}: greedy beats 'exact'"
        ratios.append(1.0 if exact.objective <= 1e-12 else greedy.objective / exact.objective)
    # The instances must actually be knapsacks: memory binds in most of them.
    assert binding >= INSTANCES // 2
    r = np.asarray(ratios)
    worst = int(np.argmin(r))
    message = (
        f"greedy/exact over {INSTANCES} instances: mean {r.mean():.4f}, "
        f"worst {r[worst]:.4f} (seed {worst}), below 0.999 on {int(np.sum(r < 0.999))}"
    )
    print(message)
    assert r.mean() >= 0.98, message


def test_both_solvers_run_exactly_under_memory_pressure() -> None:
    """Through the policy: the solver runs when KV demand passes the trigger, else not."""
    exact_policy = AndesPolicy(solver="exact", name="andes-exact")
    for seed in range(40):
        snapshot = random_snapshot(seed)
        for policy in (POLICY, exact_policy):
            plan = policy.plan(snapshot)
            demand = int(blocks_for(snapshot.requests.context_tokens, PROFILE.block_size).sum())
            assert plan.solver_ran == (demand > policy.memory_trigger * snapshot.kv_blocks_total)


# -- exact against brute force ----------------------------------------------------------------


def brute_force(
    values: np.ndarray, weights: np.ndarray, capacity: int, sizes: np.ndarray
) -> float:
    best = 0.0
    n = weights.size
    for c, limit in enumerate(sizes):
        for k in range(0, min(int(limit), n) + 1):
            for subset in itertools.combinations(range(n), k):
                idx = list(subset)
                if int(weights[idx].sum()) <= capacity:
                    best = max(best, float(values[c, idx].sum()))
    return best


@st.composite
def small_instances(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    n = draw(st.integers(0, 10))
    n_cand = draw(st.integers(1, 3))
    weights = np.array(draw(st.lists(st.integers(1, 30), min_size=n, max_size=n)), dtype=np.int64)
    value = st.one_of(st.just(0.0), st.floats(0.0, 1.0, allow_nan=False))
    values = np.array(
        draw(st.lists(st.lists(value, min_size=n, max_size=n), min_size=n_cand,
                      max_size=n_cand)),
        dtype=np.float64,
    ).reshape(n_cand, n)
    sizes = np.array(sorted(draw(st.lists(st.integers(1, 12), min_size=n_cand,
                                          max_size=n_cand, unique=True))), dtype=np.int64)
    capacity = draw(st.integers(1, 80))
    return values, weights, capacity, sizes


@settings(max_examples=150, deadline=None)
@given(small_instances())
def test_exact_matches_brute_force(
    instance: tuple[np.ndarray, np.ndarray, int, np.ndarray],
) -> None:
    values, weights, capacity, sizes = instance
    exact = knapsack.exact(values, weights, capacity, sizes)
    assert_feasible(exact, values, weights, capacity, sizes)
    assert exact.objective == pytest.approx(brute_force(values, weights, capacity, sizes),
                                            abs=1e-9)


@settings(max_examples=150, deadline=None)
@given(small_instances())
def test_greedy_is_feasible_and_never_beats_exact(
    instance: tuple[np.ndarray, np.ndarray, int, np.ndarray],
) -> None:
    values, weights, capacity, sizes = instance
    greedy = knapsack.greedy(values, weights, capacity, sizes)
    assert_feasible(greedy, values, weights, capacity, sizes)
    assert greedy.objective <= knapsack.exact(values, weights, capacity, sizes).objective + 1e-9


def test_exact_on_seeded_realistic_instances_matches_brute_force() -> None:
    checked = 0
    for seed in range(INSTANCES):
        values, weights, capacity, sizes = planning_instance(seed)
        if weights.size > 10:
            continue
        exact = knapsack.exact(values, weights, capacity, sizes)
        assert exact.objective == pytest.approx(brute_force(values, weights, capacity, sizes),
                                                abs=1e-9)
        checked += 1
    assert checked >= 50


def test_exact_hand_instance() -> None:
    # Capacity 10, batch 2: {0, 1} weighs 10 and is worth 1.1 > best single (1.0).
    values = np.array([[0.6, 0.5, 1.0]])
    weights = np.array([5, 5, 6])
    exact = knapsack.exact(values, weights, 10, np.array([2]))
    assert exact.selected.tolist() == [True, True, False]
    assert exact.objective == pytest.approx(1.1)
    # Batch 1: the single best item.
    exact = knapsack.exact(values, weights, 10, np.array([1]))
    assert exact.selected.tolist() == [False, False, True]


# -- greedy -------------------------------------------------------------------------------------


def test_greedy_takes_by_value_density() -> None:
    values = np.array([[0.9, 0.5, 0.3]])
    weights = np.array([9, 2, 2])  # densities 0.1, 0.25, 0.15
    greedy = knapsack.greedy(values, weights, 4, np.array([3]))
    assert greedy.selected.tolist() == [False, True, True]
    assert greedy.objective == pytest.approx(0.8)
    np.testing.assert_allclose(greedy.priority, [0.1, 0.25, 0.15])


def test_greedy_fills_capacity_left_by_an_item_that_did_not_fit() -> None:
    # Density order 1, 0, 2: item 0 does not fit after item 1, item 2 still does.
    values = np.array([[0.5, 0.5, 0.1]])
    weights = np.array([8, 4, 4])
    greedy = knapsack.greedy(values, weights, 10, np.array([3]))
    assert greedy.selected.tolist() == [False, True, True]
    assert greedy.objective == pytest.approx(0.6)


def test_greedy_keeps_a_valuable_large_item_that_density_would_crowd_out() -> None:
    # By density: items 1 and 2 (0.6); by value: item 0 alone (0.8), the better packing.
    values = np.array([[0.8, 0.5, 0.1]])
    weights = np.array([8, 4, 4])
    greedy = knapsack.greedy(values, weights, 10, np.array([3]))
    assert greedy.selected.tolist() == [True, False, False]
    assert greedy.objective == pytest.approx(0.8)


def test_greedy_respects_batch_size() -> None:
    values = np.array([[0.5, 0.4, 0.3, 0.2], [0.5, 0.4, 0.3, 0.2]])
    weights = np.array([1, 1, 1, 1])
    greedy = knapsack.greedy(values, weights, 100, np.array([2, 3]))
    assert greedy.candidate == 1
    assert greedy.selected.tolist() == [True, True, True, False]
    only_two = knapsack.greedy(values[:1], weights, 100, np.array([2]))
    assert only_two.selected.tolist() == [True, True, False, False]


def test_greedy_respects_capacity() -> None:
    values = np.array([[1.0, 1.0, 1.0, 1.0]])
    weights = np.array([3, 3, 3, 3])
    greedy = knapsack.greedy(values, weights, 10, np.array([4]))
    assert int(greedy.selected.sum()) == 3
    nothing_fits = knapsack.greedy(values, weights, 2, np.array([4]))
    assert not nothing_fits.selected.any() and nothing_fits.objective == 0.0


def test_greedy_takes_must_rows_first() -> None:
    values = np.array([[0.0, 0.9, 0.8, 0.01]])
    weights = np.array([5, 5, 5, 5])
    must = np.array([True, False, False, True])
    greedy = knapsack.greedy(values, weights, 15, np.array([4]), must=must)
    # Both must rows, and the best of the rest in what is left.
    assert greedy.selected.tolist() == [True, True, False, True]
    assert np.isinf(greedy.priority[must]).all()
    # Count limit: the must rows use both slots.
    greedy = knapsack.greedy(values, weights, 100, np.array([2]), must=must)
    assert greedy.selected.tolist() == [True, False, False, True]


def test_greedy_without_must_rows_is_unchanged_by_an_all_false_mask() -> None:
    for seed in range(30):
        values, weights, capacity, sizes = planning_instance(seed)
        plain = knapsack.greedy(values, weights, capacity, sizes)
        masked = knapsack.greedy(values, weights, capacity, sizes,
                                 must=np.zeros(weights.size, dtype=bool))
        assert plain.candidate == masked.candidate
        np.testing.assert_array_equal(plain.selected, masked.selected)


@settings(max_examples=100, deadline=None)
@given(small_instances(), st.data())
def test_greedy_must_rows_are_taken_when_they_fit(
    instance: tuple[np.ndarray, np.ndarray, int, np.ndarray], data: st.DataObject
) -> None:
    values, weights, capacity, sizes = instance
    n = weights.size
    must = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    greedy = knapsack.greedy(values, weights, capacity, sizes, must=must)
    assert_feasible(greedy, values, weights, capacity, sizes)
    fits = int(weights[must].sum()) <= capacity and int(must.sum()) <= int(sizes.min())
    if fits:
        assert greedy.selected[must].all()


def test_greedy_ties_prefer_the_larger_batch() -> None:
    # Two rows worth something; the larger candidate gets the same objective.
    values = np.array([[0.7, 0.2, 0.0, 0.0], [0.7, 0.2, 0.0, 0.0]])
    weights = np.array([2, 2, 2, 2])
    sizes = np.array([2, 4])
    greedy = knapsack.greedy(values, weights, 100, sizes)
    assert greedy.candidate == 1
    assert greedy.selected.all()
    exact = knapsack.exact(values, weights, 100, sizes)
    assert exact.candidate == 1
    # A strictly better smaller candidate still wins.
    better_small = values.copy()
    better_small[0, 0] = 0.8
    assert knapsack.greedy(better_small, weights, 100, sizes).candidate == 0
    assert knapsack.exact(better_small, weights, 100, sizes).candidate == 0


def test_greedy_picks_the_best_candidate() -> None:
    # At a larger batch every token comes slower: values shrink, but more requests fit.
    values = np.array([[0.9, 0.9, 0.0], [0.5, 0.5, 0.5]])
    weights = np.array([1, 1, 1])
    sizes = np.array([2, 3])
    greedy = knapsack.greedy(values, weights, 100, sizes)
    assert greedy.candidate == 0
    assert greedy.objective == pytest.approx(1.8)
