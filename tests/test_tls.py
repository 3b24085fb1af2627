"""TLS: the gateway's listeners over TLS, mutual TLS between the services, and the checks that
stop a service at start-up when its TLS files cannot work.

The module's cluster runs every service as its own process (scheduler, a sim worker, gateway)
with the certificates a test CA made in a temporary directory: the scheduler serves mutual TLS
only, the worker and the gateway dial it with client certificates, and the gateway serves gRPC
and HTTPS with a certificate for 127.0.0.1 and localhost.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import httpx2
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from andes import cli as andes_cli
from andes.client import AndesClient, AndesError, AsyncAndesClient
from andes.tls import ChannelTls, ServerTls, TlsError, aio_channel
from andes.up import ClusterConfig, LocalCluster
from andes.v1 import scheduler_pb2
from gateway.config import GatewayConfig, parse_config
from gateway.scheduler import SchedulerClient, SchedulerError
from gateway.server import Gateway, StartupError
from scheduler_service import cli as scheduler_cli
from tests.conftest import free_port
from worker import cli as worker_cli
from worker.session import SchedulerSession

TOKENS = 8

# -- a test PKI ------------------------------------------------------------------------------------

Key = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Identity:
    """A certificate and its key, as PEM files."""

    cert: str
    key: str


@dataclass(frozen=True)
class Pki:
    ca: str
    """The CA every service trusts."""
    server: Identity
    """For 127.0.0.1 and localhost, signed by ``ca``; the gateway and the scheduler use it."""
    client: Identity
    """A client identity signed by ``ca`` (the gateway's and the worker's toward the scheduler)."""
    other_ca: str
    """A CA nobody trusts."""
    stranger: Identity
    """A client identity signed by ``other_ca``."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, key: Key, issuer: x509.Certificate | None, issuer_key: Key, *,
           ca: bool = False, server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer is not None else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=True, crl_sign=True, encipher_only=False,
                          decipher_only=False),
            critical=True,
        )
    else:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write_cert(path: Path, cert: x509.Certificate) -> str:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def _write_key(path: Path, key: Key,
               encryption: serialization.KeySerializationEncryption | None = None) -> str:
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        encryption or serialization.NoEncryption(),
    ))
    return str(path)


def make_pki(directory: Path) -> Pki:
    """Two CAs and the certificates the tests need, as files in ``directory``."""

    def new_key() -> Key:
        return ec.generate_private_key(ec.SECP256R1())

    def identity(name: str, issuer: x509.Certificate, issuer_key: Key,
                 server: bool = False) -> Identity:
        key = new_key()
        cert = _issue(name, key, issuer, issuer_key, server=server)
        return Identity(_write_cert(directory / f"{name}.pem", cert),
                        _write_key(directory / f"{name}-key.pem", key))

    ca_key, other_key = new_key(), new_key()
    ca = _issue("andes test CA", ca_key, None, ca_key, ca=True)
    other = _issue("another CA", other_key, None, other_key, ca=True)
    return Pki(
        ca=_write_cert(directory / "ca.pem", ca),
        server=identity("server", ca, ca_key, server=True),
        client=identity("client", ca, ca_key),
        other_ca=_write_cert(directory / "other-ca.pem", other),
        stranger=identity("stranger", other, other_key),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def cluster(redis_url: str, pki: Pki) -> Iterator[LocalCluster]:
    dial_scheduler = ("--scheduler-tls-ca", pki.ca, "--scheduler-tls-cert", pki.client.cert,
                      "--scheduler-tls-key", pki.client.key)
    config = ClusterConfig(
        backend="sim",
        workers=1,
        gateway_port=free_port(),
        scheduler_port=free_port(),
        http_port=free_port(),
        redis_url=redis_url,
        scheduler_args=("--tls-cert", pki.server.cert, "--tls-key", pki.server.key,
                        "--tls-client-ca", pki.ca),
        worker_args=dial_scheduler,
        # The gateway names the scheduler by its certificate's DNS name (the override path).
        gateway_args=("--tls-cert", pki.server.cert, "--tls-key", pki.server.key,
                      *dial_scheduler, "--scheduler-tls-server-name", "localhost"),
    )
    with LocalCluster(config) as running:
        yield running


def _stream_to_the_end(client: AndesClient) -> None:
    stream = client.generate("Tell me about TLS", max_tokens=TOKENS, paced=False, timeout_s=20)
    events = list(stream)
    assert sum(len(event.token_ids) for event in events) == TOKENS
    assert stream.finish_reason == "length"


def _refused(client: AndesClient) -> AndesError:
    with pytest.raises(AndesError) as refused:
        list(client.generate("hello", max_tokens=TOKENS, paced=False, timeout_s=10))
    return refused.value


# -- the cluster -----------------------------------------------------------------------------------


def test_a_client_with_the_ca_streams_over_tls_through_mutual_tls(
    cluster: LocalCluster, pki: Pki
) -> None:
    with AndesClient(cluster.gateway_addr, tls_ca=pki.ca) as client:
        _stream_to_the_end(client)


def test_clients_without_tls_or_trusting_another_ca_are_unavailable(
    cluster: LocalCluster, pki: Pki
) -> None:
    with AndesClient(cluster.gateway_addr) as plaintext:
        assert _refused(plaintext).code == "UNAVAILABLE"
    with AndesClient(cluster.gateway_addr, tls_ca=pki.other_ca) as wrong_ca:
        assert _refused(wrong_ca).code == "UNAVAILABLE"
    with AndesClient(cluster.gateway_addr, tls_ca=pki.ca) as client:  # still serving
        _stream_to_the_end(client)


def test_the_scheduler_refuses_clients_without_a_certificate_it_trusts(
    cluster: LocalCluster, pki: Pki
) -> None:
    target = cluster.scheduler_addr

    async def health(tls: ChannelTls) -> str:
        async with aio_channel(target, tls.load()) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            except grpc.aio.AioRpcError as err:
                return str(err.code().name)
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))

    async def gateway_without_certificate() -> grpc.StatusCode:
        scheduler = SchedulerClient(target, ChannelTls(ca=pki.ca).load())
        try:
            await scheduler.abort("nobody", "test")
        except SchedulerError as err:
            return err.code
        finally:
            await scheduler.close()
        raise AssertionError("the scheduler answered a gateway without a certificate")

    async def worker_without_certificate() -> int:
        session = SchedulerSession(
            target,
            registration=lambda: scheduler_pb2.Registration(worker_id="intruder"),
            sync_report=scheduler_pb2.StepReport,
            credentials=ChannelTls(ca=pki.ca).load(),
        )
        running = asyncio.create_task(session.run())
        await asyncio.sleep(1.5)  # long enough for several attempts
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        return session.registrations

    async def body() -> None:
        assert await health(ChannelTls()) == "UNAVAILABLE"
        assert await health(ChannelTls(ca=pki.ca)) == "UNAVAILABLE"
        assert await health(ChannelTls(ca=pki.ca, cert=pki.stranger.cert,
                                       key=pki.stranger.key)) == "UNAVAILABLE"
        assert await gateway_without_certificate() == grpc.StatusCode.UNAVAILABLE
        assert await worker_without_certificate() == 0
        assert await health(ChannelTls(ca=pki.ca, cert=pki.client.cert,
                                       key=pki.client.key)) == "SERVING"

    asyncio.run(asyncio.wait_for(body(), 30))
    with AndesClient(cluster.gateway_addr, tls_ca=pki.ca) as client:  # the cluster still works
        _stream_to_the_end(client)


def test_the_openai_client_chats_over_https(cluster: LocalCluster, pki: Pki) -> None:
    trust = ssl.create_default_context(cafile=pki.ca)
    with httpx2.Client(verify=trust) as http_client:
        client = openai.OpenAI(base_url=f"https://{cluster.http_addr}/v1", api_key="unused",
                               http_client=http_client, max_retries=0, timeout=20)
        answer = client.chat.completions.create(
            model="andes", messages=[{"role": "user", "content": "Hello over TLS"}],
            max_tokens=TOKENS,
        )
        assert answer.choices[0].finish_reason == "length"
        assert answer.usage is not None and answer.usage.completion_tokens == TOKENS
        chunks = client.chat.completions.create(
            model="andes", messages=[{"role": "user", "content": "Stream it"}],
            max_tokens=TOKENS, stream=True,
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        assert text
    with httpx2.Client() as plaintext, pytest.raises(httpx2.HTTPError):
        plaintext.get(f"http://{cluster.http_addr}/healthz", timeout=5)


def test_a_gateway_with_a_client_ca_requires_client_certificates(
    cluster: LocalCluster, pki: Pki
) -> None:
    config = GatewayConfig(
        listen="127.0.0.1:0", http_listen="127.0.0.1:0", scheduler=cluster.scheduler_addr,
        redis_url=cluster.redis_url,
        tls=ServerTls(cert=pki.server.cert, key=pki.server.key, client_ca=pki.ca),
        scheduler_tls=ChannelTls(ca=pki.ca, cert=pki.client.cert, key=pki.client.key),
    )

    async def stream(client: AsyncAndesClient) -> str:
        generation = client.generate("mutual", max_tokens=TOKENS, paced=False, timeout_s=20)
        try:
            async for _ in generation:
                pass
        except AndesError as err:
            return err.code
        return generation.finish_reason or ""

    async def healthz(url: str, trust: ssl.SSLContext) -> int:
        async with aiohttp.ClientSession() as session, session.get(url, ssl=trust) as answer:
            return answer.status

    async def body() -> None:
        gateway = Gateway(config, registry=CollectorRegistry())
        await gateway.start()
        try:
            async with AsyncAndesClient(gateway.address, tls_ca=pki.ca) as no_cert:
                assert await stream(no_cert) == "UNAVAILABLE"
            async with AsyncAndesClient(gateway.address, tls_ca=pki.ca, tls_cert=pki.stranger.cert,
                                        tls_key=pki.stranger.key) as stranger:
                assert await stream(stranger) == "UNAVAILABLE"
            async with AsyncAndesClient(gateway.address, tls_ca=pki.ca, tls_cert=pki.client.cert,
                                        tls_key=pki.client.key) as client:
                assert await stream(client) == "length"
            url = f"https://{gateway.http_address}/healthz"
            trust = ssl.create_default_context(cafile=pki.ca)
            with pytest.raises(aiohttp.ClientError):
                await healthz(url, trust)
            trust.load_cert_chain(pki.client.cert, pki.client.key)
            assert await healthz(url, trust) == 200
        finally:
            await gateway.stop()

    asyncio.run(asyncio.wait_for(body(), 60))


# -- the checks at start-up ------------------------------------------------------------------------


def test_server_tls_errors_name_the_file_and_the_problem(pki: Pki, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    encrypted = _write_key(tmp_path / "encrypted-key.pem", ec.generate_private_key(ec.SECP256R1()),
                           serialization.BestAvailableEncryption(b"passphrase"))
    cases = {
        "no such file": ServerTls(cert=missing, key=pki.server.key),
        "cannot read it": ServerTls(cert=str(tmp_path), key=pki.server.key),
        "no PEM certificate": ServerTls(cert=str(garbage), key=pki.server.key),
        "no PEM private key": ServerTls(cert=pki.server.cert, key=pki.server.cert),
        "does not belong": ServerTls(cert=pki.server.cert, key=pki.client.key),
        "both a certificate and its key": ServerTls(cert=pki.server.cert),
        "encrypted": ServerTls(cert=pki.server.cert, key=encrypted),
        "client CA": ServerTls(cert=pki.server.cert, key=pki.server.key,
                               client_ca=pki.server.key),
    }
    for expected, tls in cases.items():
        with pytest.raises(TlsError, match=expected):
            tls.load()
    assert ServerTls().load() is None
    loaded = ServerTls(cert=pki.server.cert, key=pki.server.key, client_ca=pki.ca).load()
    assert loaded is not None and loaded.mutual
    assert loaded.ssl_context.verify_mode == ssl.CERT_REQUIRED


def test_channel_tls_errors(pki: Pki, tmp_path: Path) -> None:
    cases = {
        "needs its key": ChannelTls(ca=pki.ca, cert=pki.client.cert),
        "does not belong": ChannelTls(ca=pki.ca, cert=pki.client.cert, key=pki.server.key),
        "no such file": ChannelTls(ca=str(tmp_path / "ca.pem")),
        "TLS CA": ChannelTls(ca=pki.client.key),
        "needs TLS": ChannelTls(server_name="localhost"),
    }
    for expected, tls in cases.items():
        with pytest.raises(TlsError, match=expected):
            tls.load()
    assert ChannelTls().load() is None
    loaded = ChannelTls(ca=pki.ca, server_name="localhost").load()
    assert loaded is not None
    assert loaded.options == (("grpc.ssl_target_name_override", "localhost"),)
    assert ChannelTls(system_roots=True).load() is not None
    with pytest.raises(ValueError, match="no such file"):
        AndesClient(tls_ca=str(tmp_path / "ca.pem"))


def test_every_service_stops_at_start_on_bad_tls_files(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "missing.pem")
    config = parse_config(["--tls-cert", pki.server.cert, "--tls-key", pki.client.key], env={})
    with pytest.raises(StartupError, match="does not belong"):
        Gateway(config, registry=CollectorRegistry())
    config = parse_config(["--scheduler-tls-ca", missing], env={})
    with pytest.raises(StartupError, match="no such file"):
        Gateway(config, registry=CollectorRegistry())

    assert scheduler_cli.main(["--tls-cert", missing, "--tls-key", pki.server.key]) == 2
    assert worker_cli.main(["--scheduler-tls-ca", pki.ca, "--scheduler-tls-cert",
                            pki.client.cert]) == 2
    assert andes_cli.main(["generate", "hi", "--tls-ca", missing]) == 2
    errors = capsys.readouterr().err
    assert errors.count("no such file") == 2
    assert "needs its key" in errors


def test_tls_flags_and_their_environment(pki: Pki) -> None:
    env = {"ANDES_TLS_CERT": pki.server.cert, "ANDES_TLS_KEY": pki.server.key,
           "ANDES_TLS_CLIENT_CA": pki.ca, "ANDES_SCHEDULER_TLS_CA": pki.ca,
           "ANDES_SCHEDULER_CLIENT_CERT": pki.client.cert,
           "ANDES_SCHEDULER_CLIENT_KEY": pki.client.key,
           "ANDES_SCHEDULER_TLS_SERVER_NAME": "scheduler.internal"}
    config = parse_config([], env=env)
    assert config.tls == ServerTls(pki.server.cert, pki.server.key, pki.ca)
    assert config.scheduler_tls == ChannelTls(pki.ca, pki.client.cert, pki.client.key,
                                              "scheduler.internal")
    assert config.listen == "127.0.0.1:50051"
    plain = parse_config([], env={})
    assert not plain.tls.enabled and not plain.scheduler_tls.enabled
