"""TLS material for the servers (gRPC credentials, an ``ssl.SSLContext`` for aiohttp) and for
our own clients (the CLI and the load tester).

Files are read once at start; a missing or unreadable file is a ConfigError naming it. Mutual
TLS is optional: with ``client_ca_file`` clients may present a certificate chaining to it, with
``require_client_cert`` they must. Certificates authenticate the transport only: API keys still
say who the caller is.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from wattserve.errors import ConfigError

from .config import TlsConfig


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read ({exc.strerror})") from None


def grpc_server_credentials(cfg: TlsConfig) -> grpc.ServerCredentials:
    key, cert = _read(cfg.key_file, "tls.key_file"), _read(cfg.cert_file, "tls.cert_file")
    ca = _read(cfg.client_ca_file, "tls.client_ca_file")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=cfg.require_client_cert)


def server_ssl_context(cfg: TlsConfig) -> ssl.SSLContext:
    """The HTTP endpoint's context: TLS >= 1.2, the server certificate, optional client CA."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(Path(cfg.cert_file).expanduser(), Path(cfg.key_file).expanduser())
        if cfg.client_ca_file:
            ctx.load_verify_locations(cafile=str(Path(cfg.client_ca_file).expanduser()))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls: cannot load the certificate, key or client CA ({exc})") from None
    if cfg.client_ca_file:
        ctx.verify_mode = ssl.CERT_REQUIRED if cfg.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


@dataclass(slots=True, frozen=True)
class ClientTls:
    """What a client needs to reach a TLS server: the CA to trust (None: the system's), and a
    certificate and key for mutual TLS."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None  # when the certificate's name differs from the target host

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "--tls-ca"),
            private_key=_read(self.key_file, "--tls-key"),
            certificate_chain=_read(self.cert_file, "--tls-cert"),
        )

    def grpc_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx
