"""Seeded, reproducible request streams: when requests arrive, how long they are, what users expect.

A workload is three independent choices, each named by a short spec string so that a run can be
reproduced from its command line:

* an arrival process (``poisson``, ``gamma:CV``, ``burst:INTENSITY,FRACTION[,PERIOD_S]``) says when
  requests come;
* a length distribution (``sharegpt``, ``alpaca``, ``arxiv``, ``trace:FILE``) says how many prompt
  tokens each request brings and how many output tokens it will generate;
* a QoE mix (``reading``, ``voice``, ``uniform:TTFT,TDS``) says what each user expects: the time to
  first token (TTFT) and the token delivery speed (TDS, tokens/s) at which they consume the stream.

Each choice draws from its own child of ``np.random.SeedSequence(seed)``, so changing the rate or
the arrival process leaves the lengths and QoE targets of the i-th request unchanged, and every
sampler draws request i from the i-th slot of its stream, so a run with fewer requests is a prefix
of one with more. Policies and load levels are therefore compared on the same requests.

Sources of the synthetic length distributions (token counts are OPT/GPT-2 BPE tokens):

* Andes (Liu et al., arXiv 2404.16283): the output lengths of its ShareGPT trace, mean 332,
  median 287, max 1327 tokens.
* vLLM (Kwon et al., "Efficient Memory Management for Large Language Model Serving with
  PagedAttention", SOSP'23, Sec. 6.1 and Fig. 11): mean input/output tokens are 161.31/337.99 for
  ShareGPT and 19.31/58.45 for Alpaca, after the pruning of vLLM's benchmark scripts
  (``is_valid_sequence`` in ``benchmarks/benchmark_dataset.py`` of vllm-project/vllm: prompts and
  outputs of at least 4 tokens, prompts of at most 1024 tokens, at most 2048 tokens in total).
* arXiv summarization (Cohan et al., "A Discourse-Aware Attention Model for Abstractive
  Summarization of Long Documents", NAACL 2018), as tabulated in the dataset card of
  ``ccdv/arxiv-summarization`` on Hugging Face: articles average 6038 whitespace-separated tokens
  in the training split (5894 and 5905 in validation and test).

Where no public statistic pins a shape parameter, the value is an assumption stated next to it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

__all__ = [
    "ALPACA",
    "ARXIV",
    "SHAREGPT",
    "ArrivalProcess",
    "BurstArrivals",
    "FloatArray",
    "GammaArrivals",
    "IntArray",
    "LengthDistribution",
    "PoissonArrivals",
    "QoEMix",
    "SyntheticLengths",
    "TokenCountDistribution",
    "TraceLengths",
    "Workload",
    "make_workload",
    "parse_arrival",
    "parse_lengths",
    "parse_qoe_mix",
]

ARRIVAL_SPECS = "poisson, gamma:CV or burst:INTENSITY,FRACTION[,PERIOD_S]"
LENGTH_SPECS = "sharegpt, alpaca, arxiv or trace:FILE"
QOE_SPECS = "reading, voice or uniform:TTFT,TDS"

CHARS_PER_TOKEN = 4
"""Characters per token when a trace gives only prompt text: OpenAI's rule of thumb for English
text under GPT-style BPE ("one token is about four characters"), close enough for scheduling."""

TTFT_FLOOR_S = 1.0
"""Users of a chat service accept about a second before the first token appears."""
TTFT_PROMPT_TOKENS_PER_S = 5000.0
"""Prompts too long to prefill within the floor get 1 s more per this many tokens, so a long
document does not come with an expectation no server can meet."""

READING_TOKEN_LATENCIES_S = (0.196, 0.23, 0.24, 0.249, 0.264)
READING_LATENCY_WEIGHTS = (0.27, 0.52, 0.11, 0.06, 0.035)
"""Per-token reading latency of users and its frequency, from the Andes paper's trace. The
published weights sum to 0.995; they are renormalized."""

VOICE_TDS = 3.3
"""Speech runs at about 150 words a minute, i.e. 2.5 words or 3.3 tokens a second."""


# ---------------------------------------------------------------------------------------------
# Workload


@dataclass(frozen=True, eq=False)
class Workload:
    """A request stream as arrays (struct of arrays), sorted by arrival.

    The arrays are read-only copies, so a workload shared between runs cannot be altered by one
    of them. Equality is identity: compare the arrays to compare contents.
    """

    arrival_s: FloatArray
    """Seconds from the start of the run, non-decreasing."""
    prompt_tokens: IntArray
    """Prompt length in tokens, >= 1."""
    output_tokens: IntArray
    """Tokens the request generates, >= 1."""
    ttft_s: FloatArray
    """Expected time to first token, seconds, > 0."""
    tds: FloatArray
    """Expected token delivery speed, tokens/s, > 0."""
    prompts: tuple[str, ...] | None = None
    """Prompt texts, when a trace gave them (a real engine needs text; the simulator does not)."""

    def __post_init__(self) -> None:
        for name, dtype in (
            ("arrival_s", np.float64),
            ("prompt_tokens", np.int64),
            ("output_tokens", np.int64),
            ("ttft_s", np.float64),
            ("tds", np.float64),
        ):
            values = np.array(getattr(self, name), dtype=dtype)
            values.flags.writeable = False
            object.__setattr__(self, name, values)
        n = self.arrival_s.size
        arrays = (self.arrival_s, self.prompt_tokens, self.output_tokens, self.ttft_s, self.tds)
        if any(a.ndim != 1 or a.size != n for a in arrays):
            raise ValueError(
                "workload arrays must be 1-D and equally long, got shapes "
                f"{[a.shape for a in arrays]}"
            )
        if self.prompts is not None and len(self.prompts) != n:
            raise ValueError(f"workload has {n} requests but {len(self.prompts)} prompt texts")
        if not np.all(np.isfinite(self.arrival_s)) or np.any(self.arrival_s < 0):
            raise ValueError("arrival_s must be finite and >= 0")
        if np.any(np.diff(self.arrival_s) < 0):
            raise ValueError("arrival_s must be non-decreasing (sorted by arrival)")
        if np.any(self.prompt_tokens < 1) or np.any(self.output_tokens < 1):
            raise ValueError("prompt_tokens and output_tokens must be >= 1")
        for name, values in (("ttft_s", self.ttft_s), ("tds", self.tds)):
            if not np.all(np.isfinite(values) & (values > 0)):
                raise ValueError(f"{name} must be finite and > 0")

    def __len__(self) -> int:
        return int(self.arrival_s.size)

    def slice(self, start: int, stop: int) -> Workload:
        """Requests ``start:stop`` (Python slice semantics), arrival times unchanged."""
        return Workload(
            arrival_s=self.arrival_s[start:stop],
            prompt_tokens=self.prompt_tokens[start:stop],
            output_tokens=self.output_tokens[start:stop],
            ttft_s=self.ttft_s[start:stop],
            tds=self.tds[start:stop],
            prompts=None if self.prompts is None else self.prompts[start:stop],
        )

    def to_jsonl(self, path: str | Path) -> None:
        """Write the trace format that ``trace:FILE`` reads, one request per line.

        Floats are written with ``repr`` precision, so replaying the file reproduces the
        workload exactly.
        """
        columns = zip(
            self.arrival_s.tolist(),
            self.prompt_tokens.tolist(),
            self.output_tokens.tolist(),
            self.ttft_s.tolist(),
            self.tds.tolist(),
            strict=True,
        )
        with Path(path).open("w", encoding="utf-8") as out:
            for i, (arrival_s, prompt_tokens, output_tokens, ttft_s, tds) in enumerate(columns):
                record: dict[str, Any] = {
                    "arrival_s": arrival_s,
                    "prompt_tokens": prompt_tokens,
                    "output_tokens": output_tokens,
                    "ttft_s": ttft_s,
                    "tds": tds,
                }
                if self.prompts is not None:
                    record["prompt"] = self.prompts[i]
                out.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------
# Arrival processes


class ArrivalProcess(Protocol):
    """When requests arrive, at a long-run average of ``rate`` requests per second."""

    def arrivals(
        self,
        rate: float,
        rng: np.random.Generator,
        *,
        duration_s: float | None = None,
        num_requests: int | None = None,
    ) -> FloatArray:
        """Non-decreasing arrival times: the first ``num_requests``, or all in
        ``[0, duration_s)``."""
        ...


def _check_extent(rate: float, duration_s: float | None, num_requests: int | None) -> None:
    """Reject a rate or run extent that no process can honour, naming the offending argument."""
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a finite number > 0 requests/s, got {rate}")
    if (duration_s is None) == (num_requests is None):
        raise ValueError("give exactly one of duration_s and num_requests")
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s >= 0):
        raise ValueError(f"duration_s must be finite and >= 0, got {duration_s}")
    if num_requests is not None and num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")


def _unit_rate_epochs(
    draw_gaps: Callable[[int], FloatArray],
    gap_cv: float,
    horizon: float | None,
    count: int | None,
) -> FloatArray:
    """Event times of a renewal process whose gaps have mean 1: the first ``count`` or all
    before ``horizon``.

    Every process is such a stream in "operational time", stretched into wall-clock time, so
    this is the one place that decides how many gaps to draw. Gaps are drawn in chunks sized to
    cover the horizon with high probability, and the stream is consumed in order, so request i
    always uses the i-th gap.
    """
    if count is not None:
        return np.cumsum(draw_gaps(count))
    assert horizon is not None, "exactly one of horizon and count is set"
    chunks: list[FloatArray] = []
    reached = 0.0
    while reached < horizon:
        remaining = horizon - reached
        # Six standard deviations of slack, at most doubling the draw: heavy-tailed gaps that
        # still fall short are topped up by the next chunk.
        slack = min(6.0 * gap_cv * math.sqrt(remaining), remaining)
        size = int(remaining + slack) + 16
        epochs = reached + np.cumsum(draw_gaps(size))
        chunks.append(epochs)
        reached = float(epochs[-1])
    if not chunks:
        return np.empty(0, dtype=np.float64)
    epochs = np.concatenate(chunks)
    return epochs[: int(np.searchsorted(epochs, horizon, side="left"))]


@dataclass(frozen=True)
class PoissonArrivals:
    """Exponential inter-arrival times: independent users, the usual serving-benchmark load."""

    def arrivals(
        self,
        rate: float,
        rng: np.random.Generator,
        *,
        duration_s: float | None = None,
        num_requests: int | None = None,
    ) -> FloatArray:
        _check_extent(rate, duration_s, num_requests)
        horizon = None if duration_s is None else rate * duration_s
        return _unit_rate_epochs(rng.standard_exponential, 1.0, horizon, num_requests) / rate


MAX_GAMMA_CV = 10.0
"""Beyond this the gamma shape (below 0.01) is so small that most sampled gaps underflow to 0
and a few hold the whole run: a degenerate process rather than a burstier one."""


@dataclass(frozen=True)
class GammaArrivals:
    """Gamma inter-arrival times with coefficient of variation ``cv`` (burstier when > 1).

    Shape ``1/cv**2`` and mean ``1/rate``; ``cv = 1`` is Poisson. vLLM's serving benchmark uses
    the same family (its ``burstiness`` is the shape).
    """

    cv: float

    def __post_init__(self) -> None:
        if not (0 < self.cv <= MAX_GAMMA_CV):
            raise ValueError(f"gamma CV must be in (0, {MAX_GAMMA_CV:g}], got {self.cv}")

    def arrivals(
        self,
        rate: float,
        rng: np.random.Generator,
        *,
        duration_s: float | None = None,
        num_requests: int | None = None,
    ) -> FloatArray:
        _check_extent(rate, duration_s, num_requests)
        shape = 1.0 / self.cv**2

        def draw_gaps(size: int) -> FloatArray:
            return rng.gamma(shape, 1.0 / shape, size)

        horizon = None if duration_s is None else rate * duration_s
        return _unit_rate_epochs(draw_gaps, self.cv, horizon, num_requests) / rate


@dataclass(frozen=True)
class BurstArrivals:
    """Cyclic surges: each ``period_s`` cycle opens with a burst of ``fraction * period_s``
    seconds at ``intensity`` times the average rate, then an off-peak phase at the rate that
    keeps the long-run average at ``rate``; arrivals are Poisson within each phase.

    This is the surge the Andes paper targets: a scheduler that is fair only on average lets
    the burst's users wait.
    """

    intensity: float = 2.0
    fraction: float = 0.35
    period_s: float = 60.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.intensity) and self.intensity > 0):
            raise ValueError(f"burst INTENSITY must be a finite number > 0, got {self.intensity}")
        if not (0 < self.fraction < 1):
            raise ValueError(f"burst FRACTION must be in (0, 1), got {self.fraction}")
        if not (math.isfinite(self.period_s) and self.period_s > 0):
            raise ValueError(f"burst PERIOD_S must be a finite number > 0, got {self.period_s}")
        if self.intensity * self.fraction > 1:
            raise ValueError(
                f"burst INTENSITY*FRACTION must be <= 1, got {self.intensity}*{self.fraction} = "
                f"{self.intensity * self.fraction}: the burst alone would exceed the average "
                "rate and the off-peak rate would be negative"
            )

    def phase_rates(self, rate: float) -> tuple[float, float]:
        """Requests/s in the burst phase and in the off-peak phase for average ``rate``."""
        burst_rate = self.intensity * rate
        off_rate = max(0.0, (rate - burst_rate * self.fraction) / (1.0 - self.fraction))
        return burst_rate, off_rate

    def arrivals(
        self,
        rate: float,
        rng: np.random.Generator,
        *,
        duration_s: float | None = None,
        num_requests: int | None = None,
    ) -> FloatArray:
        """Unit-rate Poisson epochs mapped through the inverse of the cumulative rate: the
        time-rescaling construction of a non-homogeneous Poisson process, exact and vectorized.
        """
        _check_extent(rate, duration_s, num_requests)
        burst_rate, off_rate = self.phase_rates(rate)
        burst_s = self.fraction * self.period_s
        burst_mass = burst_rate * burst_s
        cycle_mass = burst_mass + off_rate * (self.period_s - burst_s)
        horizon = None
        if duration_s is not None:
            cycles, end_into_cycle_s = divmod(duration_s, self.period_s)
            horizon = (
                cycles * cycle_mass
                + burst_rate * min(end_into_cycle_s, burst_s)
                + off_rate * max(end_into_cycle_s - burst_s, 0.0)
            )
        epochs = _unit_rate_epochs(rng.standard_exponential, 1.0, horizon, num_requests)
        cycle_index, mass_into_cycle = np.divmod(epochs, cycle_mass)
        in_burst = mass_into_cycle < burst_mass
        into_cycle_s = np.empty_like(epochs)
        into_cycle_s[in_burst] = mass_into_cycle[in_burst] / burst_rate
        # Empty when the off-peak rate is 0 (INTENSITY*FRACTION == 1): no division by zero.
        into_cycle_s[~in_burst] = burst_s + (mass_into_cycle[~in_burst] - burst_mass) / off_rate
        # Rounding at a phase boundary can put an arrival an ulp past its successor; the running
        # maximum restores the order without moving any arrival measurably.
        times = np.maximum.accumulate(cycle_index * self.period_s + into_cycle_s)
        if duration_s is not None:
            # Nor may rounding push the last arrival onto the horizon itself.
            times = times[times < duration_s]
        return times


# ---------------------------------------------------------------------------------------------
# Length distributions


class LengthDistribution(Protocol):
    """Prompt and output token counts of a request stream."""

    def sample(self, n: int, rng: np.random.Generator) -> tuple[IntArray, IntArray]:
        """``(prompt_tokens, output_tokens)`` of ``n`` requests; request i uses slot i of
        ``rng``."""
        ...


@dataclass(frozen=True)
class TokenCountDistribution:
    """One marginal of a synthetic length distribution: a lognormal (``center`` is the median,
    ``spread`` the standard deviation of the log) or a normal (``center`` the mean, ``spread``
    the standard deviation), rounded to whole tokens and clipped to ``[low, high]``."""

    center: float
    spread: float
    lognormal: bool
    low: int
    high: int

    def from_standard_normal(self, z: FloatArray) -> IntArray:
        """Token counts from standard normal draws, one per request."""
        if self.lognormal:
            counts = self.center * np.exp(self.spread * z)
        else:
            counts = self.center + self.spread * z
        return np.clip(np.rint(counts), self.low, self.high).astype(np.int64)


@dataclass(frozen=True)
class SyntheticLengths:
    """Independent prompt and output counts, the prompt cut to what the context leaves.

    Cutting the prompt (not the output) mirrors a server that truncates an over-long input; the
    output length is what the QoE of a request is measured over, so it keeps its distribution.
    """

    name: str
    prompt: TokenCountDistribution
    output: TokenCountDistribution
    max_context_tokens: int

    def __post_init__(self) -> None:
        if self.output.high + self.prompt.low > self.max_context_tokens:
            raise ValueError(
                f"{self.name}: the longest output ({self.output.high}) leaves less than the "
                f"shortest prompt ({self.prompt.low}) of a {self.max_context_tokens}-token context"
            )

    def sample(self, n: int, rng: np.random.Generator) -> tuple[IntArray, IntArray]:
        # One row of two normals per request keeps request i's lengths independent of n.
        z = rng.standard_normal((n, 2))
        output_tokens = self.output.from_standard_normal(z[:, 1])
        prompt_tokens = np.minimum(
            self.prompt.from_standard_normal(z[:, 0]), self.max_context_tokens - output_tokens
        )
        return prompt_tokens, output_tokens


OPT_CONTEXT_TOKENS = 2048
"""OPT's maximum context, the model family of the Andes and vLLM evaluations."""
LONG_CONTEXT_TOKENS = 8192
"""An 8K-context model: the class that serves long-document summarization."""
ARXIV_BPE_TOKENS_PER_WORD = 1.3
"""Assumed BPE tokens per whitespace-separated token of the pre-tokenized arXiv articles (about
4/3 tokens per English word, less because punctuation is already split off)."""
ARXIV_ARTICLE_MEAN_TOKENS = 6038 * ARXIV_BPE_TOKENS_PER_WORD
ARXIV_ARTICLE_LOG_SPREAD = 0.6
"""Assumed spread of log article length; the dataset card gives only means."""

SHAREGPT = SyntheticLengths(
    name="sharegpt",
    # Lognormal fitted to the Andes trace: median 287 sets the location; the log spread 0.5433
    # brings the mean, after clipping to the trace's range [1, 1327], to 332.
    output=TokenCountDistribution(center=287.0, spread=0.5433, lognormal=True, low=1, high=1327),
    # Lognormal within vLLM's pruning bounds [4, 1024]; the median 100.97 brings the mean, after
    # clipping and the 2048-token context, to vLLM's 161.31. The log spread 1.0 is an assumption
    # (vLLM's Fig. 11 shows a right-skewed histogram; no public median was found).
    prompt=TokenCountDistribution(center=100.97, spread=1.0, lognormal=True, low=4, high=1024),
    max_context_tokens=OPT_CONTEXT_TOKENS,
)

ALPACA = SyntheticLengths(
    name="alpaca",
    # Medians fitted so that the means after clipping to vLLM's pruning bounds are vLLM's 58.45
    # (output) and 19.31 (input); the log spreads 0.9 and 0.6 are assumptions (short, uniform
    # instructions; answers from one word to a few paragraphs).
    output=TokenCountDistribution(center=39.02, spread=0.9, lognormal=True, low=4, high=1024),
    prompt=TokenCountDistribution(center=16.13, spread=0.6, lognormal=True, low=4, high=1024),
    max_context_tokens=OPT_CONTEXT_TOKENS,
)

ARXIV = SyntheticLengths(
    name="arxiv",
    # Summaries of N(600, 150) tokens, as the design specifies for arXiv summarization.
    output=TokenCountDistribution(
        center=600.0, spread=150.0, lognormal=False, low=1, high=LONG_CONTEXT_TOKENS - 1
    ),
    # Whole articles: a lognormal with the mean article length of the arXiv summarization
    # dataset (6038 whitespace-separated tokens x 1.3), then cut to the 8K context, as a server
    # truncates a document longer than its window (about 40% of articles are).
    prompt=TokenCountDistribution(
        center=ARXIV_ARTICLE_MEAN_TOKENS / math.exp(ARXIV_ARTICLE_LOG_SPREAD**2 / 2),
        spread=ARXIV_ARTICLE_LOG_SPREAD,
        lognormal=True,
        low=1,
        high=LONG_CONTEXT_TOKENS - 1,
    ),
    max_context_tokens=LONG_CONTEXT_TOKENS,
)

SYNTHETIC_LENGTHS = {lengths.name: lengths for lengths in (SHAREGPT, ALPACA, ARXIV)}


@dataclass(frozen=True, eq=False)
class TraceLengths:
    """A JSONL trace, replayed: lengths always, and arrivals, QoE targets and texts where the
    trace has them.

    One JSON object per line: ``arrival_s`` (seconds), ``prompt_tokens`` or ``prompt`` (text),
    ``output_tokens``, and optionally ``ttft_s`` and ``tds``. Either every line has
    ``arrival_s`` (replayed as is, sorted) or none has (the arrival process supplies them);
    likewise for ``prompt``. Lines without ``ttft_s``/``tds`` get them from the QoE mix.
    """

    path: Path
    arrival_s: FloatArray | None
    prompt_tokens: IntArray
    output_tokens: IntArray
    ttft_s: FloatArray
    """NaN where the line has none."""
    tds: FloatArray
    """NaN where the line has none."""
    prompts: tuple[str, ...] | None

    def __len__(self) -> int:
        return int(self.prompt_tokens.size)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[IntArray, IntArray]:
        """The lengths of the first ``n`` records, cycling through the trace if ``n`` exceeds
        it; ``rng`` is unused because a replay is not random."""
        rows = self.cycled_rows(n)
        return self.prompt_tokens[rows], self.output_tokens[rows]

    def cycled_rows(self, n: int) -> IntArray:
        """Record indices for ``n`` requests, repeating the trace from its start as needed."""
        return np.arange(n, dtype=np.int64) % len(self)

    def timed_rows(self, duration_s: float | None, num_requests: int | None) -> IntArray:
        """Record indices of a timed trace: its first ``num_requests``, or those arriving in
        ``[0, duration_s)``."""
        assert self.arrival_s is not None, "only a trace with arrival times has a clock"
        if num_requests is None:
            assert duration_s is not None, "exactly one of duration_s and num_requests is set"
            count = int(np.searchsorted(self.arrival_s, duration_s, side="left"))
            return np.arange(count, dtype=np.int64)
        if num_requests > len(self):
            raise ValueError(
                f"trace {self.path} holds {len(self)} requests, {num_requests} were asked for"
            )
        return np.arange(num_requests, dtype=np.int64)


MAX_TRACE_TOKENS = 2**31 - 1
"""Largest token count a trace may give: far beyond any context window, and safe for int64 sums."""


def _finite_float(value: object) -> float | None:
    """``value`` as a float if it is a finite JSON number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _trace_tokens(record: dict[str, Any], key: str, where: str) -> int | None:
    """``record[key]`` checked to be a token count; None when absent or null."""
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TRACE_TOKENS:
        raise ValueError(
            f"{where}: {key!r} must be an integer in [1, {MAX_TRACE_TOKENS}], got {value!r}"
        )
    return value


def _trace_float(
    record: dict[str, Any], key: str, where: str, *, zero_allowed: bool
) -> float | None:
    """``record[key]`` checked to be a finite number > 0 (>= 0 if ``zero_allowed``); None when
    absent or null."""
    value = record.get(key)
    if value is None:
        return None
    number = _finite_float(value)
    if number is None or number < 0 or (number == 0 and not zero_allowed):
        bound = ">= 0" if zero_allowed else "> 0"
        raise ValueError(f"{where}: {key!r} must be a finite number {bound}, got {value!r}")
    return number


def _read_trace(path: Path) -> TraceLengths:
    """Parse and validate a JSONL trace; every problem names its file, line and field."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read trace file {str(path)!r}: {err}") from err
    arrivals: list[float] = []
    prompt_tokens: list[int] = []
    output_tokens: list[int] = []
    ttft_s: list[float] = []
    tds: list[float] = []
    prompts: list[str] = []
    first_line: tuple[int, dict[str, bool]] | None = None
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {line_number}"
        try:
            record = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{where}: invalid JSON: {err}") from err
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        prompt = record.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"{where}: 'prompt' must be a string, got {prompt!r}")
        tokens = _trace_tokens(record, "prompt_tokens", where)
        if tokens is None:
            if prompt is None:
                raise ValueError(f"{where}: needs 'prompt_tokens' or 'prompt'")
            tokens = max(1, math.ceil(len(prompt) / CHARS_PER_TOKEN))
        output = _trace_tokens(record, "output_tokens", where)
        if output is None:
            raise ValueError(f"{where}: missing 'output_tokens'")
        arrival = _trace_float(record, "arrival_s", where, zero_allowed=True)
        # A replay cannot mix its own clock with generated arrivals, nor texts with none.
        presence = {"arrival_s": arrival is not None, "prompt": prompt is not None}
        if first_line is None:
            first_line = (line_number, presence)
        for key, present in presence.items():
            if present != first_line[1][key]:
                raise ValueError(
                    f"{where}: {key!r} must be on every line or on none (line {first_line[0]} "
                    f"{'has' if first_line[1][key] else 'lacks'} it)"
                )
        ttft = _trace_float(record, "ttft_s", where, zero_allowed=False)
        speed = _trace_float(record, "tds", where, zero_allowed=False)
        arrivals.append(math.nan if arrival is None else arrival)
        prompt_tokens.append(tokens)
        output_tokens.append(output)
        ttft_s.append(math.nan if ttft is None else ttft)
        tds.append(math.nan if speed is None else speed)
        if prompt is not None:
            prompts.append(prompt)
    if first_line is None:
        raise ValueError(f"trace file {str(path)!r} has no requests")
    order = np.arange(len(prompt_tokens))
    arrival_s = None
    if first_line[1]["arrival_s"]:
        arrival_s = np.array(arrivals, dtype=np.float64)
        order = np.argsort(arrival_s, kind="stable")
        arrival_s = arrival_s[order]
    return TraceLengths(
        path=path,
        arrival_s=arrival_s,
        prompt_tokens=np.array(prompt_tokens, dtype=np.int64)[order],
        output_tokens=np.array(output_tokens, dtype=np.int64)[order],
        ttft_s=np.array(ttft_s, dtype=np.float64)[order],
        tds=np.array(tds, dtype=np.float64)[order],
        prompts=tuple(prompts[i] for i in order.tolist()) if prompts else None,
    )


# ---------------------------------------------------------------------------------------------
# QoE mixes


@dataclass(frozen=True)
class QoEMix:
    """What users expect: each request's TDS is drawn from ``tds_choices`` with
    ``tds_weights``; its TTFT is ``ttft_s``, or ``max(1, prompt_tokens / 5000)`` seconds when
    that is None (a long prompt earns a proportionally longer wait)."""

    tds_choices: tuple[float, ...]
    tds_weights: tuple[float, ...]
    ttft_s: float | None = None

    def __post_init__(self) -> None:
        if not self.tds_choices or len(self.tds_choices) != len(self.tds_weights):
            raise ValueError("a QoE mix needs as many TDS weights as TDS choices, at least one")
        if not all(math.isfinite(v) and v > 0 for v in self.tds_choices):
            raise ValueError(f"TDS must be finite and > 0, got {self.tds_choices}")
        if not all(math.isfinite(w) and w >= 0 for w in self.tds_weights) or not (
            sum(self.tds_weights) > 0
        ):
            raise ValueError(f"TDS weights must be >= 0 with a positive sum: {self.tds_weights}")
        if self.ttft_s is not None and not (math.isfinite(self.ttft_s) and self.ttft_s > 0):
            raise ValueError(f"TTFT must be a finite number of seconds > 0, got {self.ttft_s}")

    def sample(
        self, prompt_tokens: IntArray, rng: np.random.Generator
    ) -> tuple[FloatArray, FloatArray]:
        """``(ttft_s, tds)`` for requests with these prompt lengths; request i uses slot i."""
        cumulative = np.cumsum(self.tds_weights) / sum(self.tds_weights)
        choice = np.searchsorted(cumulative, rng.random(prompt_tokens.size), side="right")
        tds = np.asarray(self.tds_choices, dtype=np.float64)[
            np.minimum(choice, len(self.tds_choices) - 1)
        ]
        if self.ttft_s is None:
            ttft_s = np.maximum(TTFT_FLOOR_S, prompt_tokens / TTFT_PROMPT_TOKENS_PER_S)
        else:
            ttft_s = np.full(prompt_tokens.size, self.ttft_s)
        return ttft_s.astype(np.float64), tds


READING = QoEMix(
    tds_choices=tuple(1.0 / latency for latency in READING_TOKEN_LATENCIES_S),
    tds_weights=READING_LATENCY_WEIGHTS,
)
VOICE = QoEMix(tds_choices=(VOICE_TDS,), tds_weights=(1.0,))


# ---------------------------------------------------------------------------------------------
# Spec parsing


def _spec_numbers(spec: str, arguments: str, usage: str, count: range) -> list[float]:
    """The comma-separated finite numbers after ``kind:`` in ``spec``, as many as ``count``
    allows; ``usage`` (e.g. ``gamma:CV``) is quoted back when they are not."""
    parts = arguments.split(",")
    try:
        numbers = [float(part) for part in parts]
    except ValueError:
        numbers = []
    if len(parts) not in count or len(numbers) != len(parts):
        raise ValueError(f"bad spec {spec!r}: expected {usage}, each field a number")
    if not all(math.isfinite(x) for x in numbers):
        raise ValueError(f"bad spec {spec!r}: the fields of {usage} must be finite")
    return numbers


def parse_arrival(spec: str) -> ArrivalProcess:
    """``poisson`` | ``gamma:CV`` | ``burst:INTENSITY,FRACTION[,PERIOD_S]``."""
    kind, colon, arguments = spec.partition(":")
    if spec == "poisson":
        return PoissonArrivals()
    if kind == "gamma" and colon:
        (cv,) = _spec_numbers(spec, arguments, "gamma:CV", range(1, 2))
        return GammaArrivals(cv)
    if kind == "burst" and colon:
        numbers = _spec_numbers(spec, arguments, "burst:INTENSITY,FRACTION[,PERIOD_S]", range(2, 4))
        return BurstArrivals(*numbers)
    raise ValueError(f"unknown arrival {spec!r}: expected {ARRIVAL_SPECS}")


def parse_qoe_mix(spec: str) -> QoEMix:
    """``reading`` | ``voice`` | ``uniform:TTFT,TDS``."""
    kind, colon, arguments = spec.partition(":")
    if spec == "reading":
        return READING
    if spec == "voice":
        return VOICE
    if kind == "uniform" and colon:
        ttft_s, tds = _spec_numbers(spec, arguments, "uniform:TTFT,TDS", range(2, 3))
        return QoEMix(tds_choices=(tds,), tds_weights=(1.0,), ttft_s=ttft_s)
    raise ValueError(f"unknown QoE mix {spec!r}: expected {QOE_SPECS}")


def parse_lengths(spec: str) -> LengthDistribution:
    """``sharegpt`` | ``alpaca`` | ``arxiv`` | ``trace:FILE`` (the file is read and checked now)."""
    kind, colon, path = spec.partition(":")
    if spec in SYNTHETIC_LENGTHS:
        return SYNTHETIC_LENGTHS[spec]
    if kind == "trace" and colon:
        if not path:
            raise ValueError(f"bad spec {spec!r}: trace:FILE needs a file path")
        return _read_trace(Path(path))
    raise ValueError(f"unknown workload {spec!r}: expected {LENGTH_SPECS}")


# ---------------------------------------------------------------------------------------------
# Assembly


def make_workload(
    workload: str,
    qoe_mix: str,
    arrival: str,
    rate: float,
    *,
    duration_s: float | None = None,
    num_requests: int | None = None,
    seed: int = 0,
) -> Workload:
    """A request stream from spec strings: ``num_requests`` requests, or all arriving in
    ``[0, duration_s)``, at ``rate`` requests/s.

    A trace with arrival times is replayed on its own clock (``arrival`` and ``rate`` are then
    checked but unused); a trace without them gets arrivals from ``arrival`` and is cycled if
    the run needs more requests than it holds.
    """
    lengths = parse_lengths(workload)
    mix = parse_qoe_mix(qoe_mix)
    process = parse_arrival(arrival)
    _check_extent(rate, duration_s, num_requests)
    arrival_rng, length_rng, qoe_rng = (
        np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(3)
    )
    if isinstance(lengths, TraceLengths):
        if lengths.arrival_s is None:
            arrival_s = process.arrivals(
                rate, arrival_rng, duration_s=duration_s, num_requests=num_requests
            )
            rows = lengths.cycled_rows(arrival_s.size)
        else:
            rows = lengths.timed_rows(duration_s, num_requests)
            arrival_s = lengths.arrival_s[rows]
        return _replay(lengths, rows, arrival_s, mix, qoe_rng)
    arrival_s = process.arrivals(
        rate, arrival_rng, duration_s=duration_s, num_requests=num_requests
    )
    prompt_tokens, output_tokens = lengths.sample(arrival_s.size, length_rng)
    ttft_s, tds = mix.sample(prompt_tokens, qoe_rng)
    return Workload(arrival_s, prompt_tokens, output_tokens, ttft_s, tds)


def _replay(
    trace: TraceLengths,
    rows: IntArray,
    arrival_s: FloatArray,
    mix: QoEMix,
    qoe_rng: np.random.Generator,
) -> Workload:
    """The trace records ``rows`` arriving at ``arrival_s``, with the QoE mix filling in the
    targets the trace leaves out."""
    prompt_tokens = trace.prompt_tokens[rows]
    mix_ttft_s, mix_tds = mix.sample(prompt_tokens, qoe_rng)
    trace_ttft_s, trace_tds = trace.ttft_s[rows], trace.tds[rows]
    return Workload(
        arrival_s=arrival_s,
        prompt_tokens=prompt_tokens,
        output_tokens=trace.output_tokens[rows],
        ttft_s=np.where(np.isnan(trace_ttft_s), mix_ttft_s, trace_ttft_s),
        tds=np.where(np.isnan(trace_tds), mix_tds, trace_tds),
        prompts=None if trace.prompts is None else tuple(trace.prompts[i] for i in rows.tolist()),
    )
