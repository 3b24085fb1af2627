"""The gateway's configuration: command-line flags, each defaulting to an ``ANDES_*`` variable.

Environment defaults go through the same argparse type checks as flags (argparse parses a
string default like a command-line value), so a bad variable fails at start with one line.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from andes.tls import ChannelTls, ServerTls
from andes.tokenstream import DEFAULT_PREFIX
from gateway.ratelimit import KeyLimits
from gateway.validation import Limits


@dataclass(frozen=True)
class GatewayConfig:
    """Everything ``python -m gateway`` can be told."""

    listen: str = "127.0.0.1:50051"
    http_listen: str = ""
    """The OpenAI-compatible HTTP API's ``host:port``; empty: off (the flag's default is
    127.0.0.1:8000, but gateways built in-process, as tests do, should not contend for it)."""
    served_model_name: str = "andes"
    scheduler: str = "127.0.0.1:50052"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = DEFAULT_PREFIX
    max_streams: int = 4096
    limits: Limits = field(default_factory=Limits)
    api_keys_file: str | None = None
    key_limits: KeyLimits = field(default_factory=KeyLimits)
    """Each API key's limits unless its key file line says otherwise (without keys: the one
    anonymous key's, shared by every client); 0: unlimited."""
    grpc_acceptors: int = 4
    """gRPC servers on the listen port, each accepting new calls on its share of the
    connections (see :func:`gateway.server.pending_call_options`)."""
    stalled_client_timeout_s: float = 0.0
    """Cancel a stream (and abort its request) whose client accepted no message for this long
    (0: never; memory stays bounded either way, see :mod:`gateway.service`)."""
    metrics_port: int = 0
    drain_seconds: float = 30.0
    gateway_id: str = ""
    report_interval_s: float = 0.075
    submit_timeout_s: float = 10.0
    tokenizer: str = ""
    """Model directory whose tokenizer counts prompt tokens and renders chats (empty: the
    approximation and the default chat template)."""
    tls: ServerTls = field(default_factory=ServerTls)
    """TLS of both listeners, gRPC and HTTP (empty: plaintext)."""
    scheduler_tls: ChannelTls = field(default_factory=ChannelTls)
    """TLS of the channel to the scheduler (empty: plaintext)."""

    def resolved_gateway_id(self) -> str:
        """The configured id, or ``host:pid:random`` (unique per process, so wake streams and
        delivery reports of two gateways never mix)."""
        if self.gateway_id:
            return self.gateway_id
        return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) as (host, port); ValueError if malformed."""
    host, colon, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not (colon and host and port.isdigit() and int(port) <= 65535):
        raise ValueError(f"expected host:port, got {address!r}")
    return host, int(port)


def join_host_port(host: str, port: int) -> str:
    """The inverse of :func:`split_host_port`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _optional_address(text: str) -> str:
    if text:
        try:
            split_host_port(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err
    return text


def _non_empty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _bounded(kind: type[int] | type[float], low: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from err
        if not (math.isfinite(value) and value >= low):
            raise argparse.ArgumentTypeError(f"must be a finite number >= {low:g}, got {text!r}")
        return value

    return parse


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description="Andes gateway: andes.v1.GenerationService and an OpenAI-compatible API.",
    )

    def flag(name: str, variable: str, default: str | None, help_text: str,
             kind: Callable[[str], object] = str) -> None:
        parser.add_argument(name, default=env.get(variable, default), type=kind,
                            help=f"{help_text} (env {variable}; default {default})")

    flag("--listen", "ANDES_GATEWAY_LISTEN", "127.0.0.1:50051", "host:port to serve gRPC on")
    flag("--http-listen", "ANDES_GATEWAY_HTTP_LISTEN", "127.0.0.1:8000",
         "host:port to serve the OpenAI-compatible HTTP API on (empty: off)", _optional_address)
    flag("--served-model-name", "ANDES_SERVED_MODEL_NAME", "andes",
         "the model name the HTTP API lists and answers with", _non_empty)
    flag("--scheduler", "ANDES_SCHEDULER_ADDR", "127.0.0.1:50052", "scheduler host:port")
    flag("--redis", "ANDES_REDIS_URL", "redis://127.0.0.1:6379/0", "Redis URL")
    flag("--redis-prefix", "ANDES_REDIS_PREFIX", DEFAULT_PREFIX, "Redis key prefix")
    flag("--max-streams", "ANDES_GATEWAY_MAX_STREAMS", "4096",
         "concurrent Generate streams before RESOURCE_EXHAUSTED", _bounded(int, 1))
    flag("--max-tokens-limit", "ANDES_GATEWAY_MAX_TOKENS_LIMIT", "4096",
         "largest max_tokens accepted", _bounded(int, 1))
    flag("--default-max-tokens", "ANDES_GATEWAY_DEFAULT_MAX_TOKENS", "256",
         "max_tokens when a request gives 0", _bounded(int, 1))
    flag("--max-prompt-chars", "ANDES_GATEWAY_MAX_PROMPT_CHARS", "200000",
         "longest text prompt accepted, in characters", _bounded(int, 1))
    flag("--max-prompt-tokens", "ANDES_GATEWAY_MAX_PROMPT_TOKENS", "50000",
         "most prompt_token_ids accepted", _bounded(int, 1))
    flag("--api-keys-file", "ANDES_API_KEYS_FILE", None,
         "file of SHA-256 digests of accepted API keys, one per line, each optionally "
         "followed by name=, rate=, burst=, max_streams= (none: no auth)")
    flag("--key-rate", "ANDES_KEY_RATE", "0",
         "generation requests per second per API key, a token bucket (without keys: for all "
         "clients together; 0: unlimited)", _bounded(float, 0))
    flag("--key-burst", "ANDES_KEY_BURST", "0",
         "token bucket size per API key (0: one second of --key-rate, at least 1)",
         _bounded(float, 0))
    flag("--key-max-streams", "ANDES_KEY_MAX_STREAMS", "0",
         "concurrent generation streams per API key (0: unlimited)", _bounded(int, 0))
    flag("--grpc-acceptors", "ANDES_GATEWAY_GRPC_ACCEPTORS", "4",
         "gRPC servers sharing the listen port, each accepting new calls on its share of "
         "the client connections (a burst of calls is taken in this many at a time)",
         _bounded(int, 1))
    flag("--stalled-client-timeout-s", "ANDES_GATEWAY_STALLED_CLIENT_TIMEOUT_S", "0",
         "cancel a stream whose client accepted no message for this long, aborting its "
         "request (0: never)", _bounded(float, 0))
    flag("--metrics-port", "ANDES_GATEWAY_METRICS_PORT", "0",
         "serve Prometheus /metrics on this port of the listen host (0: off)", _bounded(int, 0))
    flag("--drain-seconds", "ANDES_GATEWAY_DRAIN_SECONDS", "30",
         "on SIGTERM, how long streams in progress may take to finish", _bounded(float, 0))
    flag("--tokenizer", "ANDES_TOKENIZER", "",
         "model directory whose tokenizer counts prompt tokens and whose chat template "
         "renders chat requests (empty: chars/4 and the default template)")
    flag("--gateway-id", "ANDES_GATEWAY_ID", "",
         "this gateway's id in scheduler reports (default host:pid:random)")
    flag("--tls-cert", "ANDES_TLS_CERT", "",
         "PEM certificate chain: serve gRPC and HTTP over TLS (empty: plaintext)")
    flag("--tls-key", "ANDES_TLS_KEY", "", "PEM private key of --tls-cert")
    flag("--tls-client-ca", "ANDES_TLS_CLIENT_CA", "",
         "PEM CA: require client certificates it signed (mutual TLS; empty: none asked)")
    flag("--scheduler-tls-ca", "ANDES_SCHEDULER_TLS_CA", "",
         "PEM CA that verifies the scheduler: dial it over TLS (empty: plaintext)")
    flag("--scheduler-tls-cert", "ANDES_SCHEDULER_CLIENT_CERT", "",
         "PEM certificate this gateway presents to the scheduler (mutual TLS)")
    flag("--scheduler-tls-key", "ANDES_SCHEDULER_CLIENT_KEY", "",
         "PEM private key of --scheduler-tls-cert")
    flag("--scheduler-tls-server-name", "ANDES_SCHEDULER_TLS_SERVER_NAME", "",
         "the name the scheduler's certificate carries, if not the --scheduler host")
    return parser


def parse_config(argv: Sequence[str] | None = None,
                 env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Parse flags (``argv``, default ``sys.argv``) over ``env`` (default ``os.environ``)."""
    parser = build_parser(os.environ if env is None else env)
    args = parser.parse_args(argv)
    try:
        limits = Limits(
            max_tokens_limit=int(args.max_tokens_limit),
            default_max_tokens=min(int(args.default_max_tokens), int(args.max_tokens_limit)),
            max_prompt_chars=int(args.max_prompt_chars),
            max_prompt_tokens=int(args.max_prompt_tokens),
        )
        key_limits = KeyLimits(rate=float(args.key_rate), burst=float(args.key_burst),
                               max_streams=int(args.key_max_streams))
    except ValueError as err:
        parser.error(str(err))
    return GatewayConfig(
        listen=args.listen,
        http_listen=args.http_listen,
        served_model_name=args.served_model_name,
        scheduler=args.scheduler,
        redis_url=args.redis,
        redis_prefix=args.redis_prefix,
        max_streams=int(args.max_streams),
        limits=limits,
        api_keys_file=args.api_keys_file or None,
        key_limits=key_limits,
        grpc_acceptors=int(args.grpc_acceptors),
        stalled_client_timeout_s=float(args.stalled_client_timeout_s),
        metrics_port=int(args.metrics_port),
        drain_seconds=float(args.drain_seconds),
        gateway_id=args.gateway_id,
        tokenizer=args.tokenizer,
        tls=ServerTls(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca),
        scheduler_tls=ChannelTls(ca=args.scheduler_tls_ca, cert=args.scheduler_tls_cert,
                                 key=args.scheduler_tls_key,
                                 server_name=args.scheduler_tls_server_name),
    )
