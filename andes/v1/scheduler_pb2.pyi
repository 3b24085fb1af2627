from andes.v1 import generation_pb2 as _generation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RequestState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REQUEST_STATE_UNSPECIFIED: _ClassVar[RequestState]
    REQUEST_STATE_WAITING: _ClassVar[RequestState]
    REQUEST_STATE_QUEUED: _ClassVar[RequestState]
    REQUEST_STATE_RUNNING: _ClassVar[RequestState]
    REQUEST_STATE_PAUSED: _ClassVar[RequestState]
    REQUEST_STATE_PREEMPTED: _ClassVar[RequestState]
    REQUEST_STATE_SWAPPED: _ClassVar[RequestState]

class PreemptionMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PREEMPTION_MODE_UNSPECIFIED: _ClassVar[PreemptionMode]
    PREEMPTION_MODE_RECOMPUTE: _ClassVar[PreemptionMode]
    PREEMPTION_MODE_SWAP: _ClassVar[PreemptionMode]
REQUEST_STATE_UNSPECIFIED: RequestState
REQUEST_STATE_WAITING: RequestState
REQUEST_STATE_QUEUED: RequestState
REQUEST_STATE_RUNNING: RequestState
REQUEST_STATE_PAUSED: RequestState
REQUEST_STATE_PREEMPTED: RequestState
REQUEST_STATE_SWAPPED: RequestState
PREEMPTION_MODE_UNSPECIFIED: PreemptionMode
PREEMPTION_MODE_RECOMPUTE: PreemptionMode
PREEMPTION_MODE_SWAP: PreemptionMode

class SubmitRequest(_message.Message):
    __slots__ = ("request_id", "gateway_id", "prompt_tokens", "max_tokens", "qoe", "sampling", "arrival_unix_s", "payload_key", "token_stream_key")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QOE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_KEY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_STREAM_KEY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    gateway_id: str
    prompt_tokens: int
    max_tokens: int
    qoe: _generation_pb2.QoESpec
    sampling: _generation_pb2.SamplingParams
    arrival_unix_s: float
    payload_key: str
    token_stream_key: str
    def __init__(self, request_id: _Optional[str] = ..., gateway_id: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., qoe: _Optional[_Union[_generation_pb2.QoESpec, _Mapping]] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., arrival_unix_s: _Optional[float] = ..., payload_key: _Optional[str] = ..., token_stream_key: _Optional[str] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class SubmitBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[SubmitRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[SubmitRequest, _Mapping]]] = ...) -> None: ...

class SubmitResult(_message.Message):
    __slots__ = ("worker_id", "code", "message")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    code: int
    message: str
    def __init__(self, worker_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class SubmitBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SubmitResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SubmitResult, _Mapping]]] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class ReportDeliveryRequest(_message.Message):
    __slots__ = ("gateway_id", "sent_unix_s", "progress")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    sent_unix_s: float
    progress: _containers.RepeatedCompositeFieldContainer[DeliveryProgress]
    def __init__(self, gateway_id: _Optional[str] = ..., sent_unix_s: _Optional[float] = ..., progress: _Optional[_Iterable[_Union[DeliveryProgress, _Mapping]]] = ...) -> None: ...

class DeliveryProgress(_message.Message):
    __slots__ = ("request_id", "delivered_tokens", "digest_max_s", "delay_sum_s", "arrival_unix_s", "complete")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_MAX_S_FIELD_NUMBER: _ClassVar[int]
    DELAY_SUM_S_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    delivered_tokens: int
    digest_max_s: float
    delay_sum_s: float
    arrival_unix_s: float
    complete: bool
    def __init__(self, request_id: _Optional[str] = ..., delivered_tokens: _Optional[int] = ..., digest_max_s: _Optional[float] = ..., delay_sum_s: _Optional[float] = ..., arrival_unix_s: _Optional[float] = ..., complete: _Optional[bool] = ...) -> None: ...

class ReportDeliveryResponse(_message.Message):
    __slots__ = ("entries_received",)
    ENTRIES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    entries_received: int
    def __init__(self, entries_received: _Optional[int] = ...) -> None: ...

class WorkerSessionRequest(_message.Message):
    __slots__ = ("registration", "step_report", "heartbeat")
    REGISTRATION_FIELD_NUMBER: _ClassVar[int]
    STEP_REPORT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    registration: Registration
    step_report: StepReport
    heartbeat: Heartbeat
    def __init__(self, registration: _Optional[_Union[Registration, _Mapping]] = ..., step_report: _Optional[_Union[StepReport, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...

class Registration(_message.Message):
    __slots__ = ("worker_id", "backend", "model", "kv_blocks_total", "block_size", "max_batch", "max_batched_tokens", "profile", "requests")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    backend: str
    model: str
    kv_blocks_total: int
    block_size: int
    max_batch: int
    max_batched_tokens: int
    profile: LatencyProfile
    requests: _containers.RepeatedCompositeFieldContainer[RequestProgress]
    def __init__(self, worker_id: _Optional[str] = ..., backend: _Optional[str] = ..., model: _Optional[str] = ..., kv_blocks_total: _Optional[int] = ..., block_size: _Optional[int] = ..., max_batch: _Optional[int] = ..., max_batched_tokens: _Optional[int] = ..., profile: _Optional[_Union[LatencyProfile, _Mapping]] = ..., requests: _Optional[_Iterable[_Union[RequestProgress, _Mapping]]] = ...) -> None: ...

class LatencyProfile(_message.Message):
    __slots__ = ("name", "step_overhead_s", "weights_read_s", "kv_read_s_per_token", "compute_s_per_token", "swap_s_per_token", "block_size", "kv_blocks_total", "max_batch", "max_batched_tokens", "provenance_json", "prefill_s_per_token", "attention_s_per_token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STEP_OVERHEAD_S_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_READ_S_FIELD_NUMBER: _ClassVar[int]
    KV_READ_S_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SWAP_S_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_JSON_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_S_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    step_overhead_s: float
    weights_read_s: float
    kv_read_s_per_token: float
    compute_s_per_token: float
    swap_s_per_token: float
    block_size: int
    kv_blocks_total: int
    max_batch: int
    max_batched_tokens: int
    provenance_json: str
    prefill_s_per_token: float
    attention_s_per_token: float
    def __init__(self, name: _Optional[str] = ..., step_overhead_s: _Optional[float] = ..., weights_read_s: _Optional[float] = ..., kv_read_s_per_token: _Optional[float] = ..., compute_s_per_token: _Optional[float] = ..., swap_s_per_token: _Optional[float] = ..., block_size: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., max_batch: _Optional[int] = ..., max_batched_tokens: _Optional[int] = ..., provenance_json: _Optional[str] = ..., prefill_s_per_token: _Optional[float] = ..., attention_s_per_token: _Optional[float] = ...) -> None: ...

class RequestProgress(_message.Message):
    __slots__ = ("request_id", "generated_tokens", "state", "kv_blocks")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    generated_tokens: int
    state: RequestState
    kv_blocks: int
    def __init__(self, request_id: _Optional[str] = ..., generated_tokens: _Optional[int] = ..., state: _Optional[_Union[RequestState, str]] = ..., kv_blocks: _Optional[int] = ...) -> None: ...

class FinishedRequest(_message.Message):
    __slots__ = ("request_id", "finish_reason", "generated_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    finish_reason: _generation_pb2.FinishReason
    generated_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., finish_reason: _Optional[_Union[_generation_pb2.FinishReason, str]] = ..., generated_tokens: _Optional[int] = ...) -> None: ...

class StepReport(_message.Message):
    __slots__ = ("step", "start_unix_s", "duration_s", "requests", "kv_blocks_free", "kv_blocks_total", "finished", "forced_preemptions", "plan_version", "scheduled_tokens", "plan_applied_unix_s", "plan_received_unix_s")
    STEP_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FORCED_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCHEDULED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PLAN_APPLIED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    PLAN_RECEIVED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    step: int
    start_unix_s: float
    duration_s: float
    requests: _containers.RepeatedCompositeFieldContainer[RequestProgress]
    kv_blocks_free: int
    kv_blocks_total: int
    finished: _containers.RepeatedCompositeFieldContainer[FinishedRequest]
    forced_preemptions: _containers.RepeatedScalarFieldContainer[str]
    plan_version: int
    scheduled_tokens: int
    plan_applied_unix_s: float
    plan_received_unix_s: float
    def __init__(self, step: _Optional[int] = ..., start_unix_s: _Optional[float] = ..., duration_s: _Optional[float] = ..., requests: _Optional[_Iterable[_Union[RequestProgress, _Mapping]]] = ..., kv_blocks_free: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., finished: _Optional[_Iterable[_Union[FinishedRequest, _Mapping]]] = ..., forced_preemptions: _Optional[_Iterable[str]] = ..., plan_version: _Optional[int] = ..., scheduled_tokens: _Optional[int] = ..., plan_applied_unix_s: _Optional[float] = ..., plan_received_unix_s: _Optional[float] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sent_unix_s",)
    SENT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    sent_unix_s: float
    def __init__(self, sent_unix_s: _Optional[float] = ...) -> None: ...

class WorkerSessionResponse(_message.Message):
    __slots__ = ("plan", "abort_requests", "assignments")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    ABORT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    plan: Plan
    abort_requests: AbortRequests
    assignments: Assignments
    def __init__(self, plan: _Optional[_Union[Plan, _Mapping]] = ..., abort_requests: _Optional[_Union[AbortRequests, _Mapping]] = ..., assignments: _Optional[_Union[Assignments, _Mapping]] = ...) -> None: ...

class Assignments(_message.Message):
    __slots__ = ("assignments",)
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    assignments: _containers.RepeatedCompositeFieldContainer[Assignment]
    def __init__(self, assignments: _Optional[_Iterable[_Union[Assignment, _Mapping]]] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("request_id", "payload_key", "token_stream_key", "prompt_tokens", "max_tokens", "sampling", "qoe", "arrival_unix_s", "resume_from_tokens", "moved")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_KEY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_STREAM_KEY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    QOE_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MOVED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    payload_key: str
    token_stream_key: str
    prompt_tokens: int
    max_tokens: int
    sampling: _generation_pb2.SamplingParams
    qoe: _generation_pb2.QoESpec
    arrival_unix_s: float
    resume_from_tokens: int
    moved: bool
    def __init__(self, request_id: _Optional[str] = ..., payload_key: _Optional[str] = ..., token_stream_key: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., qoe: _Optional[_Union[_generation_pb2.QoESpec, _Mapping]] = ..., arrival_unix_s: _Optional[float] = ..., resume_from_tokens: _Optional[int] = ..., moved: _Optional[bool] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("plan_version", "preempt", "pause", "resume", "admit", "preemption_mode")
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREEMPT_FIELD_NUMBER: _ClassVar[int]
    PAUSE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    ADMIT_FIELD_NUMBER: _ClassVar[int]
    PREEMPTION_MODE_FIELD_NUMBER: _ClassVar[int]
    plan_version: int
    preempt: _containers.RepeatedScalarFieldContainer[str]
    pause: _containers.RepeatedScalarFieldContainer[str]
    resume: _containers.RepeatedScalarFieldContainer[str]
    admit: _containers.RepeatedScalarFieldContainer[str]
    preemption_mode: PreemptionMode
    def __init__(self, plan_version: _Optional[int] = ..., preempt: _Optional[_Iterable[str]] = ..., pause: _Optional[_Iterable[str]] = ..., resume: _Optional[_Iterable[str]] = ..., admit: _Optional[_Iterable[str]] = ..., preemption_mode: _Optional[_Union[PreemptionMode, str]] = ...) -> None: ...

class AbortRequests(_message.Message):
    __slots__ = ("request_ids", "moved")
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    MOVED_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    moved: bool
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ..., moved: _Optional[bool] = ...) -> None: ...
