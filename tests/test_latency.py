"""Tests of the roofline latency model and of the profiles shipped in ``profiles/``."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from andes.latency import LatencyProfile, list_profiles, load_profile, profiles_dir
from worker.vllm_profile import SHORT_CONTEXT, calibration_steps, fit_profile

PROFILES = list_profiles()
GPU_PROFILES = [
    "a100-opt13b",
    "a100-40g-opt13b",
    "a40-opt13b",
    "a100-llama2-7b",
    "h100-llama3-8b",
]

# vLLM CPU backend, tiny random Llama, f32 eager: mean seconds per engine step by batch size,
# prompts of ~13 tokens and 128 new tokens (mean context 13 + 64 = 77 tokens per sequence).
batches = st.floats(min_value=0.0, max_value=512.0, allow_nan=False)
contexts = st.floats(min_value=0.0, max_value=500_000.0, allow_nan=False)
prefills = st.floats(min_value=0.0, max_value=20_000.0, allow_nan=False)
increments = st.floats(min_value=0.0, max_value=10_000.0, allow_nan=False)


def _profile_json(name: str) -> dict[str, Any]:
    with (profiles_dir() / f"{name}.json").open() as f:
        data: dict[str, Any] = json.load(f)
    return data


# --- the shipped profiles ---------------------------------------------------------------------


def test_expected_profiles_are_present() -> None:
    assert set(GPU_PROFILES) | {"cpu-tiny"} <= set(PROFILES)


@pytest.mark.parametrize("name", PROFILES)
def test_profile_loads_and_validates(name: str) -> None:
    profile = load_profile(name)
    profile.validate()
    assert profile.name == name
    assert profile.kv_capacity_tokens == profile.kv_blocks_total * profile.block_size
    assert profile.max_batched_tokens >= 1
    assert profile.provenance, "every profile must say where its numbers come from"
    # The JSON file round-trips through the dataclass unchanged.
    assert profile.to_json() == _profile_json(name)


@pytest.mark.parametrize("name", PROFILES)
def test_profile_loads_by_path(name: str) -> None:
    by_path = load_profile(profiles_dir() / f"{name}.json")
    assert by_path == load_profile(name)


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_gpu_profile_matches_its_documented_derivation(name: str) -> None:
    """The coefficients are what the formulas in the provenance give from its own figures."""
    profile = load_profile(name)
    prov = profile.provenance
    assert prov["kind"] == "roofline-derived"
    hw, model, assume = prov["hardware"], prov["model"], prov["assumptions"]
    assert hw["sources"] and model["sources"]

    dtype_bytes = model["dtype_bytes"]
    weight_bytes = model["params"] * dtype_bytes
    kv_bpt = 2 * model["layers"] * model["kv_heads"] * model["head_dim"] * dtype_bytes
    bandwidth = hw["memory_bandwidth_GBps"] * 1e9 * assume["mem_efficiency"]
    flops = hw["peak_dense_fp16_tflops"] * 1e12 * assume["mfu"]
    link = hw["host_link"]["peak_GBps_per_direction"] * 1e9 * assume["host_link_efficiency"]
    budget = (
        hw["memory_bytes"] * prov["serving_config"]["gpu_memory_utilization"]
        - weight_bytes
        - assume["activation_reserve_bytes"]
    )

    rel = 1e-5
    assert profile.weights_read_s == pytest.approx(weight_bytes / bandwidth, rel=rel)
    assert profile.kv_read_s_per_token == pytest.approx(kv_bpt / bandwidth, rel=rel)
    assert profile.compute_s_per_token == pytest.approx(2 * model["params"] / flops, rel=rel)
    assert profile.swap_s_per_token == pytest.approx(kv_bpt / link, rel=rel)
    assert profile.step_overhead_s == assume["step_overhead_s"]
    assert profile.kv_blocks_total == math.floor(budget / (kv_bpt * profile.block_size))
    assert prov["derived"]["kv_capacity_tokens"] == profile.kv_capacity_tokens
    assert profile.block_size == prov["serving_config"]["block_size"] == 16
    assert profile.max_batch == prov["serving_config"]["max_num_seqs"] == 256
    assert profile.max_batched_tokens == prov["serving_config"]["max_num_batched_tokens"] == 8192


def test_llama3_uses_grouped_query_attention() -> None:
    prov = load_profile("h100-llama3-8b").provenance
    assert prov["model"]["kv_heads"] == 8
    assert prov["derived"]["kv_bytes_per_token"] == 2 * 32 * 8 * 128 * 2


def test_a100_opt13b_decode_step_is_tens_of_ms() -> None:
    profile = load_profile("a100-opt13b")
    step = profile.iteration_time(128, 128 * 330.0)
    assert 0.010 < step < 0.200
    # Near the KV-bound batch of the Andes setting (~150 requests of ~330 tokens).
    assert 0.010 < profile.iteration_time(150, 150 * 330.0) < 0.100


def test_a100_40g_has_less_kv_than_a100_80g() -> None:
    small, large = load_profile("a100-40g-opt13b"), load_profile("a100-opt13b")
    assert small.kv_capacity_tokens < large.kv_capacity_tokens
    assert small.compute_s_per_token == large.compute_s_per_token


MEASURED_PROFILES = ("cpu-tiny", "cpu-small")
"""Profiles the vllm backend measured (``python -m worker.vllm_profile``) on this machine kind."""


@pytest.mark.parametrize("name", MEASURED_PROFILES)
def test_cpu_profiles_are_measured_by_the_vllm_backend(name: str) -> None:
    prov = load_profile(name).provenance
    assert prov["kind"] == "measured"
    assert prov["command"].startswith("python -m worker.vllm_profile")


def _measurements(name: str) -> list[tuple[str, float, float, float, float]]:
    """(profile, decode batch, context tokens, prefill tokens, seconds) of each calibration
    step of a measured profile."""
    measured = _profile_json(name)["provenance"]["measurements"]
    return [(name, *step) for step in calibration_steps(measured)]


@pytest.mark.parametrize(("name", "batch", "context", "prefill", "measured"),
                         [row for name in MEASURED_PROFILES for row in _measurements(name)])
def test_measured_profiles_reproduce_their_step_times(name: str, batch: float, context: float,
                                                      prefill: float, measured: float) -> None:
    profile = load_profile(name)
    predicted = profile.iteration_time(batch, context, prefill)
    assert predicted == pytest.approx(measured, rel=0.25)


def test_the_start_up_fit_recovers_the_attention_cost() -> None:
    # Step times made by a known CPU-like model: the fit gives its coefficients back.
    overhead, decode, attention, prefill = 9e-3, 4.4e-4, 1.7e-6, 3.2e-4
    measured = {
        "decode_step_s_by_batch": {b: overhead + decode * b + attention * b * SHORT_CONTEXT
                                   for b in (1, 4, 16, 64)},
        "decode_step_s_by_context": {"batch": 4, "context_tokens": 1528,
                                     "step_s": overhead + decode * 4 + attention * 1528},
        "prefill_step_s_by_tokens": {n: overhead + prefill * n for n in (256, 1024)},
    }
    engine = SimpleNamespace(block_size=32, kv_blocks_total=96, max_num_seqs=64,
                             config=SimpleNamespace(max_num_batched_tokens=1024))
    profile = fit_profile(engine, measured, "synthetic")  # type: ignore[arg-type]
    assert profile.step_overhead_s == pytest.approx(overhead, rel=1e-6)
    assert profile.compute_s_per_token == pytest.approx(decode, rel=1e-6)
    assert profile.attention_s_per_token == pytest.approx(attention, rel=1e-6)
    assert profile.prefill_per_token_s == pytest.approx(prefill, rel=1e-6)
    # Without the long-context steps there is nothing to fit it from.
    del measured["decode_step_s_by_context"]
    assert fit_profile(engine, measured, "flat").attention_s_per_token == 0.0  # type: ignore[arg-type]


def test_prefill_cost_defaults_to_the_compute_cost() -> None:
    profile = load_profile("a100-opt13b")
    assert profile.prefill_s_per_token is None
    assert profile.prefill_per_token_s == profile.compute_s_per_token
    cheaper = dataclasses.replace(profile, prefill_s_per_token=profile.compute_s_per_token / 4)
    assert cheaper.prefill_time(4096) < profile.prefill_time(4096)
    assert cheaper.iteration_time(8.0, 1000.0) == profile.iteration_time(8.0, 1000.0)


def test_attention_cost_adds_to_compute_per_context_token() -> None:
    profile = load_profile("cpu-tiny")
    flat = dataclasses.replace(profile, attention_s_per_token=0.0)
    cpu = dataclasses.replace(profile, attention_s_per_token=2e-6)
    # Without it, a decode step does not care how long the contexts are.
    assert flat.iteration_time(4.0, 4000.0) == flat.iteration_time(4.0, 40.0)
    extra = cpu.iteration_time(4.0, 4000.0) - flat.iteration_time(4.0, 4000.0)
    assert extra == pytest.approx(2e-6 * 4000.0)
    assert "attention_s_per_token" not in flat.to_json()
    assert LatencyProfile.from_json(cpu.to_json()) == cpu


# --- properties of the model ------------------------------------------------------------------


@pytest.mark.parametrize("name", PROFILES)
@settings(max_examples=50, deadline=None)
@given(b=batches, ctx=contexts, pre=prefills, db=increments, dctx=increments, dpre=increments)
def test_iteration_time_is_monotone(
    name: str, b: float, ctx: float, pre: float, db: float, dctx: float, dpre: float
) -> None:
    profile = load_profile(name)
    base = profile.iteration_time(b, ctx, pre)
    assert base >= profile.step_overhead_s
    assert profile.iteration_time(b + db, ctx, pre) >= base
    assert profile.iteration_time(b, ctx + dctx, pre) >= base
    assert profile.iteration_time(b, ctx, pre + dpre) >= base
    assert profile.iteration_time(b + db, ctx + dctx, pre + dpre) >= base


@pytest.mark.parametrize("name", PROFILES)
@settings(max_examples=25, deadline=None)
@given(
    rows=st.lists(st.tuples(batches, contexts, prefills), min_size=1, max_size=20),
)
def test_iteration_time_is_vectorized(name: str, rows: list[tuple[float, float, float]]) -> None:
    profile = load_profile(name)
    b = np.array([r[0] for r in rows], dtype=np.float64)
    ctx = np.array([r[1] for r in rows], dtype=np.float64)
    pre = np.array([r[2] for r in rows], dtype=np.float64)

    vector = profile.iteration_time(b, ctx, pre)
    assert isinstance(vector, np.ndarray)
    assert vector.shape == b.shape
    scalar = [profile.iteration_time(float(x), float(y), float(z)) for x, y, z in rows]
    np.testing.assert_allclose(vector, scalar, rtol=1e-12, atol=0.0)

    # Scalars broadcast against an array argument.
    broadcast = profile.iteration_time(b, 1000.0)
    np.testing.assert_allclose(
        broadcast, [profile.iteration_time(float(x), 1000.0) for x in b], rtol=1e-12, atol=0.0
    )


@pytest.mark.parametrize("name", PROFILES)
def test_scalar_calls_return_python_floats(name: str) -> None:
    profile = load_profile(name)
    assert type(profile.iteration_time(4, 400)) is float
    assert type(profile.token_latency(4.0, 100.0)) is float
    batch = np.array([1.0, 2.0, 4.0])
    latency = profile.token_latency(batch, 100.0)
    np.testing.assert_allclose(latency, profile.iteration_time(batch, batch * 100.0))


@pytest.mark.parametrize("name", PROFILES)
@settings(max_examples=50, deadline=None)
@given(chunks=st.integers(min_value=0, max_value=20), rest=st.floats(min_value=0.0, max_value=1.0))
def test_prefill_time_is_additive_across_chunks(name: str, chunks: int, rest: float) -> None:
    profile = load_profile(name)
    chunk = float(profile.max_batched_tokens)
    remainder = math.floor(rest * (chunk - 1))
    total = chunks * chunk + remainder
    expected = chunks * profile.prefill_time(chunk) + profile.prefill_time(remainder)
    assert profile.prefill_time(total) == pytest.approx(expected, rel=1e-12)
    # A full chunk is one iteration with that many prefill tokens.
    assert profile.prefill_time(chunk) == pytest.approx(profile.iteration_time(0.0, 0.0, chunk))


@pytest.mark.parametrize("name", PROFILES)
@settings(max_examples=50, deadline=None)
@given(tokens=st.floats(min_value=0.0, max_value=100_000.0), extra=increments)
def test_prefill_time_is_monotone(name: str, tokens: float, extra: float) -> None:
    profile = load_profile(name)
    assert profile.prefill_time(tokens + extra) >= profile.prefill_time(tokens)
    assert profile.recompute_time(tokens) == profile.prefill_time(tokens)


@pytest.mark.parametrize("name", PROFILES)
def test_prefill_and_swap_edge_cases(name: str) -> None:
    profile = load_profile(name)
    assert profile.prefill_time(0) == 0.0
    assert profile.prefill_time(-5) == 0.0
    assert profile.prefill_time(1) >= profile.step_overhead_s + profile.weights_read_s
    assert profile.swap_time(0) == 0.0
    assert profile.swap_time(500) == pytest.approx(500 * profile.swap_s_per_token)


# --- errors ----------------------------------------------------------------------------------


def test_unknown_profile_name_raises() -> None:
    with pytest.raises(ValueError, match=r"unknown latency profile 'no-such-gpu'") as err:
        load_profile("no-such-gpu")
    assert "a100-opt13b" in str(err.value), "the message lists the known profiles"


def test_missing_profile_path_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown latency profile"):
        load_profile(tmp_path / "absent.json")


def test_unknown_json_field_raises(tmp_path: Path) -> None:
    data = _profile_json("a100-opt13b")
    data["hbm_bandwidth"] = 2.0e12
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"unknown latency profile fields: \['hbm_bandwidth'\]"):
        load_profile(path)
    with pytest.raises(ValueError, match="hbm_bandwidth"):
        LatencyProfile.from_json(data)


def test_profiles_dir_can_be_overridden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _profile_json("cpu-tiny") | {"name": "elsewhere"}
    (tmp_path / "elsewhere.json").write_text(json.dumps(data))
    monkeypatch.setenv("ANDES_PROFILES_DIR", str(tmp_path))
    assert list_profiles() == ["elsewhere"]
    assert load_profile("elsewhere").name == "elsewhere"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("step_overhead_s", -0.001),
        ("weights_read_s", float("nan")),
        ("kv_read_s_per_token", float("inf")),
        ("compute_s_per_token", -1.0),
        ("swap_s_per_token", -1e-6),
        ("attention_s_per_token", -1e-7),
        ("block_size", 0),
        ("kv_blocks_total", -3),
        ("max_batch", 0),
        ("max_batched_tokens", 0),
    ],
)
def test_invalid_values_raise(field: str, value: float) -> None:
    data = _profile_json("a100-opt13b") | {field: value}
    with pytest.raises(ValueError, match=field):
        LatencyProfile.from_json(data)
