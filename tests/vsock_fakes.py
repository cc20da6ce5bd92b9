"""Stand-ins for the two ends of a virtio-vsock link that this host can run without a VM.

- `FakeHybridVsock`: the host side of vhost-device-vsock / Firecracker / Cloud
  Hypervisor: a unix socket speaking the real `CONNECT <port>\\n` → `OK <n>\\n`
  protocol; accepted ports are forwarded to unix sockets ("the guest").
- `GuestRelay`: the agent's own `guest_agent.vsock.RelayListener`, listening
  on a unix socket in place of AF_VSOCK (this host's kernel has no
  vsock_loopback), relaying into a real agent's gRPC socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

from guest_agent import vsock


class FakeHybridVsock:
    """A hybrid-vsock unix socket. `ports` maps a guest port to a unix socket path.

    `mode` changes the handshake for error tests: "ok", "close" (the guest
    refuses: close without a reply, as vhost-device-vsock does), "silent" (never
    answer), "garbage" (answer something else).
    """

    def __init__(self, ports: dict[int, str], mode: str = "ok") -> None:
        self.ports = ports
        self.mode = mode
        self.dir = tempfile.mkdtemp(prefix="cw-hv-", dir="/tmp")
        self.path = os.path.join(self.dir, "vsock.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(64)
        self.handshakes: list[str] = []
        self.splices: list[vsock.Splice] = []
        self._held: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def target(self, port: int) -> str:
        return f"hvsock:{self.path}:{port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        line = b""
        while not line.endswith(b"\n") and len(line) < 64:
            b = conn.recv(1)
            if not b:
                conn.close()
                return
            line += b
        self.handshakes.append(line.decode())
        if self.mode == "silent":
            self._held.append(conn)
            return
        if self.mode == "garbage":
            conn.sendall(b"ERR no such thing\n")
            conn.close()
            return
        parts = line.split()
        port = int(parts[1]) if len(parts) == 2 and parts[0] == b"CONNECT" else -1
        path = self.ports.get(port)
        if self.mode == "close" or path is None:
            conn.close()
            return
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            up.connect(path)
        except OSError:
            up.close()
            conn.close()
            return
        conn.sendall(b"OK 1073741824\n")
        sp = vsock.Splice(conn, up, name=f"hv:{port}")
        self.splices.append(sp)
        sp.start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for c in self._held:
            c.close()
        for sp in self.splices:
            sp.abort()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)


class GuestRelay:
    """guest_agent.vsock.RelayListener on a unix socket, its loop running in a thread."""

    def __init__(self, upstream: str, peer_ok: Any = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cw-gr-", dir="/tmp"))
        self.path = str(self.dir / "guest.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        s.listen(128)
        self.loop = asyncio.new_event_loop()
        kwargs: dict[str, Any] = {}
        if peer_ok is not None:
            kwargs["peer_ok"] = peer_ok
        self.listener = vsock.RelayListener(s, upstream, "test", **kwargs)
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.listener.start(self.loop)
            self.loop.call_soon(started.set)
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        started.wait(5)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.listener.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            self.dir.rmdir()
