"""The andes.v1 contract: committed generated code is fresh, messages round-trip, gRPC works."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from importlib import metadata
from pathlib import Path

import grpc
import pytest

from andes.v1 import generation_pb2, generation_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
GENERATED_DIR = ROOT / "andes" / "v1"
GENERATED_PATTERNS = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py")


def _generated_files(directory: Path) -> dict[str, bytes]:
    return {
        path.name: path.read_bytes()
        for pattern in GENERATED_PATTERNS
        for path in sorted(directory.glob(pattern))
    }


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    """`make protos` run now would produce exactly the committed andes/v1 files."""
    sources = sorted(
        p.relative_to(PROTO_DIR).as_posix() for p in PROTO_DIR.glob("andes/v1/*.proto")
    )
    assert sources, "no .proto sources under protos/andes/v1"
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-Iprotos",
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        *(f"protos/{s}" for s in sources),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"protoc failed:\n{result.stderr}"

    fresh = _generated_files(tmp_path / "andes" / "v1")
    committed = _generated_files(GENERATED_DIR)
    tools = metadata.version("grpcio-tools")
    hint = (
        f"andes/v1 generated code is stale: run `make protos` and commit the result "
        f"(generated with grpcio-tools {tools}, the version pinned in pyproject.toml)"
    )
    assert sorted(fresh) == sorted(committed), (
        f"{hint}; generated {sorted(fresh)} but committed {sorted(committed)}"
    )
    stale = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not stale, f"{hint}; stale files: {stale}"


def _full_request() -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        request_id="req-1",
        prompt="Tell me a story",
        prompt_token_ids=[1, 15043, 3186],
        max_tokens=128,
        sampling=generation_pb2.SamplingParams(
            temperature=0.0, top_p=0.9, top_k=40, seed=0, stop=["\n\n", "END"], ignore_eos=True
        ),
        qoe=generation_pb2.QoESpec(ttft_s=1.0, tds=4.8),
        resume_from_index=7,
        reattach=True,
    )


def test_generate_request_round_trip() -> None:
    request = _full_request()
    for message in (request, request.sampling, request.qoe):
        # ListFields() lists only the fields that hold a non-default (or present) value.
        present = {f.name for f, _ in message.ListFields()}
        unset = {f.name for f in message.DESCRIPTOR.fields} - present
        assert not unset, f"{message.DESCRIPTOR.name} fields left unset: {sorted(unset)}"
    parsed = generation_pb2.GenerateRequest.FromString(request.SerializeToString())
    assert parsed == request
    # Optional fields keep explicit zeros (greedy temperature, seed 0) distinct from unset.
    assert parsed.sampling.HasField("temperature") and parsed.sampling.temperature == 0.0
    assert parsed.sampling.HasField("seed") and parsed.sampling.seed == 0
    assert not generation_pb2.SamplingParams().HasField("temperature")


def test_scheduler_messages_round_trip() -> None:
    message = scheduler_pb2.WorkerSessionResponse(
        plan=scheduler_pb2.Plan(
            plan_version=3,
            preempt=["a"],
            pause=["b"],
            resume=["c"],
            admit=["d", "e"],
            preemption_mode=scheduler_pb2.PREEMPTION_MODE_SWAP,
        )
    )
    parsed = scheduler_pb2.WorkerSessionResponse.FromString(message.SerializeToString())
    assert parsed == message and parsed.WhichOneof("message") == "plan"
    assert list(parsed.plan.admit) == ["d", "e"]


@pytest.mark.parametrize(
    "enum",
    [
        generation_pb2.FinishReason,
        scheduler_pb2.RequestState,
        scheduler_pb2.PreemptionMode,
    ],
    ids=lambda e: e.DESCRIPTOR.name,
)
def test_enums_have_prefixed_unspecified_zero(enum: object) -> None:
    descriptor = enum.DESCRIPTOR  # type: ignore[attr-defined]
    prefix = "".join(
        f"_{c}" if c.isupper() and i else c for i, c in enumerate(descriptor.name)
    ).upper()
    assert descriptor.values_by_number[0].name == f"{prefix}_UNSPECIFIED"
    assert all(value.name.startswith(f"{prefix}_") for value in descriptor.values)


def test_request_state_mirrors_policy_state() -> None:
    """Proto RequestState = andes.policies.base.State + 1 (0 is UNSPECIFIED)."""
    from andes.policies.base import State

    for state in State:
        assert scheduler_pb2.RequestState.Value(f"REQUEST_STATE_{state.name}") == state + 1
    assert len(scheduler_pb2.RequestState.keys()) == len(State) + 1


def test_latency_profile_mirrors_dataclass() -> None:
    from dataclasses import fields

    from andes.latency import LatencyProfile

    proto_fields = set(scheduler_pb2.LatencyProfile.DESCRIPTOR.fields_by_name)
    expected = {f.name for f in fields(LatencyProfile)} - {"provenance"} | {"provenance_json"}
    assert proto_fields == expected


class _ThreeChunks(generation_pb2_grpc.GenerationServiceServicer):
    async def Generate(  # noqa: N802 (the gRPC method name)
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        for index in range(3):
            last = index == 2
            yield generation_pb2.GenerateResponse(
                request_id=request.request_id,
                index=index,
                token_ids=[100 + index],
                text=f"t{index}",
                finish_reason=(
                    generation_pb2.FINISH_REASON_LENGTH
                    if last
                    else generation_pb2.FINISH_REASON_UNSPECIFIED
                ),
                usage=generation_pb2.Usage(prompt_tokens=3, completion_tokens=3) if last else None,
            )


async def _stream_over_socket() -> list[generation_pb2.GenerateResponse]:
    server = grpc.aio.server()
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(_ThreeChunks(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            request = generation_pb2.GenerateRequest(request_id="r", prompt="hi")
            call = stub.Generate(request, timeout=10)
            return [response async for response in call]
    finally:
        await server.stop(grace=None)


def test_generate_streams_over_a_real_socket() -> None:
    responses = asyncio.run(_stream_over_socket())
    assert [r.index for r in responses] == [0, 1, 2]
    position = 0
    for response in responses:
        assert response.request_id == "r"
        assert response.index == position, "message indices must be contiguous"
        position += len(response.token_ids)
    assert responses[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert responses[-1].usage.completion_tokens == position
    assert all(r.finish_reason == generation_pb2.FINISH_REASON_UNSPECIFIED for r in responses[:-1])


def test_scheduler_service_has_the_documented_rpcs() -> None:
    service = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"]
    shapes = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert shapes == {
        "Submit": (False, False),
        "SubmitBatch": (False, False),
        "Abort": (False, False),
        "ReportDelivery": (True, False),
        "WorkerSession": (True, True),
    }
    assert hasattr(scheduler_pb2_grpc, "SchedulerServiceStub")
