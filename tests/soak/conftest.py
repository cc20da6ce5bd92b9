"""The soak tier drives the real Claude CLI: it shares the Claude tests' fixture for it."""

from tests.claude.conftest import claude_bin  # noqa: F401 (a fixture, used by name)
