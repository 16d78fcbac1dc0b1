"""API keys: loading, hashing, and constant-time lookup.

A key is a random string a caller sends as ``authorization: Bearer <key>`` (gRPC metadata or the
HTTP header). The server keeps only SHA-256 digests of keys in memory; a keys file may hold raw
keys or, preferably, their digests (``sha256:<hex>``), so the file need not be secret either.

Lookup hashes the presented key and compares its digest with every known digest using
``hmac.compare_digest``, without stopping at the first match, so neither the key nor which entry
matched shows in the timing. Keys and digests are never logged or put in error messages.

Two roles:

- ``client``: bound to one tenant; a request authenticated by it is that tenant's (a request
  naming another tenant is refused).
- ``operator``: every ``Admin`` RPC and the HTTP admin routes (``/metrics``); may also call
  ``Inference`` on behalf of any tenant (operators are trusted with budgets already).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from wattserve.errors import ConfigError, PermissionDenied, Unauthenticated

from .config import AuthConfig

log = logging.getLogger(__name__)

Role = Literal["client", "operator"]
ROLES: tuple[str, ...] = ("client", "operator")
MIN_KEY_CHARS = 16  # shorter raw keys are refused: they could be guessed
KEY_PREFIX = "ws-"  # keys made by `wattserve auth new-key` (any string of >= 16 chars works)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
_BEARER = re.compile(r"^\s*bearer\s+(\S+)\s*$", re.IGNORECASE)
UNAUTHENTICATED_MESSAGE = "missing or invalid credentials: send `authorization: Bearer <api key>`"


@dataclass(slots=True, frozen=True)
class Principal:
    """Who a call is from: a client of ``name`` (a tenant), an operator ``name``, or anyone
    (``anonymous``: auth is off, or a public route)."""

    role: Literal["client", "operator", "anonymous"]
    name: str = ""

    @property
    def is_operator(self) -> bool:
        return self.role == "operator"


ANONYMOUS = Principal("anonymous")


@dataclass(slots=True, frozen=True)
class _Entry:
    role: Role
    name: str
    digest: bytes  # sha256 of the key


def digest_of(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def new_key() -> str:
    """A fresh random key (256 bits, URL-safe)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_line(role: Role, name: str, key: str) -> str:
    """The keys-file line for ``key``, holding only its digest."""
    return f"{role} {name} sha256:{digest_of(key).hex()}"


class KeyStore:
    """The known keys of one server. ``authenticate`` is the only way in."""

    def __init__(self, entries: list[_Entry]) -> None:
        self._entries = tuple(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def replace_with(self, other: KeyStore) -> None:
        """Take ``other``'s keys (a reload). One reference swap: a lookup under way sees the old
        set or the new one, never a mix."""
        self._entries = other._entries

    def count(self, role: Role) -> int:
        return sum(e.role == role for e in self._entries)

    def tenants(self) -> set[str]:
        return {e.name for e in self._entries if e.role == "client"}

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an ``authorization`` header value; raises Unauthenticated."""
        m = _BEARER.match(authorization or "")
        if m is None:
            raise Unauthenticated(UNAUTHENTICATED_MESSAGE)
        digest = digest_of(m.group(1))
        found: _Entry | None = None
        for entry in self._entries:  # no early exit: the time does not depend on which entry matched
            if hmac.compare_digest(digest, entry.digest):
                found = entry
        if found is None:
            raise Unauthenticated(UNAUTHENTICATED_MESSAGE)
        return Principal(found.role, found.name)


def parse_keys(text: str, source: str) -> list[_Entry]:
    """Entries of a keys file (or of the environment variable); ``source`` names it in errors,
    which give the line number but never the line."""
    entries = []
    for number, raw in enumerate(re.split(r"[\n;]", text), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3 or parts[0] not in ROLES:
            raise ConfigError(f"{source}: entry {number} is not `client|operator <name> <key or sha256:<hex>>`")
        role, name, secret = parts
        if not _NAME.match(name):
            raise ConfigError(f"{source}: entry {number}: name must be 1-64 letters, digits, '_', '.', '@' or '-'")
        m = _DIGEST.match(secret)
        if m is not None:
            digest = bytes.fromhex(m.group(1))
        elif secret.startswith("sha256:"):
            raise ConfigError(f"{source}: entry {number}: a digest is sha256: followed by 64 lower-case hex digits")
        elif len(secret) < MIN_KEY_CHARS:
            raise ConfigError(f"{source}: entry {number}: keys need at least {MIN_KEY_CHARS} characters "
                              "(`wattserve auth new-key` makes one)")
        else:
            digest = digest_of(secret)
        entries.append(_Entry(role, name, digest))  # type: ignore[arg-type]
    return entries


def load_keys(cfg: AuthConfig, environ: Mapping[str, str] | None = None) -> KeyStore | None:
    """The keys the config points at (file and environment); None when auth is off.

    Raises ConfigError when auth is on and there is no key at all, or no operator key (the
    Admin API would be unreachable), so a misconfigured server fails at start, not per call.
    """
    if not cfg.enabled:
        return None
    environ = os.environ if environ is None else environ
    entries: list[_Entry] = []
    if cfg.keys_file:
        path = Path(cfg.keys_file).expanduser()
        try:
            mode = path.stat().st_mode
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"auth.keys_file {path}: cannot read ({exc.strerror})") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO) and "sha256:" not in text:
            log.warning("auth.keys_file %s holds raw keys and is readable by others: chmod 600 it, "
                        "or store digests (sha256:...)", path)
        entries += parse_keys(text, f"auth.keys_file {path}")
    if environ.get(cfg.keys_env):
        entries += parse_keys(environ[cfg.keys_env], f"${cfg.keys_env}")
    if not entries:
        raise ConfigError(
            f"auth is enabled but no keys are configured: set auth.keys_file or ${cfg.keys_env} "
            "(`wattserve auth new-key` makes keys), or set auth.enabled: false deliberately"
        )
    store = KeyStore(entries)
    if not store.count("operator"):
        raise ConfigError("auth is enabled but no operator key is configured: the Admin API would be unreachable")
    return store


def bind_tenant(principal: Principal, requested: str) -> str:
    """The tenant a request is served as. A client key decides it: the request's ``tenant``
    field must be empty or the key's own. Operators and anonymous callers (auth off) name it."""
    if principal.role != "client":
        return requested
    if requested and requested != principal.name:
        raise PermissionDenied("this API key may not act for another tenant: leave `tenant` empty or send your own")
    return principal.name
