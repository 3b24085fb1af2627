"""A local cluster in one command: Redis, the scheduler, N workers and the gateway.

Each service runs as its own process, exactly as it would in a deployment; this module only
starts them in dependency order, waits for each one's ``READY`` line, and stops them in reverse
order. It uses the Redis at ``ANDES_REDIS_URL`` when one answers there, else a private
``redis-server`` on a free port that lives and dies with the cluster.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import urlparse

READY_TIMEOUT_S = 180.0


LOWEST_PORT = 10_000

_ports_given: set[int] = set()


def free_port() -> int:
    """A port free on 127.0.0.1 for a service about to start, never the same twice in a process.

    Chosen below the kernel's ephemeral range: a port the kernel hands out (``bind`` to port
    0) can be taken by any outgoing connection, to Redis or to the scheduler, before the
    service it was meant for binds it, which then fails with "address already in use"."""
    ephemeral_low = max(_ephemeral_low(), LOWEST_PORT + 1)
    for _ in range(1000):
        port = random.randrange(LOWEST_PORT, ephemeral_low)
        if port in _ports_given:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _ports_given.add(port)
        return port
    raise RuntimeError(f"no free port in [{LOWEST_PORT}, {ephemeral_low}) on 127.0.0.1")


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux's default where unreadable)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_answers(url: str, timeout_s: float = 0.5) -> bool:
    """Whether a Redis server answers PING at ``url`` (plain socket: no client needed)."""
    parsed = urlparse(url)
    try:
        with socket.create_connection(
            (parsed.hostname or "127.0.0.1", parsed.port or 6379), timeout=timeout_s
        ) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


@dataclass(frozen=True)
class ClusterConfig:
    backend: str = "sim"
    workers: int = 2
    policy: str = "andes"
    profile: str = "a100-opt13b"
    gateway_port: int = 50051
    scheduler_port: int = 50052
    http_port: int | None = None
    """The gateway's OpenAI-compatible HTTP port (None: no HTTP API)."""
    redis_url: str | None = None
    """None: ``ANDES_REDIS_URL`` if it answers, else a private redis-server."""
    worker_args: tuple[str, ...] = ()
    """Extra flags for every worker (e.g. ``--kv-blocks 400``)."""
    gateway_args: tuple[str, ...] = ()
    scheduler_args: tuple[str, ...] = ()
    model: str | None = None
    """Model directory for the ``vllm`` backend; its tokenizer also counts prompt tokens at
    the gateway."""
    pin_engines: bool = False
    """Give each worker's engine CPUs of its own and keep every other process (the services,
    a private Redis, the caller's) on the rest (:func:`engine_cpu_plan`; ``vllm`` only)."""


def engine_cpu_plan(cpus: list[int], workers: int) -> tuple[list[int], list[list[int]]]:
    """Split ``cpus`` into the services' share and one share per worker's engine: ``workers
    + 1`` even groups, the services taking the first and the engines the remainder. ValueError
    if there are not more CPUs than workers."""
    if len(cpus) <= workers:
        raise ValueError(f"pinning {workers} engines needs more than {workers} CPUs "
                         f"(this process may use {len(cpus)})")
    ordered = sorted(cpus)
    services = ordered[:max(1, len(ordered) // (workers + 1))]
    rest = ordered[len(services):]
    share, extra = divmod(len(rest), workers)
    engines, start = [], 0
    for index in range(workers):
        end = start + share + (1 if index < extra else 0)
        engines.append(rest[start:end])
        start = end
    return services, engines


@dataclass
class _Service:
    name: str
    argv: list[str]
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)


class LocalCluster:
    """Start with :meth:`start` (or ``with``); :meth:`stop` tears everything down."""

    def __init__(self, config: ClusterConfig, *, log_dir: Path | None = None) -> None:
        self.config = config
        self.log_dir = log_dir
        self.redis_url = ""
        self._services: list[_Service] = []
        self._redis: subprocess.Popen[bytes] | None = None
        self._redis_dir: tempfile.TemporaryDirectory[str] | None = None
        self._own_cpus: set[int] | None = None
        """This process's CPUs before :attr:`ClusterConfig.pin_engines` narrowed them."""

    @property
    def gateway_addr(self) -> str:
        return f"127.0.0.1:{self.config.gateway_port}"

    @property
    def http_addr(self) -> str:
        """``host:port`` of the HTTP API, empty when it is off."""
        port = self.config.http_port
        return "" if port is None else f"127.0.0.1:{port}"

    @property
    def scheduler_addr(self) -> str:
        return f"127.0.0.1:{self.config.scheduler_port}"

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        try:
            cfg = self.config
            engine_cpus = self._pin_services() if cfg.pin_engines else []
            self.redis_url = self._ensure_redis()
            python = sys.executable
            self._spawn(
                "scheduler",
                [python, "-m", "scheduler_service", "--listen", self.scheduler_addr,
                 "--policy", cfg.policy, *cfg.scheduler_args],
            )
            model_args = ("--model", cfg.model) if cfg.model else ()
            # Workers start together: a real engine takes seconds to load.
            waits = [
                self._launch(
                    f"worker-{index}",
                    [python, "-m", "worker", "--backend", cfg.backend, "--profile", cfg.profile,
                     "--worker-id", f"w{index}", "--scheduler", self.scheduler_addr,
                     "--redis", self.redis_url, *model_args, *cfg.worker_args,
                     *(("--engine-cpus", ",".join(map(str, engine_cpus[index])))
                       if engine_cpus else ())],
                )
                for index in range(cfg.workers)
            ]
            for wait in waits:
                wait()
            tokenizer_args = ("--tokenizer", cfg.model) if cfg.model else ()
            self._spawn(
                "gateway",
                [python, "-m", "gateway", "--listen", self.gateway_addr,
                 "--http-listen", self.http_addr,
                 "--scheduler", self.scheduler_addr, "--redis", self.redis_url,
                 *tokenizer_args, *cfg.gateway_args],
            )
        except BaseException:
            self.stop()
            raise

    def _pin_services(self) -> list[list[int]]:
        """Narrow this process (and so what it starts) to the services' CPUs; the engines'
        CPUs, one list per worker."""
        if self.config.backend != "vllm":
            raise ValueError("pinning engines is for the vllm backend")
        own = os.sched_getaffinity(0)
        services, engines = engine_cpu_plan(sorted(own), self.config.workers)
        self._own_cpus = own
        os.sched_setaffinity(0, services)
        return engines

    def _ensure_redis(self) -> str:
        configured = self.config.redis_url or os.environ.get("ANDES_REDIS_URL")
        if configured:
            if not redis_answers(configured):
                raise RuntimeError(f"no Redis answers at {configured}")
            return configured
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "no Redis configured (ANDES_REDIS_URL) and redis-server is not installed: "
                "apt-get install redis-server"
            )
        port = free_port()
        self._redis_dir = tempfile.TemporaryDirectory(prefix="andes-redis-")
        self._redis = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self._redis_dir.name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while not redis_answers(url):
            if time.monotonic() > deadline or self._redis.poll() is not None:
                raise RuntimeError("the private redis-server did not start")
            time.sleep(0.05)
        return url

    def _spawn(self, name: str, argv: list[str]) -> None:
        self._launch(name, argv)()

    def _launch(self, name: str, argv: list[str]) -> Callable[[], None]:
        """Start a service; the returned call waits for its READY line (raises if none)."""
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=True,
        )
        service = _Service(name, argv, process)
        self._services.append(service)
        ready = threading.Event()
        log = (self.log_dir / f"{name}.log").open("w") if self.log_dir else None

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                service.lines.append(line)
                del service.lines[:-200]  # keep a tail for error messages
                if log is not None:
                    log.write(line)
                    log.flush()
                if line.startswith("READY"):
                    ready.set()
            if log is not None:
                log.close()

        threading.Thread(target=pump, name=f"{name}-output", daemon=True).start()
        deadline = time.monotonic() + READY_TIMEOUT_S

        def wait() -> None:
            while not ready.wait(0.1):
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = "".join(service.lines[-20:])
                    raise RuntimeError(f"{name} did not become ready:\n{tail}")

        return wait

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM in reverse start order (gateway drains first), SIGKILL after ``grace_s``."""
        for service in reversed(self._services):
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
            try:
                service.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait()
        self._services.clear()
        if self._redis is not None:
            self._redis.terminate()
            self._redis.wait(timeout=10)
            self._redis = None
        if self._redis_dir is not None:
            self._redis_dir.cleanup()
            self._redis_dir = None
        if self._own_cpus is not None:
            os.sched_setaffinity(0, self._own_cpus)
            self._own_cpus = None

    def _service(self, name: str) -> _Service:
        for service in self._services:
            if service.name == name:
                return service
        raise KeyError(f"no service named {name!r}: {[s.name for s in self._services]}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a service (SIGKILL: a crash) and, unless it is a pause
        (SIGSTOP), wait for the process to end."""
        process = self._service(name).process
        process.send_signal(sig)
        if sig not in (signal.SIGSTOP, signal.SIGCONT):
            process.wait(timeout=30)

    def restart(self, name: str) -> None:
        """Start a service again with the same command line (after :meth:`kill`, or a crash)
        and wait for its READY line; a live one is killed first."""
        service = self._service(name)
        if service.process.poll() is None:
            self.kill(name)
        position = self._services.index(service)
        self._services.remove(service)
        self._spawn(name, service.argv)
        self._services.insert(position, self._services.pop())  # keep the stop order

    def pids(self) -> dict[str, int]:
        """Process id of every running service (and of the private Redis, if one)."""
        running = {s.name: s.process.pid for s in self._services if s.process.poll() is None}
        if self._redis is not None:
            running["redis"] = self._redis.pid
        return running

    def endpoints(self) -> dict[str, str]:
        return {
            "gateway (gRPC andes.v1.GenerationService)": self.gateway_addr,
            **({"gateway (HTTP, OpenAI-compatible)": f"http://{self.http_addr}/v1"}
               if self.http_addr else {}),
            "scheduler (gRPC, internal)": self.scheduler_addr,
            "redis": self.redis_url,
        }
