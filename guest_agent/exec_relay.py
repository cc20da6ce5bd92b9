"""The Claude credential for an Exec'd process, the relay way (ProcessSpec.claude_relay).

`coworkctl claude` runs the interactive CLI over a PTY through Process.Exec. Like a
Claude.Ask run (claude.py), that process gets a placeholder credential and
ANTHROPIC_BASE_URL on the agent's API relay (api_relay.py: 127.0.0.1:3129 in the box,
or a private loopback port without one); the real credential (the request's
ClaudeRelay.secret, else the one Auth.Set holds) stays in the agent, which adds it on
the way to the API. So whatever the TUI session runs (`!env`, a Bash tool, a prompt
injection reading /proc/*/environ) finds only the placeholder.

The request's env must not carry a credential or base URL in this mode
(INVALID_ARGUMENT, one line, never quoting a value); the agent's own environment's are
dropped. The grant lives as long as the process: its loopback registration (no box)
is closed with it, the box's relay listener goes with the box.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cowork.agent.v1 import auth_pb2
from cowork.agent.v1 import process_pb2 as pb

from . import credentials as creds
from .api_relay import ApiRelay, Endpoint, Handler, Route
from .boxes import Box
from .errors import invalid
from .sandbox import RELAY_URL, Sandbox

CAPABILITY = "process.claude_relay"
_KINDS = {
    auth_pb2.CREDENTIAL_KIND_API_KEY: creds.API_KEY,
    auth_pb2.CREDENTIAL_KIND_OAUTH_TOKEN: creds.OAUTH_TOKEN,
}
_FORBIDDEN_ENV = (*creds.CREDENTIAL_ENV, creds.BASE_URL_ENV)


def no_proxy_for_loopback(env: dict[str, str]) -> None:
    """An inherited HTTP(S)_PROXY must not carry the CLI's calls to its loopback relay."""
    if not any(k.lower() in ("http_proxy", "https_proxy", "all_proxy") for k in env):
        return
    for name in ("NO_PROXY", "no_proxy"):
        have = [x for x in env.get(name, "").split(",") if x.strip()]
        if "127.0.0.1" not in have:
            env[name] = ",".join([*have, "127.0.0.1"])


@dataclass
class RelayGrant:
    """One process's way to the API: its route (credential + placeholder), the sandbox
    mode it was decided for, and its loopback registration when it has no box."""

    route: Route
    mode: str
    relay: ApiRelay
    endpoint: Endpoint | None = None

    @property
    def boxed(self) -> bool:
        return self.route.boxed

    @property
    def handler(self) -> Handler | None:
        """What serves 127.0.0.1:3129 inside the run's own box (None without a box, or in
        a named box: its listener is the box's)."""
        return self.relay.handler(self.route) if self.boxed and self.endpoint is None else None

    def apply(self, env: dict[str, str]) -> None:
        """Replace every credential and base URL of `env` by the placeholder and the relay."""
        for name in _FORBIDDEN_ENV:
            env.pop(name, None)
        if self.boxed:
            env.update(self.route.env(RELAY_URL))
        else:
            assert self.endpoint is not None and self.endpoint.port
            env.update(self.route.env(self.endpoint.base_url))
            no_proxy_for_loopback(env)

    def close(self) -> None:
        """The process is over: its placeholder no longer opens the relay."""
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None


def strip(env: dict[str, str]) -> None:
    """No credential given or held: the process gets none (not even the agent's own)."""
    for name in _FORBIDDEN_ENV:
        env.pop(name, None)


def credential_of(
    msg: pb.ClaudeRelay, env: Mapping[str, str], store: creds.CredentialStore
) -> creds.Credential | None:
    """The process's credential: the request's (dedicated field), else the one held, else
    None (the CLI's own login in the box, if any). INVALID_ARGUMENT for one in `env`."""
    given = sorted(name for name in _FORBIDDEN_ENV if name in env)
    if given:
        raise invalid(
            f"claude_relay is set, so env must not carry {', '.join(given)}: send the "
            "credential in claude_relay (or hold one with 'coworkctl auth set')"
        )
    if msg.kind != auth_pb2.CREDENTIAL_KIND_UNSPECIFIED or msg.secret:
        kind = _KINDS.get(msg.kind)
        if kind is None:
            raise invalid(
                "claude_relay.kind must be CREDENTIAL_KIND_API_KEY or "
                "CREDENTIAL_KIND_OAUTH_TOKEN when a secret is sent"
            )
        return creds.Credential(kind, msg.secret, creds.parse_base_url(msg.base_url), "request")
    held = store.get()
    if held is None:
        return None
    if msg.base_url:
        return held.with_upstream(creds.parse_base_url(msg.base_url))
    return held


async def grant(
    msg: pb.ClaudeRelay,
    env: Mapping[str, str],
    store: creds.CredentialStore,
    relay: ApiRelay,
    sandbox: Sandbox | None,
    box: Box | None = None,
) -> RelayGrant | None:
    """Check the request and register the process on the relay (close() the grant); None
    when there is no credential: the process then gets none at all (see strip()). In a
    named `box`, on the box's relay listener."""
    credential = credential_of(msg, env, store)
    if credential is None:
        return None
    mode = box.mode if box is not None else sandbox.mode() if sandbox is not None else "none"
    route = Route(credential, boxed=mode == "bwrap")
    out = RelayGrant(route, mode, relay)
    if box is not None and route.boxed:
        out.endpoint = relay.register(route, box.routes)
    elif not route.boxed:
        out.endpoint = await relay.serve_loopback(route)
    return out
