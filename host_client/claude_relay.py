"""ClaudeRelay: give an exec'd process the Claude API the way Claude runs get it.

The credential goes to the agent in ProcessSpec.claude_relay (its own field, never
the process's env); the process gets a placeholder and ANTHROPIC_BASE_URL on the
agent's API relay, which adds the real credential on the way to the API. Used by
`coworkctl claude` (the interactive TUI).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from cowork.agent.v1 import auth_pb2, process_pb2

_KINDS = {
    "": auth_pb2.CREDENTIAL_KIND_UNSPECIFIED,
    "api_key": auth_pb2.CREDENTIAL_KIND_API_KEY,
    "oauth_token": auth_pb2.CREDENTIAL_KIND_OAUTH_TOKEN,
}


@dataclass(frozen=True)
class ClaudeRelay:
    """`kind` "api_key" | "oauth_token" with its `secret`, or neither: the credential the
    agent holds (`coworkctl auth set`). `base_url`: empty = the held one's, else the API."""

    kind: str = ""
    secret: str = field(default="", repr=False)
    base_url: str = ""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be 'api_key' or 'oauth_token', not {self.kind!r}")
        if bool(self.kind) != bool(self.secret):
            raise ValueError("kind and secret go together (neither: the agent's held credential)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClaudeRelay:
        """From ANTHROPIC_API_KEY, else CLAUDE_CODE_OAUTH_TOKEN / ANTHROPIC_AUTH_TOKEN, and
        ANTHROPIC_BASE_URL of `env` (default: this process's); none: the held one."""
        src = os.environ if env is None else env
        base = src.get("ANTHROPIC_BASE_URL", "")
        if src.get("ANTHROPIC_API_KEY"):
            return cls("api_key", src["ANTHROPIC_API_KEY"], base)
        for name in ("CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_AUTH_TOKEN"):
            if src.get(name):
                return cls("oauth_token", src[name], base)
        return cls(base_url=base)

    def to_proto(self) -> process_pb2.ClaudeRelay:
        return process_pb2.ClaudeRelay(
            kind=_KINDS[self.kind], secret=self.secret, base_url=self.base_url
        )
