"""API keys as plain values: parsing, loading, authentication, tenant binding."""

from __future__ import annotations

import os

import pytest

from runtime.api.auth import authorize, grpc_access, http_access
from runtime.security.config import AuthConfig, TlsConfig
from runtime.security.keys import ANONYMOUS, KeyStore, Principal, bind_tenant, key_line, load_keys, new_key, parse_keys
from wattserve.errors import ConfigError, PermissionDenied, Unauthenticated

CLIENT, OPERATOR = "ws-client-secret-abcdefgh", "ws-operator-secret-abcdefgh"


def store() -> KeyStore:
    return KeyStore(parse_keys(f"{key_line('client', 'acme', CLIENT)}\noperator ops {OPERATOR}", "test"))


def test_authenticate_by_key_and_digest():
    keys = store()
    assert keys.authenticate(f"Bearer {CLIENT}") == Principal("client", "acme")
    assert keys.authenticate(f"bearer   {OPERATOR} ") == Principal("operator", "ops")
    for bad in (None, "", CLIENT, f"Basic {CLIENT}", f"Bearer {CLIENT}x", "Bearer", f"Bearer {CLIENT} extra"):
        with pytest.raises(Unauthenticated) as err:
            keys.authenticate(bad)
        assert CLIENT not in str(err.value)


def test_new_keys_are_long_and_distinct():
    a, b = new_key(), new_key()
    assert a != b and len(a) >= 40
    assert a not in key_line("client", "t", a)


@pytest.mark.parametrize("text, problem", [
    ("client acme", "is not `client|operator"),
    ("admin ops ws-long-enough-key-123", "is not `client|operator"),
    ("client acme short", "at least 16 characters"),
    ("client acme sha256:abc", "64 lower-case hex"),
    ("client a/b ws-long-enough-key-123", "name must be"),
])
def test_bad_key_lines_name_the_entry_but_never_the_secret(text, problem):
    with pytest.raises(ConfigError) as err:
        parse_keys(f"# comment\n\n{text}", "keys.txt")
    assert problem in str(err.value) and "entry 3" in str(err.value)
    assert "short" not in str(err.value).replace("shorten", "")


def test_load_keys_from_file_and_environment(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text(key_line("operator", "ops", OPERATOR) + "\n")
    os.chmod(path, 0o600)
    keys = load_keys(AuthConfig(keys_file=str(path), keys_env="K"), {"K": f"client acme {CLIENT};client beta {CLIENT}b"})
    assert len(keys) == 3 and keys.tenants() == {"acme", "beta"} and keys.count("operator") == 1
    assert load_keys(AuthConfig(enabled=False)) is None


def test_auth_on_without_keys_or_operators_fails_at_start(tmp_path):
    with pytest.raises(ConfigError, match="no keys are configured"):
        load_keys(AuthConfig(keys_env="K"), {})
    with pytest.raises(ConfigError, match="no operator key"):
        load_keys(AuthConfig(keys_env="K"), {"K": f"client acme {CLIENT}"})
    with pytest.raises(ConfigError, match="cannot read"):
        load_keys(AuthConfig(keys_file=str(tmp_path / "missing")), {})


def test_access_levels_and_authorization():
    assert grpc_access("/grpc.health.v1.Health/Check") == "public"
    assert grpc_access("/wattserve.v1.Admin/SetEnergyBudget") == "operator"
    assert grpc_access("/wattserve.v1.Inference/Generate") == "client"
    assert grpc_access("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") == "client"
    assert http_access("/metrics", metrics_public=False) == "operator"
    assert http_access("/metrics", metrics_public=True) == "public"
    assert http_access("/v1/completions", False) == "client" and http_access("/health", False) == "public"
    keys = store()
    assert authorize(None, "operator", None) == ANONYMOUS  # auth off
    assert authorize(keys, "public", None) == ANONYMOUS
    with pytest.raises(PermissionDenied):
        authorize(keys, "operator", f"Bearer {CLIENT}")
    assert authorize(keys, "client", f"Bearer {OPERATOR}").is_operator


def test_bind_tenant():
    acme = Principal("client", "acme")
    assert bind_tenant(acme, "") == "acme" and bind_tenant(acme, "acme") == "acme"
    with pytest.raises(PermissionDenied):
        bind_tenant(acme, "beta")
    assert bind_tenant(Principal("operator", "ops"), "beta") == "beta"
    assert bind_tenant(ANONYMOUS, "anyone") == "anyone"


def test_tls_config_needs_pairs():
    with pytest.raises(ValueError, match="both cert_file and key_file"):
        TlsConfig(cert_file="a.pem")
    with pytest.raises(ValueError, match="needs client_ca_file"):
        TlsConfig(cert_file="a", key_file="b", require_client_cert=True)
    assert not TlsConfig().enabled and TlsConfig(cert_file="a", key_file="b").enabled


@pytest.mark.parametrize("host, keys, expect", [
    ("0.0.0.0", None, "authentication is OFF"),
    ("0.0.0.0", "client default ws-key-0123456789abcdef;operator ops ws-key-fedcba9876543210", "TLS is off"),
    ("127.0.0.1", None, None),
    ("::1", None, None),
])
def test_exposure_warnings(host, keys, expect, monkeypatch):
    """Auth off (or keys without TLS) on a non-loopback address is a loud warning; loopback is quiet."""
    from runtime.api.server import WattserveServer
    from runtime.config import parse_config

    monkeypatch.setenv("WATTSERVE_TEST_KEYS", keys or "")
    auth = {"keys_env": "WATTSERVE_TEST_KEYS"} if keys else {"enabled": False}
    cfg = parse_config({"auth": auth, "gateway": {"host": host}, "http": {"enabled": False},
                        "experts": [{"name": "e", "engine": {"kind": "synthetic"}}]})
    said: list[str] = []
    WattserveServer(cfg, progress=said.append)._security_checks()
    warnings = [m for m in said if m.startswith("WARNING")]
    assert (expect is None and not warnings) or (len(warnings) == 1 and expect in warnings[0]), said
