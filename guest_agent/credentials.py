"""The Claude API credential: held in the agent's memory, never given to a run.

A run's credential comes from its request (the host client sends
ANTHROPIC_API_KEY / CLAUDE_CODE_OAUTH_TOKEN in AskRequest.env; the agent takes
them out before the CLI's environment is built) or from the one held here by
Auth.Set (`coworkctl auth set`), for runs that have no client behind them.

What the credential never touches: the disk (no file, no swap-safe promise
beyond the kernel's), a box's environment, a log line or an audit record (they
name the header only), a status message, `repr()`. A restarted agent holds
nothing: Auth.Status says when the agent started, so a client can tell.

Scopes: today one, "vm" (every run of this agent). The store is keyed by
scope so that a per-box scope (durable boxes) is a new key, not a new store.
"""

from __future__ import annotations

import hashlib
import re
import time
import urllib.parse
from dataclasses import dataclass, field

import grpc

from cowork.agent.v1 import auth_pb2 as pb
from cowork.agent.v1 import auth_pb2_grpc as pb_grpc

from .errors import AgentError, invalid
from .rpc import Context, audit

API_KEY = "api_key"
OAUTH_TOKEN = "oauth_token"
DEFAULT_BASE_URL = "https://api.anthropic.com"
VM_SCOPE = "vm"
SECRET_MAX_BYTES = 4096

# kind -> (the CLI's variable for its placeholder, the header the agent sends)
KINDS: dict[str, tuple[str, str]] = {
    API_KEY: ("ANTHROPIC_API_KEY", "x-api-key"),
    OAUTH_TOKEN: ("CLAUDE_CODE_OAUTH_TOKEN", "authorization"),
}
# Variables of a request's env that carry a credential or say where it goes:
# the agent takes them, the CLI never sees them. ANTHROPIC_AUTH_TOKEN is a
# bearer token too (the CLI sends it as Authorization: Bearer).
CREDENTIAL_ENV = ("ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_AUTH_TOKEN")
BASE_URL_ENV = "ANTHROPIC_BASE_URL"
_SECRET_RE = re.compile(r"^[\x21-\x7e]+$")  # one header value: printable ASCII, no spaces
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")

_KIND_TO_PB = {API_KEY: pb.CREDENTIAL_KIND_API_KEY, OAUTH_TOKEN: pb.CREDENTIAL_KIND_OAUTH_TOKEN}
_PB_TO_KIND = {v: k for k, v in _KIND_TO_PB.items()}


@dataclass(frozen=True)
class Upstream:
    """Where a credential may be sent: scheme, host, port, and a path prefix."""

    scheme: str
    host: str
    port: int
    prefix: str = ""

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def url(self) -> str:
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if self.port == default else f":{self.port}"
        return f"{self.scheme}://{host}{port}{self.prefix}"

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == (443 if self.tls else 80) else f"{host}:{self.port}"


def parse_base_url(url: str) -> Upstream:
    """The upstream a base URL names; INVALID_ARGUMENT when it is not one the agent sends a
    credential to: https:// with verification, or http:// to a loopback address only (a
    gateway in the VM itself, or a test), so the credential never crosses a network in clear."""
    text = url.strip() or DEFAULT_BASE_URL
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise invalid(f"base URL {text[:200]!r} is not a URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise invalid(f"base URL {text[:200]!r} must start with https://")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise invalid(f"base URL {text[:200]!r} names no host")
    if parts.username or parts.password:
        raise invalid("base URL must not carry user information")
    if parts.query or parts.fragment:
        raise invalid(f"base URL {text[:200]!r} must not have a query or fragment")
    if scheme == "http" and host not in _LOOPBACK_HOSTS and not host.startswith("127."):
        raise invalid(
            f"base URL {text[:200]!r}: the credential goes over TLS only (https://); "
            "http:// is accepted for a loopback address"
        )
    prefix = parts.path.rstrip("/")
    return Upstream(scheme, host, port or (443 if scheme == "https" else 80), prefix)


def check_secret(secret: str) -> str:
    if not secret:
        raise invalid("the credential is empty")
    if len(secret) > SECRET_MAX_BYTES:
        raise invalid(f"the credential is longer than {SECRET_MAX_BYTES} bytes")
    if not _SECRET_RE.match(secret):
        # Never quote it: the message goes to the client, the audit line and the log.
        raise invalid("the credential has spaces or characters a header cannot carry")
    return secret


class Credential:
    """One credential. The secret is reachable only through `header_value()`; repr hides it."""

    __slots__ = ("_secret", "kind", "set_at", "source", "upstream")

    def __init__(self, kind: str, secret: str, upstream: Upstream, source: str) -> None:
        if kind not in KINDS:
            raise invalid(f"unknown credential kind {kind!r}")
        self.kind = kind
        self.upstream = upstream
        self.set_at = time.time()
        self.source = source  # "request" | "held"
        self._secret = check_secret(secret)

    def __repr__(self) -> str:
        return f"Credential({self.kind}, {self.upstream.url}, {self.source})"

    @property
    def env_name(self) -> str:
        return KINDS[self.kind][0]

    @property
    def header(self) -> str:
        return KINDS[self.kind][1]

    def header_value(self) -> str:
        return self._secret if self.kind == API_KEY else f"Bearer {self._secret}"

    def fingerprint(self) -> str:
        return hashlib.sha256(self._secret.encode()).hexdigest()[:8]

    def with_upstream(self, upstream: Upstream) -> Credential:
        other = Credential(self.kind, self._secret, upstream, self.source)
        other.set_at = self.set_at
        return other


def from_request_env(env: dict[str, str]) -> Credential | None:
    """The credential a request's env carries (an API key wins over a token), or None.
    Raises INVALID_ARGUMENT for a malformed one (without quoting it)."""
    base = parse_base_url(env.get(BASE_URL_ENV, ""))
    if env.get("ANTHROPIC_API_KEY"):
        return Credential(API_KEY, env["ANTHROPIC_API_KEY"], base, "request")
    for name in ("CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_AUTH_TOKEN"):
        if env.get(name):
            return Credential(OAUTH_TOKEN, env[name], base, "request")
    return None


@dataclass
class CredentialStore:
    """Credentials held for scopes (today only "vm"), in memory only."""

    started_at: float = field(default_factory=time.time)
    _held: dict[str, Credential] = field(default_factory=dict)

    @staticmethod
    def scope_of(scope: str) -> str:
        scope = scope.strip() or VM_SCOPE
        if scope != VM_SCOPE:
            raise invalid(
                f"credential scope {scope[:100]!r} is not supported: this agent holds one "
                f"credential for the VM (scope {VM_SCOPE!r})"
            )
        return scope

    def set(self, scope: str, credential: Credential) -> None:
        self._held[self.scope_of(scope)] = credential

    def get(self, scope: str = VM_SCOPE) -> Credential | None:
        return self._held.get(self.scope_of(scope))

    def clear(self, scope: str = VM_SCOPE) -> bool:
        return self._held.pop(self.scope_of(scope), None) is not None

    def where(self, scope: str = VM_SCOPE) -> str:
        if self.get(scope) is None:
            return (
                "none held: runs use the credential their request carries; one set with "
                "'coworkctl auth set' lives in the agent's memory only and is gone after "
                "the agent restarts (this agent started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(self.started_at))})"
            )
        return (
            "in the guest agent's memory only (not on disk, not in any box); runs get a "
            "placeholder and the agent adds the credential on the way to the API; "
            "forgotten when the agent restarts"
        )

    def status(self, scope: str = VM_SCOPE) -> pb.CredentialStatus:
        scope = self.scope_of(scope)
        cred = self._held.get(scope)
        out = pb.CredentialStatus(
            held=cred is not None,
            scope=scope,
            agent_started_at=self.started_at,
            where=self.where(scope),
        )
        if cred is not None:
            out.kind = _KIND_TO_PB[cred.kind]
            out.header = cred.header
            out.base_url = cred.upstream.url
            out.set_at = cred.set_at
            out.fingerprint = cred.fingerprint()
        return out


class AuthService(pb_grpc.AuthServicer):
    """Auth.Set/Status/Clear over a CredentialStore. Audit lines name kind and header only."""

    def __init__(self, store: CredentialStore) -> None:
        self.store = store

    async def Set(self, request: pb.SetCredentialRequest, context: Context) -> pb.CredentialStatus:
        kind = _PB_TO_KIND.get(request.kind)
        if kind is None:
            raise invalid("kind must be CREDENTIAL_KIND_API_KEY or CREDENTIAL_KIND_OAUTH_TOKEN")
        scope = self.store.scope_of(request.scope)
        cred = Credential(kind, request.secret, parse_base_url(request.base_url), "held")
        self.store.set(scope, cred)
        audit(scope=scope, kind=kind, header=cred.header, base_url=cred.upstream.url)
        return self.store.status(scope)

    async def Status(
        self, request: pb.CredentialStatusRequest, context: Context
    ) -> pb.CredentialStatus:
        return self.store.status(request.scope)

    async def Clear(
        self, request: pb.ClearCredentialRequest, context: Context
    ) -> pb.CredentialStatus:
        scope = self.store.scope_of(request.scope)
        audit(scope=scope, cleared=self.store.clear(scope))
        return self.store.status(scope)


def missing(store: CredentialStore) -> AgentError:
    """The one line a run without any credential fails with."""
    return AgentError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "no Claude credential: send ANTHROPIC_API_KEY or CLAUDE_CODE_OAUTH_TOKEN with the "
        "request, or hold one in the agent with 'coworkctl auth set' (the agent keeps it in "
        "memory only; this agent started "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(store.started_at))}, and holds none)",
    )
