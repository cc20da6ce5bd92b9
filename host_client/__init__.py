"""cowork host client: drive the guest agent from the host (library + `coworkctl`).

The public names are imported lazily so that `import host_client` (and the
CLI's fast paths) do not pay for grpc until a client is actually made.
"""

from __future__ import annotations

# typing.TYPE_CHECKING without importing typing (a fresh `coworkctl` pays for every import;
# mypy knows the name).
TYPE_CHECKING = False

__all__ = [
    "AsyncCoworkClient",
    "CoworkClient",
    "CoworkError",
    "ExecutionResult",
]

if TYPE_CHECKING:
    from typing import Any

    from .aio import AsyncCoworkClient
    from .client import CoworkClient
    from .errors import CoworkError
    from .models import ExecutionResult


def __getattr__(name: str) -> Any:
    if name == "CoworkClient":
        from .client import CoworkClient

        return CoworkClient
    if name == "AsyncCoworkClient":
        from .aio import AsyncCoworkClient

        return AsyncCoworkClient
    if name == "CoworkError":
        from .errors import CoworkError

        return CoworkError
    if name == "ExecutionResult":
        from .models import ExecutionResult

        return ExecutionResult
    raise AttributeError(name)
