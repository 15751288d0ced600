"""What the review app refuses: unsafe settings at start, weak password hashes, redirects off the
site, and the fixed work done for unknown users (pure functions, no I/O)."""

from __future__ import annotations

import hashlib
import ipaddress
import re
from urllib.parse import urlsplit

from batchcxr.errors import ConfigError
from batchcxr.settings import WebSettings

DOCUMENTED_EXAMPLE_KEYS = frozenset({
    "<a long random string>",
    "change-me",
    "changeme",
    "secret",
    "replace with the output of: python3 -c 'import secrets; print(secrets.token_hex(32))'",
})
"""Secret keys shown in documentation or examples: refused as they are."""
MIN_SECRET_BYTES = 32
MIN_SCRYPT_N = 1 << 15
MIN_PBKDF2_ITERATIONS = 600_000
DUMMY_HASH = ("scrypt:32768:8:1$batchcxrdummysalt$"
              "4e7b1bde8df6c4e5b6a6c5fd1c8a29a9c2df0b4e0f6b2b8d7f4f2d3f3d9c5e1f1b3d2a4c6e8f0a1b2c3d4e5f6a7b8c9d0e"
              "1f2a3b4c5d6e7f8091a2b3c4d5e6f708")
"""A well-formed scrypt hash no password matches: checked for unknown users, so they cost the
same time as known ones (user names do not leak by timing)."""


def hash_problem(value: str) -> str | None:
    """Why a werkzeug password hash is too weak to accept, or None."""
    if not value:
        return "empty password hash"
    method = value.split("$", 1)[0]
    parts = method.split(":")
    if parts[0] == "scrypt":
        try:
            n, r, p = (int(x) for x in parts[1:4])
        except ValueError:
            return f"malformed scrypt parameters {method!r}"
        if n < MIN_SCRYPT_N or r < 8 or p < 1:
            return f"scrypt work factor too low ({method}; need n >= {MIN_SCRYPT_N}, r >= 8)"
        return None
    if parts[0] == "pbkdf2":
        try:
            iterations = int(parts[2])
        except (IndexError, ValueError):
            return f"malformed pbkdf2 parameters {method!r}"
        if parts[1] not in ("sha256", "sha512"):
            return f"pbkdf2 with {parts[1]} (need sha256 or sha512)"
        if iterations < MIN_PBKDF2_ITERATIONS:
            return f"pbkdf2 iterations too low ({iterations}; need >= {MIN_PBKDF2_ITERATIONS:,})"
        return None
    return f"hash method {parts[0]!r} not accepted (scrypt or pbkdf2 only; make one with batchcxr hash-password)"


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_web_settings(web: WebSettings) -> None:
    """Refuse settings a hospital's security review would reject, naming each.

    Raises
    ------
    ConfigError
        A secret key under 32 bytes or equal to a documented example, a weak or empty password
        hash, or a non-loopback address without TLS (tls_cert/tls_key) or behind_tls_proxy.
    """
    problems = []
    if web.secret_key:
        if web.secret_key.strip() in DOCUMENTED_EXAMPLE_KEYS or web.secret_key.startswith("<"):
            problems.append("secret_key is the documented example: set a random one "
                            "(python3 -c 'import secrets; print(secrets.token_hex(32))')")
        elif len(web.secret_key.encode()) < MIN_SECRET_BYTES:
            problems.append(f"secret_key is {len(web.secret_key.encode())} bytes: at least {MIN_SECRET_BYTES} needed")
    for user, value in sorted(web.users.items()):
        problem = hash_problem(value)
        if problem:
            problems.append(f"users.{user}: {problem}")
    if bool(web.tls_cert) != bool(web.tls_key):
        problems.append("tls_cert and tls_key go together")
    if not is_loopback(web.host) and not web.tls_cert and not web.behind_tls_proxy:
        problems.append(f"host {web.host} is reachable from other machines but the app has no TLS: set "
                        "tls_cert and tls_key, or behind_tls_proxy = true when a TLS proxy is in front")
    if problems:
        raise ConfigError("[batchcxr.web] refused: " + "; ".join(problems))


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def safe_next(target: str | None) -> str:
    """A path on this site to go to after login, or '' (absolute URLs, scheme-relative //host,
    backslashes and control characters - which browsers strip - are all refused)."""
    if not target or _CONTROL.search(target) or "\\" in target:
        return ""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return ""
    return target


def fingerprint(password_hash: str) -> str:
    """Identifies the configured hash a session was opened with: a new password ends old sessions."""
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]
