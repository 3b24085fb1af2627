"""Tests for andes.workload: reproducibility, the statistics each spec promises, trace replay."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from andes.workload import (
    READING_LATENCY_WEIGHTS,
    READING_TOKEN_LATENCIES_S,
    BurstArrivals,
    GammaArrivals,
    PoissonArrivals,
    QoEMix,
    SyntheticLengths,
    TraceLengths,
    Workload,
    make_workload,
    parse_arrival,
    parse_lengths,
    parse_qoe_mix,
)

LARGE = 200_000
"""Samples for statistical checks: sampling error well below the tolerances, so the fixed-seed
checks would also pass for other seeds."""


def assert_same_workload(left: Workload, right: Workload) -> None:
    np.testing.assert_array_equal(left.arrival_s, right.arrival_s)
    np.testing.assert_array_equal(left.prompt_tokens, right.prompt_tokens)
    np.testing.assert_array_equal(left.output_tokens, right.output_tokens)
    np.testing.assert_array_equal(left.ttft_s, right.ttft_s)
    np.testing.assert_array_equal(left.tds, right.tds)
    assert left.prompts == right.prompts


def lengths_of(spec: str, n: int = LARGE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    lengths = parse_lengths(spec)
    return lengths.sample(n, np.random.default_rng(seed))


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_gives_identical_workloads() -> None:
    first = make_workload("sharegpt", "reading", "gamma:2", 4.0, num_requests=5000, seed=7)
    second = make_workload("sharegpt", "reading", "gamma:2", 4.0, num_requests=5000, seed=7)
    assert_same_workload(first, second)


def test_different_seeds_give_different_workloads() -> None:
    first = make_workload("sharegpt", "reading", "poisson", 4.0, num_requests=1000, seed=1)
    second = make_workload("sharegpt", "reading", "poisson", 4.0, num_requests=1000, seed=2)
    assert not np.array_equal(first.arrival_s, second.arrival_s)
    assert not np.array_equal(first.prompt_tokens, second.prompt_tokens)
    assert not np.array_equal(first.output_tokens, second.output_tokens)
    assert not np.array_equal(first.tds, second.tds)


@pytest.mark.parametrize("arrival", ["poisson", "gamma:3", "burst:2,0.35,60"])
def test_rate_and_arrival_process_do_not_change_request_contents(arrival: str) -> None:
    base = make_workload("arxiv", "reading", "poisson", 1.0, num_requests=2000, seed=3)
    other = make_workload("arxiv", "reading", arrival, 9.0, num_requests=2000, seed=3)
    np.testing.assert_array_equal(base.prompt_tokens, other.prompt_tokens)
    np.testing.assert_array_equal(base.output_tokens, other.output_tokens)
    np.testing.assert_array_equal(base.ttft_s, other.ttft_s)
    np.testing.assert_array_equal(base.tds, other.tds)


def test_poisson_arrivals_scale_with_the_rate() -> None:
    slow = make_workload("alpaca", "voice", "poisson", 2.0, num_requests=1000, seed=5)
    fast = make_workload("alpaca", "voice", "poisson", 8.0, num_requests=1000, seed=5)
    np.testing.assert_allclose(fast.arrival_s * 4.0, slow.arrival_s, rtol=1e-12)


@pytest.mark.parametrize("arrival", ["poisson", "gamma:0.5", "burst:3,0.2,30"])
def test_fewer_requests_are_a_prefix_of_more(arrival: str) -> None:
    short = make_workload("sharegpt", "reading", arrival, 3.0, num_requests=300, seed=11)
    long = make_workload("sharegpt", "reading", arrival, 3.0, num_requests=3000, seed=11)
    assert_same_workload(short, long.slice(0, 300))


# ---------------------------------------------------------------------------------------------
# Run extent and arguments


def test_duration_keeps_arrivals_inside_the_window() -> None:
    workload = make_workload("sharegpt", "reading", "poisson", 50.0, duration_s=100.0, seed=0)
    assert len(workload) > 0
    assert workload.arrival_s.min() >= 0
    assert workload.arrival_s.max() < 100.0
    assert np.all(np.diff(workload.arrival_s) >= 0)


def test_zero_duration_gives_an_empty_workload() -> None:
    assert len(make_workload("sharegpt", "reading", "burst:2,0.35", 5.0, duration_s=0.0)) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of duration_s and num_requests"),
        ({"duration_s": 10.0, "num_requests": 10}, "exactly one"),
        ({"duration_s": -1.0}, "duration_s must be"),
        ({"duration_s": math.inf}, "duration_s must be"),
        ({"num_requests": -3}, "num_requests must be >= 0"),
    ],
)
def test_bad_extent_raises(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_workload("sharegpt", "reading", "poisson", 1.0, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("rate", [0.0, -2.0, math.nan, math.inf])
def test_bad_rate_raises(rate: float) -> None:
    with pytest.raises(ValueError, match="rate must be"):
        make_workload("sharegpt", "reading", "poisson", rate, num_requests=10)


def test_generating_100k_requests_is_fast() -> None:
    make_workload("sharegpt", "reading", "burst:2,0.35", 10.0, num_requests=1000)  # warm up
    start = time.perf_counter()
    workload = make_workload("sharegpt", "reading", "burst:2,0.35", 10.0, num_requests=100_000)
    assert time.perf_counter() - start < 0.5
    assert len(workload) == 100_000


@settings(max_examples=50, deadline=None)
@given(
    workload=st.sampled_from(["sharegpt", "alpaca", "arxiv"]),
    qoe_mix=st.sampled_from(["reading", "voice", "uniform:0.5,12"]),
    arrival=st.sampled_from(["poisson", "gamma:0.3", "gamma:6", "burst:1.5,0.5,7", "burst:4,0.25"]),
    rate=st.floats(min_value=0.01, max_value=1000.0),
    num_requests=st.integers(min_value=0, max_value=2000),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_every_workload_satisfies_the_invariants(
    workload: str, qoe_mix: str, arrival: str, rate: float, num_requests: int, seed: int
) -> None:
    generated = make_workload(
        workload, qoe_mix, arrival, rate, num_requests=num_requests, seed=seed
    )
    context = parse_lengths(workload)
    assert isinstance(context, SyntheticLengths)
    assert len(generated) == num_requests
    assert np.all(generated.arrival_s >= 0)
    assert np.all(np.diff(generated.arrival_s) >= 0)
    assert generated.prompt_tokens.min(initial=1) >= 1
    assert generated.output_tokens.min(initial=1) >= 1
    total = generated.prompt_tokens + generated.output_tokens
    assert total.max(initial=0) <= context.max_context_tokens
    assert np.all(generated.ttft_s > 0)
    assert np.all(generated.tds > 0)


# ---------------------------------------------------------------------------------------------
# Arrival processes


@pytest.mark.parametrize(
    "process",
    [PoissonArrivals(), GammaArrivals(0.5), GammaArrivals(3.0), BurstArrivals(2.0, 0.35, 60.0)],
)
def test_long_run_rate_matches_the_requested_rate(
    process: PoissonArrivals | GammaArrivals | BurstArrivals,
) -> None:
    rate = 8.0
    duration_s = LARGE / rate
    arrivals = process.arrivals(rate, np.random.default_rng(0), duration_s=duration_s)
    assert arrivals.size / duration_s == pytest.approx(rate, rel=0.03)
    counted = process.arrivals(rate, np.random.default_rng(1), num_requests=LARGE)
    assert LARGE / counted[-1] == pytest.approx(rate, rel=0.03)


@pytest.mark.parametrize("cv", [0.25, 1.0, 2.0, 4.0])
def test_gamma_gaps_have_the_requested_cv(cv: float) -> None:
    arrivals = GammaArrivals(cv).arrivals(3.0, np.random.default_rng(2), num_requests=LARGE)
    gaps = np.diff(arrivals)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)


def test_burst_windows_run_at_intensity_times_the_rate() -> None:
    process = BurstArrivals(intensity=2.5, fraction=0.2, period_s=30.0)
    rate, cycles = 10.0, 2000
    arrivals = process.arrivals(
        rate, np.random.default_rng(4), duration_s=cycles * process.period_s
    )
    into_cycle_s = np.mod(arrivals, process.period_s)
    in_burst = into_cycle_s < process.fraction * process.period_s
    burst_rate = in_burst.sum() / (cycles * process.fraction * process.period_s)
    off_rate = (~in_burst).sum() / (cycles * (1 - process.fraction) * process.period_s)
    assert burst_rate == pytest.approx(2.5 * rate, rel=0.03)
    assert off_rate == pytest.approx((rate - 2.5 * rate * 0.2) / 0.8, rel=0.03)
    assert (burst_rate, off_rate) == pytest.approx(process.phase_rates(rate), rel=0.03)


def test_burst_saturating_the_rate_leaves_the_off_peak_empty() -> None:
    process = BurstArrivals(intensity=4.0, fraction=0.25, period_s=10.0)
    assert process.phase_rates(2.0) == (8.0, 0.0)
    arrivals = process.arrivals(2.0, np.random.default_rng(0), num_requests=20_000)
    assert np.all(np.mod(arrivals, 10.0) <= 2.5)


def test_burst_defaults() -> None:
    assert parse_arrival("burst:2,0.35") == BurstArrivals(2.0, 0.35, 60.0)
    assert BurstArrivals() == BurstArrivals(2.0, 0.35, 60.0)


# ---------------------------------------------------------------------------------------------
# Length distributions


def test_sharegpt_matches_the_andes_trace_and_vllm_statistics() -> None:
    prompt, output = lengths_of("sharegpt")
    assert output.mean() == pytest.approx(332, rel=0.05)
    assert np.median(output) == pytest.approx(287, rel=0.05)
    assert output.min() >= 1
    assert output.max() <= 1327
    assert prompt.mean() == pytest.approx(161.31, rel=0.05)
    assert prompt.min() >= 4
    assert prompt.max() <= 1024
    assert (prompt + output).max() <= 2048


def test_alpaca_matches_vllm_means() -> None:
    prompt, output = lengths_of("alpaca")
    assert prompt.mean() == pytest.approx(19.31, rel=0.05)
    assert output.mean() == pytest.approx(58.45, rel=0.05)
    assert min(prompt.min(), output.min()) >= 4
    assert (prompt + output).max() <= 2048


def test_arxiv_has_long_prompts_and_normal_summaries() -> None:
    prompt, output = lengths_of("arxiv")
    assert output.mean() == pytest.approx(600, rel=0.02)
    assert output.std() == pytest.approx(150, rel=0.05)
    assert output.min() >= 1
    assert prompt.mean() > 5000
    assert prompt.min() >= 1
    assert (prompt + output).max() <= 8192


# ---------------------------------------------------------------------------------------------
# QoE mixes


def test_reading_tds_follows_the_trace_proportions() -> None:
    prompts = np.full(LARGE, 100, dtype=np.int64)
    ttft_s, tds = parse_qoe_mix("reading").sample(prompts, np.random.default_rng(0))
    assert tds.min() >= 3.7
    assert tds.max() <= 5.2
    weights = np.array(READING_LATENCY_WEIGHTS) / sum(READING_LATENCY_WEIGHTS)
    for latency_s, weight in zip(READING_TOKEN_LATENCIES_S, weights, strict=True):
        assert np.mean(np.isclose(tds, 1.0 / latency_s)) == pytest.approx(weight, abs=0.01)
    np.testing.assert_array_equal(ttft_s, 1.0)


def test_voice_tds_is_speech_rate() -> None:
    _, tds = parse_qoe_mix("voice").sample(np.ones(100, dtype=np.int64), np.random.default_rng())
    np.testing.assert_array_equal(tds, 3.3)


@pytest.mark.parametrize("spec", ["reading", "voice"])
def test_ttft_grows_past_one_second_only_for_long_prompts(spec: str) -> None:
    prompts = np.array([1, 4999, 5000, 7500, 10_000, 40_000], dtype=np.int64)
    ttft_s, _ = parse_qoe_mix(spec).sample(prompts, np.random.default_rng(0))
    np.testing.assert_allclose(ttft_s, [1.0, 1.0, 1.0, 1.5, 2.0, 8.0])


def test_uniform_mix_gives_constant_targets() -> None:
    mix = parse_qoe_mix("uniform:2.5,7")
    assert mix == QoEMix(tds_choices=(7.0,), tds_weights=(1.0,), ttft_s=2.5)
    ttft_s, tds = mix.sample(np.array([1, 100_000], dtype=np.int64), np.random.default_rng(0))
    np.testing.assert_array_equal(ttft_s, 2.5)
    np.testing.assert_array_equal(tds, 7.0)


# ---------------------------------------------------------------------------------------------
# Workload container and traces


def test_workload_rejects_inconsistent_arrays() -> None:
    ones = np.ones(3)
    tokens = np.ones(3, dtype=np.int64)
    with pytest.raises(ValueError, match="equally long"):
        Workload(np.zeros(2), tokens, tokens, ones, ones)
    with pytest.raises(ValueError, match="non-decreasing"):
        Workload(np.array([0.0, 2.0, 1.0]), tokens, tokens, ones, ones)
    with pytest.raises(ValueError, match=">= 1"):
        Workload(np.zeros(3), tokens * 0, tokens, ones, ones)
    with pytest.raises(ValueError, match="tds must be"):
        Workload(np.zeros(3), tokens, tokens, ones, -ones)
    with pytest.raises(ValueError, match="prompt texts"):
        Workload(np.zeros(3), tokens, tokens, ones, ones, prompts=("a",))


def test_workload_arrays_are_read_only_copies() -> None:
    arrival_s = np.arange(3.0)
    workload = Workload(
        arrival_s, np.ones(3, np.int64), np.ones(3, np.int64), np.ones(3), np.ones(3)
    )
    arrival_s[0] = 99.0
    assert workload.arrival_s[0] == 0.0
    with pytest.raises(ValueError, match="read-only"):
        workload.arrival_s[0] = 1.0


def test_slice_keeps_arrival_times_and_texts() -> None:
    workload = Workload(
        np.arange(5.0),
        np.arange(1, 6),
        np.arange(1, 6),
        np.ones(5),
        np.ones(5),
        prompts=tuple("abcde"),
    )
    part = workload.slice(1, 3)
    assert len(part) == 2
    np.testing.assert_array_equal(part.arrival_s, [1.0, 2.0])
    assert part.prompts == ("b", "c")


@pytest.mark.parametrize("workload", ["sharegpt", "arxiv"])
def test_trace_round_trip_reproduces_the_workload(tmp_path: Path, workload: str) -> None:
    original = make_workload(workload, "reading", "gamma:2", 3.0, num_requests=2000, seed=9)
    path = tmp_path / "trace.jsonl"
    original.to_jsonl(path)
    # QoE mix, arrival process and rate are all different: the trace carries everything.
    replayed = make_workload(f"trace:{path}", "voice", "poisson", 100.0, num_requests=2000)
    assert_same_workload(original, replayed)
    within = make_workload(
        f"trace:{path}", "voice", "poisson", 1.0, duration_s=float(original.arrival_s[999])
    )
    assert_same_workload(original.slice(0, 999), within)


def test_trace_round_trip_keeps_prompt_texts(tmp_path: Path) -> None:
    texts = ("hello there", 'a "quoted" \u00e9 prompt\nwith lines', "x")
    original = Workload(
        np.array([0.0, 0.5, 0.5]),
        np.array([3, 9, 1]),
        np.array([10, 20, 30]),
        np.array([1.0, 1.0, 2.0]),
        np.array([4.0, 5.0, 3.3]),
        prompts=texts,
    )
    path = tmp_path / "texts.jsonl"
    original.to_jsonl(path)
    assert_same_workload(
        original, make_workload(f"trace:{path}", "reading", "poisson", 1.0, num_requests=3)
    )


def test_trace_with_text_only_estimates_tokens_and_fills_qoe(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "t.jsonl",
        [
            json.dumps({"arrival_s": 2.0, "prompt": "x" * 9, "output_tokens": 5}),
            json.dumps({"arrival_s": 1.0, "prompt": "", "output_tokens": 7, "ttft_s": 0.25}),
            "",
            json.dumps({"arrival_s": 3.0, "prompt": "y" * 8, "output_tokens": 1, "tds": 9.5}),
        ],
    )
    workload = make_workload(f"trace:{path}", "uniform:1.5,6", "poisson", 1.0, duration_s=10.0)
    np.testing.assert_array_equal(workload.arrival_s, [1.0, 2.0, 3.0])  # sorted by arrival
    np.testing.assert_array_equal(workload.prompt_tokens, [1, 3, 2])  # ceil(len / 4), >= 1
    np.testing.assert_array_equal(workload.output_tokens, [7, 5, 1])
    np.testing.assert_array_equal(workload.ttft_s, [0.25, 1.5, 1.5])
    np.testing.assert_array_equal(workload.tds, [6.0, 6.0, 9.5])
    assert workload.prompts == ("", "x" * 9, "y" * 8)


def test_trace_without_arrivals_uses_the_arrival_process_and_cycles(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "t.jsonl",
        [json.dumps({"prompt_tokens": p, "output_tokens": 2 * p}) for p in (10, 20, 30)],
    )
    workload = make_workload(f"trace:{path}", "voice", "poisson", 4.0, num_requests=7, seed=2)
    np.testing.assert_array_equal(workload.prompt_tokens, [10, 20, 30, 10, 20, 30, 10])
    np.testing.assert_array_equal(workload.output_tokens, 2 * workload.prompt_tokens)
    poisson = make_workload("sharegpt", "voice", "poisson", 4.0, num_requests=7, seed=2)
    np.testing.assert_array_equal(workload.arrival_s, poisson.arrival_s)
    lengths = parse_lengths(f"trace:{path}")
    assert isinstance(lengths, TraceLengths)
    prompt, output = lengths.sample(4, np.random.default_rng())
    np.testing.assert_array_equal(prompt, [10, 20, 30, 10])
    np.testing.assert_array_equal(output, [20, 40, 60, 20])


def test_timed_trace_cannot_supply_more_requests_than_it_holds(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "t.jsonl", [json.dumps({"arrival_s": 0, "prompt_tokens": 1, "output_tokens": 1})]
    )
    with pytest.raises(ValueError, match="holds 1 requests, 2 were asked for"):
        make_workload(f"trace:{path}", "voice", "poisson", 1.0, num_requests=2)


GOOD = {"arrival_s": 0.5, "prompt_tokens": 10, "output_tokens": 20}


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "line 2: invalid JSON"),
        ("[1, 2]", "line 2: expected a JSON object, got list"),
        (json.dumps({"arrival_s": 1.0, "output_tokens": 3}), "line 2: needs 'prompt_tokens'"),
        (json.dumps({"arrival_s": 1.0, "prompt_tokens": 3}), "line 2: missing 'output_tokens'"),
        (json.dumps({**GOOD, "output_tokens": 0}), "line 2: 'output_tokens' must be an integer"),
        (json.dumps({**GOOD, "prompt_tokens": "12"}), "line 2: 'prompt_tokens' must be"),
        (json.dumps({**GOOD, "prompt_tokens": 2.5}), "line 2: 'prompt_tokens' must be"),
        (json.dumps({**GOOD, "prompt_tokens": True}), "line 2: 'prompt_tokens' must be"),
        (json.dumps({**GOOD, "prompt_tokens": 10**30}), "line 2: 'prompt_tokens' must be"),
        (json.dumps({**GOOD, "arrival_s": -1}), "line 2: 'arrival_s' must be a finite number >= 0"),
        ('{"arrival_s": NaN, "prompt_tokens": 1, "output_tokens": 1}', "line 2: 'arrival_s'"),
        (json.dumps({**GOOD, "arrival_s": 10**400}), "line 2: 'arrival_s'"),
        (json.dumps({**GOOD, "ttft_s": 0}), "line 2: 'ttft_s' must be a finite number > 0"),
        (json.dumps({**GOOD, "tds": -3.3}), "line 2: 'tds' must be a finite number > 0"),
        (json.dumps({**GOOD, "prompt": 5}), "line 2: 'prompt' must be a string"),
        (json.dumps({"prompt_tokens": 1, "output_tokens": 1}), "line 2: 'arrival_s' must be on"),
        (json.dumps({**GOOD, "prompt": "hi"}), "line 2: 'prompt' must be on every line or on"),
    ],
)
def test_bad_trace_lines_name_the_line_and_problem(
    tmp_path: Path, bad_line: str, message: str
) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), bad_line, json.dumps(GOOD)])
    with pytest.raises(ValueError, match=message):
        parse_lengths(f"trace:{path}")


def test_unreadable_or_empty_traces_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read trace file"):
        parse_lengths(f"trace:{tmp_path / 'missing.jsonl'}")
    with pytest.raises(ValueError, match="cannot read trace file"):
        parse_lengths(f"trace:{tmp_path}")
    with pytest.raises(ValueError, match="has no requests"):
        parse_lengths(f"trace:{write_lines(tmp_path / 'empty.jsonl', ['', '  '])}")
    with pytest.raises(ValueError, match="needs a file path"):
        parse_lengths("trace:")


# ---------------------------------------------------------------------------------------------
# Spec parsing


def test_good_specs_parse() -> None:
    assert parse_arrival("poisson") == PoissonArrivals()
    assert parse_arrival("gamma:2.5") == GammaArrivals(2.5)
    assert parse_arrival("burst:3,0.1,20") == BurstArrivals(3.0, 0.1, 20.0)
    assert parse_qoe_mix("voice").tds_choices == (3.3,)
    assert parse_lengths("alpaca") is parse_lengths("alpaca")


@pytest.mark.parametrize(
    ("parse", "spec", "message"),
    [
        (parse_arrival, "foo", "unknown arrival 'foo': expected poisson, gamma:CV or burst:"),
        (parse_arrival, "Poisson", "unknown arrival"),
        (parse_arrival, "gamma", "unknown arrival 'gamma'"),
        (parse_arrival, "gamma:", "expected gamma:CV"),
        (parse_arrival, "gamma:x", "expected gamma:CV"),
        (parse_arrival, "gamma:1,2", "expected gamma:CV"),
        (parse_arrival, "gamma:0", r"gamma CV must be in \(0, 10\]"),
        (parse_arrival, "gamma:nan", "fields of gamma:CV must be finite"),
        (parse_arrival, "gamma:inf", "must be finite"),
        (parse_arrival, "burst:2", r"expected burst:INTENSITY,FRACTION\[,PERIOD_S\]"),
        (parse_arrival, "burst:2,0.35,60,1", "expected burst:INTENSITY"),
        (parse_arrival, "burst:3,0.5", "INTENSITY\\*FRACTION must be <= 1"),
        (parse_arrival, "burst:2,1", r"FRACTION must be in \(0, 1\)"),
        (parse_arrival, "burst:2,0", "FRACTION must be in"),
        (parse_arrival, "burst:0,0.3", "INTENSITY must be"),
        (parse_arrival, "burst:2,0.3,0", "PERIOD_S must be"),
        (parse_qoe_mix, "fast", "unknown QoE mix 'fast': expected reading, voice or uniform:"),
        (parse_qoe_mix, "uniform:1", "expected uniform:TTFT,TDS"),
        (parse_qoe_mix, "uniform:0,4", "TTFT must be"),
        (parse_qoe_mix, "uniform:1,-4", "TDS must be"),
        (parse_lengths, "shareGPT", "unknown workload 'shareGPT': expected sharegpt, alpaca,"),
        (parse_lengths, "tracefile.jsonl", "unknown workload"),
    ],
)
def test_bad_specs_say_what_is_wrong(
    parse: Callable[[str], object], spec: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        parse(spec)


JUNK = st.one_of(
    st.text(),
    st.text(alphabet=st.sampled_from("0123456789.,-+eEinfa: x")).map(lambda s: "gamma:" + s),
    st.text(alphabet=st.sampled_from("0123456789.,-+eEinfa: x")).map(lambda s: "burst:" + s),
    st.text(alphabet=st.sampled_from("0123456789.,-+eEinfa: x")).map(lambda s: "uniform:" + s),
)


@settings(max_examples=300, deadline=None)
@given(spec=JUNK)
def test_junk_specs_raise_value_error_or_parse(spec: str) -> None:
    parsers: tuple[Callable[[str], object], ...] = (parse_arrival, parse_qoe_mix, parse_lengths)
    for parse in parsers:
        try:
            parse(spec)
        except ValueError as err:
            assert str(err)
