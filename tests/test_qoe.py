"""The QoE metric (DESIGN section 2), its vectorized form, the pacer and the predictor."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from andes.qoe import TokenPacer, predict_qoe, qoe, qoe_many


def reference_qoe(times: list[float], ttft: float, tds: float) -> float:
    """The definition, written as literally as possible (a loop and the three-case area)."""
    n = len(times)
    if n == 0:
        return 0.0
    d = 1.0 / tds
    c = [times[0]]
    for a in times[1:]:
        c.append(max(a, c[-1] + d))
    s_delay = sum(max(0.0, c[i] - (ttft + i * d)) for i in range(n))
    t_end = c[-1] + d
    if t_end <= ttft:
        s_whole = 0.0
    elif t_end < ttft + n * d:
        s_whole = (t_end - ttft) ** 2 / (2 * d)
    else:
        s_whole = n * (t_end - ttft) - n * n * d / 2
    if s_whole == 0:
        return 1.0
    return min(1.0, max(0.0, 1.0 - s_delay / s_whole))


def on_time(n: int, ttft: float, tds: float, shift: float = 0.0) -> list[float]:
    return [ttft + i / tds + shift for i in range(n)]


# -- closed forms and hand-computed cases ------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 10, 300])
def test_on_time_delivery_is_perfect(n: int) -> None:
    assert qoe(on_time(n, 1.0, 4.8), 1.0, 4.8) == pytest.approx(1.0, abs=1e-12)


def test_early_and_bursty_delivery_is_perfect() -> None:
    assert qoe([0.1] * 50, 1.0, 4.8) == 1.0
    assert qoe(np.linspace(0.0, 0.5, 100), 2.0, 3.3) == 1.0


@pytest.mark.parametrize(("n", "tds", "delay"), [(1, 4.8, 1.0), (10, 4.8, 2.5), (300, 3.3, 7.0)])
def test_uniform_delay_closed_form(n: int, tds: float, delay: float) -> None:
    expected = n / (n + 2 * tds * delay)
    assert qoe(on_time(n, 1.0, tds, shift=delay), 1.0, tds) == pytest.approx(expected, abs=1e-12)


def test_hand_computed_two_tokens() -> None:
    # tau=1, d=1 (tds=1). Tokens at 2 and 2: c = (2, 3); e = (1, 2); S_delay = 2.
    # t_end = 4 >= tau + n d = 3: S_whole = 2*3 - 4/2 = 4. QoE = 1 - 2/4 = 0.5.
    assert qoe([2.0, 2.0], 1.0, 1.0) == pytest.approx(0.5)


def test_hand_computed_partial_ramp() -> None:
    # tau=1, d=0.5 (tds=2), one token at 0.5 (early) then one at 3.0.
    # c = (0.5, 3.0); e = (1.0, 1.5); S_delay = 0 + 1.5. t_end = 3.5 >= 1 + 2*0.5 = 2:
    # S_whole = 2*2.5 - 4*0.5/2 = 4. QoE = 1 - 1.5/4 = 0.625.
    assert qoe([0.5, 3.0], 1.0, 2.0) == pytest.approx(0.625)


def test_empty_response_scores_zero() -> None:
    assert qoe([], 1.0, 4.8) == 0.0


@pytest.mark.parametrize(
    ("times", "ttft", "tds", "message"),
    [
        ([1.0, 0.5], 1.0, 4.8, "sorted"),
        ([1.0, math.nan], 1.0, 4.8, "finite"),
        ([1.0], 0.0, 4.8, "ttft"),
        ([1.0], 1.0, -1.0, "tds"),
        ([1.0], math.inf, 4.8, "ttft"),
    ],
)
def test_bad_input_raises(times: list[float], ttft: float, tds: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        qoe(times, ttft, tds)


# -- properties ---------------------------------------------------------------------------

deliveries = st.lists(
    st.floats(min_value=0.0, max_value=60.0, allow_nan=False), min_size=1, max_size=60
).map(sorted)
ttfts = st.floats(min_value=0.05, max_value=10.0)
speeds = st.floats(min_value=0.5, max_value=50.0)


@given(deliveries, ttfts, speeds)
def test_matches_literal_definition(times: list[float], ttft: float, tds: float) -> None:
    assert qoe(times, ttft, tds) == pytest.approx(reference_qoe(times, ttft, tds), abs=1e-9)


@given(deliveries, ttfts, speeds)
def test_range(times: list[float], ttft: float, tds: float) -> None:
    assert 0.0 <= qoe(times, ttft, tds) <= 1.0


@given(deliveries, ttfts, speeds, st.floats(min_value=0.0, max_value=60.0))
def test_delaying_the_response_never_raises_qoe(
    times: list[float], ttft: float, tds: float, delay: float
) -> None:
    later = [t + delay for t in times]
    assert qoe(later, ttft, tds) <= qoe(times, ttft, tds) + 1e-9


@given(deliveries, ttfts, speeds, st.data())
def test_delaying_any_token_never_lowers_the_delay_area(
    times: list[float], ttft: float, tds: float, data: st.DataObject
) -> None:
    i = data.draw(st.integers(0, len(times) - 1))
    extra = data.draw(st.floats(min_value=0.0, max_value=30.0))
    later = list(times)
    later[i] += extra
    for j in range(i + 1, len(later)):  # keep the order: a later token cannot overtake it
        later[j] = max(later[j], later[i])
    before, after = TokenPacer(ttft=ttft, tds=tds), TokenPacer(ttft=ttft, tds=tds)
    for a, b in zip(times, later, strict=True):
        before.deliver(1, a)
        after.deliver(1, b)
    assert after.delay_sum >= before.delay_sum - 1e-9


def test_delaying_one_token_can_raise_the_area_ratio() -> None:
    """A property of the exact formula, kept on purpose: S_whole grows with t_end, so pushing
    the last token of an already late response further out dilutes the ratio. Two tokens,
    tau=1, d=0.5: at (2, 2) S_delay=2, S_whole=3, QoE=1/3; at (2, 3) S_delay=2.5, S_whole=4,
    QoE=3/8. Whole-timeline delays (above) are monotone."""
    assert qoe([2.0, 2.0], 1.0, 2.0) == pytest.approx(1 / 3)
    assert qoe([2.0, 3.0], 1.0, 2.0) == pytest.approx(3 / 8)


@given(deliveries, ttfts, speeds, st.floats(min_value=0.1, max_value=10.0))
def test_scale_invariance(times: list[float], ttft: float, tds: float, k: float) -> None:
    scaled = [t * k for t in times]
    assert qoe(scaled, ttft * k, tds / k) == pytest.approx(qoe(times, ttft, tds), abs=1e-9)


@settings(max_examples=50)
@given(st.lists(st.tuples(deliveries, ttfts, speeds), min_size=1, max_size=20))
def test_vectorized_equals_scalar(cases: list[tuple[list[float], float, float]]) -> None:
    times = [c[0] for c in cases]
    vector = qoe_many(times, np.array([c[1] for c in cases]), np.array([c[2] for c in cases]))
    scalar = np.array([qoe(*c) for c in cases])
    np.testing.assert_allclose(vector, scalar, rtol=0, atol=1e-9)


def test_vectorized_handles_empty_rows_and_broadcasts() -> None:
    out = qoe_many([[], on_time(5, 1.0, 4.8), [9.0]], 1.0, 4.8)
    assert out[0] == 0.0 and out[1] == 1.0 and 0.0 < out[2] < 1.0


# -- the pacer ----------------------------------------------------------------------------


@given(deliveries, ttfts, speeds)
def test_pacer_tracks_the_metric(times: list[float], ttft: float, tds: float) -> None:
    pacer = TokenPacer(ttft=ttft, tds=tds, arrival_s=100.0)
    shown: list[float] = []
    for t in times:
        shown += pacer.deliver(1, 100.0 + t)
    assert pacer.qoe() == pytest.approx(qoe(times, ttft, tds), abs=1e-9)
    gaps = np.diff(shown)
    assert np.all(gaps >= 1.0 / tds - 1e-9)  # never faster than the reading speed
    assert all(s >= 100.0 + t - 1e-9 for s, t in zip(shown, times, strict=True))  # never early


def test_pacer_buffer() -> None:
    pacer = TokenPacer(ttft=1.0, tds=2.0)
    pacer.deliver(10, 0.5)  # ten tokens at once: 5 s of reading from 0.5
    assert pacer.buffered_seconds(0.5) == pytest.approx(5.0)
    assert pacer.buffered_seconds(3.0) == pytest.approx(2.5)
    assert pacer.qoe() == 1.0


# -- the predictor ------------------------------------------------------------------------


def replay(times: list[float], tds: float) -> tuple[int, float, float, float]:
    pacer = TokenPacer(ttft=1.0, tds=tds)
    for t in times:
        pacer.deliver(1, t)
    return pacer.count, pacer.digest_max, pacer.delay_sum, pacer.ttft


@given(
    st.lists(st.floats(min_value=0.0, max_value=20.0), max_size=30).map(sorted),
    st.floats(min_value=0.0, max_value=5.0),
    st.floats(min_value=0.01, max_value=1.0),
    st.floats(min_value=0.5, max_value=30.0),
    st.floats(min_value=1.0, max_value=8.0),
)
def test_serving_never_predicts_worse_than_waiting(
    past: list[float], gap: float, latency: float, horizon: float, tds: float
) -> None:
    now = (past[-1] if past else 0.0) + gap
    count, digest_max, delay_sum, ttft = replay(past, tds)
    kwargs = {
        "now": now, "horizon": horizon, "ttft": ttft, "tds": tds, "count": count,
        "digest_max": digest_max, "delay_sum": delay_sum, "token_latency": latency,
    }
    served = float(predict_qoe(**kwargs, served=True))
    waiting = float(predict_qoe(**kwargs, served=False))
    assert 0.0 <= waiting <= served + 1e-9 <= 1.0 + 1e-9


def explicit_prediction(
    past: list[float], now: float, start_delay: float, horizon: float, latency: float,
    tds: float, ttft: float = 1.0,
) -> float:
    """The predictor's definition by brute force, token by token: delivered tokens keep
    their delay; projected ones are paced and count ``min(c_i, T) - e_i`` if expected before
    the horizon T; missing ones expected before T count ``T - e_i``."""
    d = 1.0 / tds
    end = now + horizon
    pacer = TokenPacer(ttft=ttft, tds=tds)
    for t in past:
        pacer.deliver(1, t)
    delay = pacer.delay_sum
    new = max(0, math.floor((horizon - start_delay) / latency))
    for j in range(1, new + 1):
        index = pacer.count  # 0-based index of this token
        (shown,) = pacer.deliver(1, now + start_delay + j * latency)
        ideal = ttft + index * d
        if ideal < end:
            delay += max(0.0, min(shown, end) - ideal)
    expected = math.ceil(max(end - ttft, 0.0) / d)
    delay += sum(end - (ttft + (i - 1) * d) for i in range(pacer.count + 1, expected + 1))
    span = max(end - ttft, 0.0)
    whole = span * span / (2 * d)
    if whole <= 0:
        return 1.0
    return min(1.0, max(0.0, 1.0 - delay / whole))


@pytest.mark.parametrize("latency", [0.05, 0.25, 0.5])  # faster, equal, slower than d = 0.25
def test_predictor_matches_brute_force(latency: float) -> None:
    past = [1.5, 1.6, 1.7, 3.0]
    count, digest_max, delay_sum, ttft = replay(past, 4.0)
    predicted = predict_qoe(
        now=3.2, horizon=4.0, ttft=ttft, tds=4.0, count=count, digest_max=digest_max,
        delay_sum=delay_sum, token_latency=latency, start_delay=0.3,
    )
    assert float(predicted) == pytest.approx(
        explicit_prediction(past, 3.2, 0.3, 4.0, latency, 4.0), abs=1e-9
    )


@given(
    st.lists(st.floats(min_value=0.0, max_value=20.0), max_size=30).map(sorted),
    st.floats(min_value=0.0, max_value=5.0),
    st.floats(min_value=0.02, max_value=1.0),
    st.floats(min_value=0.0, max_value=2.0),
    st.floats(min_value=0.5, max_value=20.0),
    st.floats(min_value=1.0, max_value=8.0),
)
def test_predictor_matches_brute_force_property(
    past: list[float], gap: float, latency: float, start_delay: float, horizon: float, tds: float
) -> None:
    now = (past[-1] if past else 0.0) + gap
    assume(abs((horizon - start_delay) / latency - round((horizon - start_delay) / latency))
           > 1e-6)  # avoid a token landing exactly on the horizon (floating-point floor)
    count, digest_max, delay_sum, ttft = replay(past, tds)
    predicted = predict_qoe(
        now=now, horizon=horizon, ttft=ttft, tds=tds, count=count, digest_max=digest_max,
        delay_sum=delay_sum, token_latency=latency, start_delay=start_delay,
    )
    assert float(predicted) == pytest.approx(
        explicit_prediction(past, now, start_delay, horizon, latency, tds), abs=1e-7
    )
