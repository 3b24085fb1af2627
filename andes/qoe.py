"""The QoE metric of a streamed response, its client-side pacer, and its planning predictor.

Definition (DESIGN section 2). Times are seconds from the request's arrival; tokens 1..n are
delivered at a_1 <= ... <= a_n; the user expects the first token by tau and then reads at r
tokens/s (d = 1/r):

    e_i = tau + (i-1) d                      ideal digest start of token i
    c_1 = a_1,  c_i = max(a_i, c_{i-1} + d)  digest start behind a buffer paced at r
    S_delay = sum_i max(0, c_i - e_i)
    t_end   = c_n + d
    S_whole = integral_0^t_end clip((t - tau)/d, 0, n) dt
    QoE     = clamp(1 - S_delay / S_whole, 0, 1)

The pacer recursion has a closed form that everything here uses: with
``M_i = max_{j<=i} (a_j - (j-1) d)`` one gets ``c_i = M_i + (i-1) d`` and so
``c_i - e_i = M_i - tau``. A request's whole digest history is therefore summarized by three
numbers: the token count k, the running maximum ``M_k`` and the delay sum ``S_k``. The
simulator, the gateway and the planner all carry just those.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
ArrayLike = npt.ArrayLike


def _check_spec(ttft: float, tds: float) -> None:
    if not (math.isfinite(ttft) and ttft > 0):
        raise ValueError(f"ttft must be a positive finite number of seconds, got {ttft!r}")
    if not (math.isfinite(tds) and tds > 0):
        raise ValueError(f"tds must be a positive finite number of tokens/s, got {tds!r}")


def whole_area(
    t_end: ArrayLike, ttft: ArrayLike, d: ArrayLike, n: ArrayLike
) -> FloatArray | float:
    """Area under the expected curve ``clip((t - tau)/d, 0, n)`` from 0 to ``t_end``."""
    count = np.asarray(n, dtype=np.float64)
    step = np.asarray(d, dtype=np.float64)
    span = np.maximum(np.asarray(t_end, dtype=np.float64) - np.asarray(ttft), 0.0)
    ramp_end = count * step
    on_ramp = span * span / (2.0 * step)
    with np.errstate(invalid="ignore"):  # n may be unbounded (inf): then on_ramp applies
        past_ramp = count * span - ramp_end * count / 2.0
    area = np.where(span < ramp_end, on_ramp, past_ramp)
    return float(area) if np.ndim(area) == 0 else area


def qoe_from_state(
    count: ArrayLike, digest_max: ArrayLike, delay_sum: ArrayLike, ttft: ArrayLike, tds: ArrayLike
) -> FloatArray | float:
    """QoE of finished responses from their summary (count k, running max M_k, S_delay)."""
    n = np.asarray(count, dtype=np.float64)
    d = 1.0 / np.asarray(tds, dtype=np.float64)
    delay = np.asarray(delay_sum, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        t_end = np.asarray(digest_max, dtype=np.float64) + n * d
        whole = np.asarray(whole_area(t_end, ttft, d, n))
        ratio = np.divide(delay, whole, out=np.zeros_like(whole), where=whole > 0)
    value = np.clip(1.0 - ratio, 0.0, 1.0)
    value = np.where(n > 0, value, 0.0)
    return float(value) if np.ndim(value) == 0 else value


def qoe(times: Sequence[float] | FloatArray, ttft: float, tds: float) -> float:
    """QoE of one response whose tokens were delivered at ``times`` (seconds from arrival)."""
    _check_spec(ttft, tds)
    a = np.asarray(times, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError("times must be a one-dimensional sequence of delivery times")
    if a.size == 0:
        return 0.0
    if not np.all(np.isfinite(a)):
        raise ValueError("times must be finite (no NaN or infinity)")
    if np.any(np.diff(a) < 0):
        raise ValueError("times must be sorted in non-decreasing order")
    d = 1.0 / tds
    running_max = np.maximum.accumulate(a - d * np.arange(a.size))
    delay_sum = float(np.maximum(running_max - ttft, 0.0).sum())
    return float(qoe_from_state(a.size, running_max[-1], delay_sum, ttft, tds))


def qoe_many(
    times: Sequence[Sequence[float] | FloatArray], ttft: ArrayLike, tds: ArrayLike
) -> FloatArray:
    """QoE of many responses at once: ``times[i]`` are the delivery times of response i.

    The ragged input is padded into one matrix so the pacer runs as one cumulative max.
    """
    count = len(times)
    ttft_arr = np.broadcast_to(np.asarray(ttft, dtype=np.float64), (count,))
    tds_arr = np.broadcast_to(np.asarray(tds, dtype=np.float64), (count,))
    if not (np.all(np.isfinite(ttft_arr)) and np.all(ttft_arr > 0)):
        raise ValueError("every ttft must be a positive finite number of seconds")
    if not (np.all(np.isfinite(tds_arr)) and np.all(tds_arr > 0)):
        raise ValueError("every tds must be a positive finite number of tokens/s")
    lengths = np.fromiter((len(t) for t in times), dtype=np.int64, count=count)
    width = int(lengths.max(initial=0))
    if width == 0:
        return np.zeros(count)
    padded = np.full((count, width), -np.inf)
    index = np.arange(width)
    valid = index[None, :] < lengths[:, None]
    padded[valid] = np.concatenate([np.asarray(t, dtype=np.float64) for t in times])
    if not np.all(np.isfinite(padded[valid])):
        raise ValueError("times must be finite (no NaN or infinity)")
    with np.errstate(invalid="ignore"):  # padding is -inf; only valid pairs are compared
        steps = np.diff(padded, axis=1)[valid[:, 1:]]
    if np.any(steps < 0):
        raise ValueError("times must be sorted in non-decreasing order")
    d = 1.0 / tds_arr
    running_max = np.maximum.accumulate(padded - d[:, None] * index[None, :], axis=1)
    delays = np.where(valid, np.maximum(running_max - ttft_arr[:, None], 0.0), 0.0)
    last = np.where(lengths > 0, running_max[np.arange(count), np.maximum(lengths - 1, 0)], 0.0)
    return np.asarray(qoe_from_state(lengths, last, delays.sum(axis=1), ttft_arr, tds_arr))


@dataclass
class TokenPacer:
    """The client's token buffer: shows tokens no faster than ``tds`` tokens/s.

    The server pushes tokens as soon as they exist; the pacer decides when the user sees each
    one (its digest start ``c_i``) and keeps the running QoE summary of the response.
    ``arrival_s`` is the request's send time on the caller's clock.
    """

    ttft: float
    tds: float
    arrival_s: float = 0.0
    count: int = 0
    digest_max: float = -math.inf
    delay_sum: float = 0.0

    def __post_init__(self) -> None:
        _check_spec(self.ttft, self.tds)

    @property
    def token_interval(self) -> float:
        return 1.0 / self.tds

    def deliver(self, num_tokens: int, now: float) -> list[float]:
        """Record ``num_tokens`` arriving at ``now``; return when each one should be shown."""
        first = self.count
        self.advance(num_tokens, now)
        start = self.arrival_s + self.digest_max
        d = self.token_interval
        return [start + (first + i) * d for i in range(max(num_tokens, 0))]

    def advance(self, num_tokens: int, now: float) -> None:
        """Record ``num_tokens`` arriving at ``now`` in O(1): the digest start of a token that
        arrives with later ones is the earliest's (``relative - count * d`` falls with the
        count), so the tokens of one arrival share one digest start and one delay."""
        if num_tokens <= 0:
            return
        relative = now - self.arrival_s
        self.digest_max = max(self.digest_max, relative - self.count * self.token_interval)
        self.delay_sum += num_tokens * max(0.0, self.digest_max - self.ttft)
        self.count += num_tokens

    def next_show_time(self) -> float:
        """Earliest time the next token could be shown (end of the last token's slot)."""
        if self.count == 0:
            return self.arrival_s
        return self.arrival_s + self.digest_max + self.count * self.token_interval

    def buffered_seconds(self, now: float) -> float:
        """Seconds of reading the user still has in the buffer at ``now``."""
        return max(0.0, self.next_show_time() - now)

    def qoe(self) -> float:
        """QoE of the response so far, as if it ended now."""
        summary = qoe_from_state(self.count, self.digest_max, self.delay_sum, self.ttft, self.tds)
        return float(summary)


def predict_qoe(
    *,
    now: ArrayLike,
    horizon: float,
    ttft: ArrayLike,
    tds: ArrayLike,
    count: ArrayLike,
    digest_max: ArrayLike,
    delay_sum: ArrayLike,
    token_latency: ArrayLike,
    start_delay: ArrayLike = 0.0,
    served: bool = True,
    max_count: ArrayLike = math.inf,
) -> FloatArray:
    """QoE each request will have at ``now + horizon`` (times relative to its arrival).

    Served: new tokens arrive at ``now + start_delay + j * token_latency``, j = 1, 2, ... (the
    start delay is the prefill or recompute the request still needs). Not served: none arrive.
    The projected deliveries go through the same pacer and the same formula as a finished
    response, truncated at the horizon T: the expected area runs to T, and a token the user
    expects to start reading before T adds its lateness up to T, ``min(c_i, T) - e_i``
    (infinite c_i if it is not delivered by then); tokens expected after T add nothing yet.
    Tokens already delivered keep their whole delay (it is the same whether served or not).
    Everything is closed form, so this is O(1) per request and vectorized.
    """
    now_a = np.asarray(now, dtype=np.float64)
    tau = np.asarray(ttft, dtype=np.float64)
    d = 1.0 / np.asarray(tds, dtype=np.float64)
    k = np.asarray(count, dtype=np.float64)
    m_k = np.asarray(digest_max, dtype=np.float64)
    s_k = np.asarray(delay_sum, dtype=np.float64)
    cap = np.asarray(max_count, dtype=np.float64)
    end = now_a + horizon

    # Tokens the user expects to start reading before the horizon: only they count.
    expected = np.minimum(np.ceil(np.maximum(end - tau, 0.0) / d), cap)
    if served:
        lat = np.asarray(token_latency, dtype=np.float64)
        first = now_a + np.asarray(start_delay, dtype=np.float64)
        new = np.clip(np.floor((end - first) / lat), 0.0, np.maximum(cap - k, 0.0))
        counted = np.minimum(new, np.maximum(expected - k, 0.0))
        # Projected token k+j: lateness g_j = max(held, base + j step) (pacer closed form) and
        # time left until the horizon h_j = room - j d; it adds min(g_j, h_j). g rises, h
        # falls, so g applies to a prefix of x tokens and h to the rest.
        held = np.maximum(m_k - tau, 0.0)
        base = first - (k - 1.0) * d - tau
        step = lat - d
        room = end - tau - (k - 1.0) * d
        with np.errstate(invalid="ignore", divide="ignore"):
            fast = step <= 0
            late_fast = np.maximum(held, base + step)
            cross = np.where(
                fast,
                (room - late_fast) / d,
                np.minimum((room - held) / d, (room - base) / lat),
            )
            x = np.clip(np.ceil(cross) - 1.0, 0.0, counted)
            flat = np.clip(np.floor((held - base) / step), 0.0, x)
            rising = x - flat
            late_slow = flat * held + rising * base + step * (x * (x + 1) - flat * (flat + 1)) / 2
            late_part = np.where(fast, x * late_fast, late_slow)
            horizon_part = (counted - x) * room - d * (counted * (counted + 1) - x * (x + 1)) / 2
        projected = np.where(counted > 0, late_part + horizon_part, 0.0)
    else:
        new = np.zeros_like(k)
        projected = np.zeros_like(k)

    # Tokens expected before the horizon but not delivered: late by (end - e_i) each.
    have = k + new
    missing = np.maximum(expected - have, 0.0)
    tail = missing * (end - tau) - d * (have * missing + missing * (missing - 1.0) / 2.0)

    delay = s_k + projected + tail
    whole = np.asarray(whole_area(end, tau, d, cap))
    ratio = np.divide(delay, whole, out=np.zeros_like(delay), where=whole > 0)
    return np.asarray(np.clip(1.0 - ratio, 0.0, 1.0))
