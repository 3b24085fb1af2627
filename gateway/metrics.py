"""Prometheus metrics of the gateway (``andes_*``): QoE as the clients receive it.

The gateway is where QoE is measured for real (it knows when each token was handed to its
client), so the headline metric lives here: ``andes_request_qoe`` per finished request, with
TTFT and delivered token speed beside it. Generation requests count the same whichever front
end (gRPC or HTTP) they came through; ``andes_http_requests_total`` adds the HTTP API's view by
endpoint. Each gateway gets its own registry so that several can live in one process (tests);
``python -m gateway`` exports the default one.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import start_http_server as _start_http_server

QOE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
TDS_BUCKETS = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0)

OUTCOMES = (
    "completed",  # finished with STOP or LENGTH (other HTTP endpoints: answered)
    "cancelled",  # Cancel RPC, or finished with CANCELLED
    "disconnected",  # the client went away mid-stream
    "deadline",  # the client's deadline passed
    "stalled",  # the client accepted no message for --stalled-client-timeout-s
    "invalid",  # INVALID_ARGUMENT
    "unauthenticated",
    "rejected",  # RESOURCE_EXHAUSTED (max streams, a per-key limit, the scheduler is full)
    "unavailable",  # draining, or the scheduler / Redis is unreachable
    "already_exists",
    "not_found",  # resuming an unknown request (HTTP: an unknown route)
    "error",  # anything else (worker error, malformed stream)
)


class GatewayMetrics:
    """The gateway's metric objects, registered in ``registry`` (the default one if None)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = REGISTRY if registry is None else registry
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        self.request_qoe = Histogram(
            "andes_request_qoe", "QoE of each finished request, measured at the gateway.",
            buckets=QOE_BUCKETS, registry=self.registry,
        )
        self.ttft_seconds = Histogram(
            "andes_ttft_seconds", "Time from arrival at the gateway to the first token sent.",
            buckets=TTFT_BUCKETS, registry=self.registry,
        )
        self.delivered_tds = Histogram(
            "andes_delivered_tds",
            "Tokens/s each request was delivered at after its first token.",
            buckets=TDS_BUCKETS, registry=self.registry,
        )
        self.tokens_delivered = Counter(
            "andes_tokens_delivered", "Output tokens handed to clients.", registry=self.registry
        )
        self.active_streams = Gauge(
            "andes_active_streams", "Generation streams in progress (gRPC and HTTP).",
            registry=self.registry,
        )
        self.requests = Counter(
            "andes_requests", "Generation requests (gRPC and HTTP) by how they ended.",
            ["outcome"], registry=self.registry,
        )
        for outcome in OUTCOMES:
            self.requests.labels(outcome=outcome)
        self.rate_limited = Counter(
            "andes_gateway_rate_limited",
            "Generation requests refused by a per-API-key limit, by key name and limit "
            "('rate': requests/s, 'streams': concurrent streams).",
            ["key", "limit"], registry=self.registry,
        )
        self.http_requests = Counter(
            "andes_http_requests",
            "HTTP API requests by endpoint (route, or 'other') and outcome (as above).",
            ["endpoint", "outcome"], registry=self.registry,
        )

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose ``/metrics`` over HTTP on ``host:port`` (a background thread)."""
        self._http = _start_http_server(port, addr=host, registry=self.registry)

    def stop_serving(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._http = None
