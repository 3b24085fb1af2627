"""TLS for every Andes connection: the gateway's listeners, the scheduler's, and the channels
that dial them.

Configuration names files (:class:`ServerTls`, :class:`ChannelTls`: all empty means plaintext,
the default); ``load()`` reads and checks them once, at start-up, so a missing or unreadable
file, a file that holds no certificate, an encrypted key or a key that does not belong to its
certificate stops the process with one line naming the file, instead of failing every
handshake later. A server given a client CA requires a certificate from every client and
accepts only those that CA signed (mutual TLS).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

CERTIFICATE_MARKER = b"-----BEGIN CERTIFICATE-----"
KEY_MARKER = b"PRIVATE KEY-----"
ENCRYPTED_MARKERS = (b"ENCRYPTED PRIVATE KEY", b"Proc-Type: 4,ENCRYPTED")
TARGET_NAME_OPTION = "grpc.ssl_target_name_override"
"""The gRPC channel option that sets the name the server's certificate must carry (and the
SNI), for a server reached by an address its certificate does not name."""


class TlsError(ValueError):
    """TLS material that cannot work, with the file and the reason."""


def read_pem(path: str, what: str, marker: bytes) -> bytes:
    """The bytes of a PEM file that contains ``marker``; TlsError (naming ``what``) when the
    file is missing, unreadable, or holds something else."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as err:
        raise TlsError(f"{what} {path}: no such file") from err
    except OSError as err:
        raise TlsError(f"{what} {path}: cannot read it: {err.strerror or err}") from err
    if marker not in data:
        kind = "certificate" if marker == CERTIFICATE_MARKER else "private key"
        raise TlsError(f"{what} {path}: no PEM {kind} in it")
    return data


def _read_key(path: str, what: str) -> bytes:
    key = read_pem(path, what, KEY_MARKER)
    if any(marker in key for marker in ENCRYPTED_MARKERS):
        raise TlsError(f"{what} {path}: the key is encrypted; give an unencrypted key "
                       "(gRPC takes no passphrase)")
    return key


def _no_passphrase() -> str:
    """Stands in for OpenSSL's passphrase prompt, which would block a server's start-up."""
    raise TlsError("the private key is encrypted")


def _check_pair(context: ssl.SSLContext, cert: str, key: str, what: str) -> None:
    """Load ``cert`` and ``key`` into ``context``: OpenSSL parses both and refuses a key that
    does not belong to the certificate."""
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except ssl.SSLError as err:
        if "KEY_VALUES_MISMATCH" in str(err) or "key values mismatch" in str(err):
            raise TlsError(f"{what}: the key {key} does not belong to the certificate "
                           f"{cert}") from err
        raise TlsError(f"{what}: cannot load the certificate {cert} with the key {key}: "
                       f"{err.reason or err}") from err


def _check_ca(context: ssl.SSLContext, ca: bytes, path: str, what: str) -> None:
    """Load ``ca`` as trusted roots: OpenSSL parses every certificate in it, so a damaged one
    fails here rather than in every handshake."""
    try:
        context.load_verify_locations(cadata=ca.decode("ascii", errors="replace"))
    except (ssl.SSLError, ValueError) as err:
        raise TlsError(f"{what} {path}: not a usable CA certificate: "
                       f"{getattr(err, 'reason', None) or err}") from err


@dataclass(frozen=True)
class ServerCredentials:
    """Checked TLS material of a listener, in the forms gRPC and aiohttp take."""

    grpc: Any
    """``grpc.ServerCredentials`` for ``add_secure_port``."""
    ssl_context: ssl.SSLContext
    """The same certificate, key and client CA for an HTTPS listener."""
    mutual: bool
    """Whether clients must present a certificate the client CA signed."""


@dataclass(frozen=True)
class ServerTls:
    """Where a listener's TLS material is; all empty: plaintext."""

    cert: str = ""
    """PEM certificate chain the server presents (its own certificate first)."""
    key: str = ""
    """PEM private key of that certificate (unencrypted)."""
    client_ca: str = ""
    """PEM CA certificate(s); set: every client must present a certificate they signed."""

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.key or self.client_ca)

    def load(self) -> ServerCredentials | None:
        """Read and check the files; None when TLS is off. Raises TlsError."""
        if not self.enabled:
            return None
        if not (self.cert and self.key):
            raise TlsError("TLS needs both a certificate and its key (--tls-cert and "
                           "--tls-key)")
        cert = read_pem(self.cert, "TLS certificate", CERTIFICATE_MARKER)
        key = _read_key(self.key, "TLS key")
        # No default CAs: with a client CA, only the certificates it signed may connect.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        _check_pair(context, self.cert, self.key, "TLS")
        client_ca = None
        if self.client_ca:
            client_ca = read_pem(self.client_ca, "TLS client CA", CERTIFICATE_MARKER)
            _check_ca(context, client_ca, self.client_ca, "TLS client CA")
            context.verify_mode = ssl.CERT_REQUIRED
        credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )
        return ServerCredentials(credentials, context, mutual=client_ca is not None)


@dataclass(frozen=True)
class ChannelCredentials:
    """Checked TLS material of a channel: gRPC's credentials and channel options."""

    grpc: Any
    """``grpc.ChannelCredentials`` for ``secure_channel``."""
    options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ChannelTls:
    """Where a channel's TLS material is; all empty (and ``system_roots`` false): plaintext."""

    ca: str = ""
    """PEM CA certificate(s) that verify the server (empty: gRPC's default roots)."""
    cert: str = ""
    """PEM certificate the channel presents to a server that requires one (mutual TLS)."""
    key: str = ""
    """PEM private key of ``cert`` (unencrypted)."""
    server_name: str = ""
    """The name the server's certificate must carry, when the target address differs."""
    system_roots: bool = False
    """TLS even when no file is given, the server verified by gRPC's default roots."""

    @property
    def enabled(self) -> bool:
        return bool(self.system_roots or self.ca or self.cert or self.key)

    def load(self) -> ChannelCredentials | None:
        """Read and check the files; None when TLS is off. Raises TlsError."""
        if not self.enabled:
            if self.server_name:
                raise TlsError("a TLS server name needs TLS (a CA, or a client certificate)")
            return None
        if bool(self.cert) != bool(self.key):
            raise TlsError("a client certificate needs its key, and a key its certificate")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # only checks the files
        ca = None
        if self.ca:
            ca = read_pem(self.ca, "TLS CA", CERTIFICATE_MARKER)
            _check_ca(context, ca, self.ca, "TLS CA")
        cert = key = None
        if self.cert:
            cert = read_pem(self.cert, "TLS client certificate", CERTIFICATE_MARKER)
            key = _read_key(self.key, "TLS client key")
            _check_pair(context, self.cert, self.key, "TLS client certificate")
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )
        options = ((TARGET_NAME_OPTION, self.server_name),) if self.server_name else ()
        return ChannelCredentials(credentials, options)


def aio_channel(
    target: str,
    credentials: ChannelCredentials | None,
    options: Sequence[tuple[str, Any]] = (),
) -> Any:
    """A ``grpc.aio`` channel to ``target``: TLS with ``credentials``, plaintext without."""
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(
        target, credentials.grpc, options=[*options, *credentials.options]
    )


def add_port(server: Any, address: str, credentials: ServerCredentials | None) -> int:
    """Bind a ``grpc.aio`` server to ``address``, with TLS when ``credentials`` are given;
    the bound port (0 when binding failed)."""
    if credentials is None:
        return int(server.add_insecure_port(address))
    return int(server.add_secure_port(address, credentials.grpc))
