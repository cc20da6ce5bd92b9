"""Path confinement: every path a client names must resolve inside a workspace root.

The agent never trusts what runs in the sandbox, and sandboxed code can plant
symlinks in the workspace; so the check is made on the *resolved* path (after
every symlink), and the final component is opened with O_NOFOLLOW where the
operation allows it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .errors import denied, invalid


class PathPolicy:
    """Resolves client paths against the roots; `unrestricted` turns confinement off."""

    def __init__(self, roots: Sequence[str], unrestricted: bool = False) -> None:
        self.roots = [os.path.realpath(r) for r in roots]
        self.unrestricted = unrestricted

    @property
    def default_dir(self) -> str:
        return self.roots[0] if self.roots else "/"

    def _absolute(self, path: str) -> str:
        if not path:
            raise invalid("path is empty")
        if "\x00" in path:
            raise invalid("path contains a NUL byte")
        if not os.path.isabs(path):
            path = os.path.join(self.default_dir, path)
        return os.path.normpath(path)

    def _inside(self, real: str) -> bool:
        if self.unrestricted:
            return True
        return any(real == r or real.startswith(r.rstrip("/") + "/") for r in self.roots)

    def resolve(self, path: str) -> str:
        """Fully resolved path (symlinks followed), which must be inside a root."""
        absolute = self._absolute(path)
        real = os.path.realpath(absolute)
        if not self._inside(real):
            raise denied(f"path outside the workspace roots: {path}")
        return real

    def resolve_entry(self, path: str) -> str:
        """Path whose *parent* is resolved but whose last component is kept as is.

        For operations on the entry itself (stat without following, remove,
        rename, create): removing a symlink removes the link, not its target.
        """
        absolute = self._absolute(path)
        parent, name = os.path.split(absolute)
        if not name:  # "/" itself
            return self.resolve(absolute)
        if os.path.realpath(absolute) in self.roots:
            return os.path.realpath(absolute)
        real_parent = os.path.realpath(parent)
        entry = os.path.join(real_parent, name)
        if not self._inside(real_parent) or not self._inside(entry):
            raise denied(f"path outside the workspace roots: {path}")
        return entry

    def is_root(self, real: str) -> bool:
        return real in self.roots
