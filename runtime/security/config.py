"""Configuration of authentication and TLS (the ``auth`` and ``tls`` sections).

Secrets never live in the YAML: the config names a keys file and/or an environment variable, and
the keys themselves (or, better, their SHA-256 digests) live there. See docs/reliability.md.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from wattserve.specs import Strict

DEFAULT_KEYS_ENV = "WATTSERVE_API_KEYS"


class AuthConfig(Strict):
    """API keys: one per client (bound to a tenant) and one per operator (every Admin RPC, /metrics)."""

    enabled: bool = Field(
        default=True,
        description="Require a key on every call but the health checks. Turn off only deliberately "
        "(configs/local.yaml does, on loopback); the server warns loudly when it is off on a non-loopback address.",
    )
    keys_file: str | None = Field(
        default=None,
        description="File of keys, one per line: `client <tenant> <key or sha256:<hex>>` or "
        "`operator <name> <key or sha256:<hex>>` (relative to the config file). Prefer digests "
        "(`wattserve auth new-key` prints both).",
    )
    keys_env: str = Field(
        default=DEFAULT_KEYS_ENV,
        description="Environment variable read for more keys, same lines separated by newlines or ';'.",
    )
    metrics_public: bool = Field(
        default=False,
        description="Serve /metrics without a key (e.g. a Prometheus on a private network); "
        "false: /metrics needs an operator key (Prometheus: `authorization: {credentials: ...}`).",
    )


class TlsConfig(Strict):
    """TLS for the gRPC and the HTTP endpoint (both, when cert_file and key_file are set)."""

    cert_file: str | None = Field(default=None, description="PEM server certificate chain; None: plaintext.")
    key_file: str | None = Field(default=None, description="PEM private key of cert_file.")
    client_ca_file: str | None = Field(
        default=None, description="PEM CA bundle that client certificates must chain to (mutual TLS)."
    )
    require_client_cert: bool = Field(
        default=False, description="Mutual TLS: refuse clients without a certificate from client_ca_file."
    )

    @model_validator(mode="after")
    def _pairs(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set both cert_file and key_file, or neither")
        if self.client_ca_file and not self.cert_file:
            raise ValueError("client_ca_file needs cert_file and key_file (mutual TLS is TLS first)")
        if self.require_client_cert and not self.client_ca_file:
            raise ValueError("require_client_cert needs client_ca_file to verify client certificates against")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None
