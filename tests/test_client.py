"""Client behaviour: async twin, reconnect after restart, bounded memory on huge transfers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from pathlib import Path

import pytest

from host_client import AsyncCoworkClient, CoworkClient
from host_client.errors import AgentUnavailable, NotFound, Unauthenticated
from host_client.models import Output

from .conftest import AgentProc, rss_bytes

RSS_LIMIT = 150 * 1024 * 1024


class RssSampler:
    """Samples a process's RSS every 20 ms in a thread; `.peak` is the maximum seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> RssSampler:
        self.peak = rss_bytes(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_async_client_runs_and_streams(agent: AgentProc) -> None:
    async def main() -> None:
        async with AsyncCoworkClient(agent.target, str(agent.token_file)) as c:
            assert (await c.run("exit 3")).exit_code == 3
            r = await c.exec(["cat"], stdin=b"through").collect()
            assert r.stdout == b"through"
            with pytest.raises(NotFound):
                await c.run(["no-such-binary-xyz"])

    asyncio.run(main())


def test_async_client_200_concurrent_execs(agent: AgentProc) -> None:
    async def main() -> list[str]:
        async with AsyncCoworkClient(agent.target, str(agent.token_file)) as c:
            results = await asyncio.gather(*(c.run(["echo", str(i)]) for i in range(200)))
            return [r.output for r in results]

    assert asyncio.run(main()) == [f"{i}\n" for i in range(200)]


def test_async_client_files_round_trip(agent: AgentProc, tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(3_000_000))

    async def main() -> None:
        async with AsyncCoworkClient(agent.target, str(agent.token_file)) as c:
            await c.upload(str(src), "async-file.bin")
            await c.download("async-file.bin", str(tmp_path / "out.bin"))
            await c.write_file("async-small.txt", "small")
            assert await c.read_file("async-small.txt") == "small"
            assert (await c.stat("async-small.txt")).size == 5

    asyncio.run(main())
    assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()


def test_wrong_token_raises_unauthenticated(agent: AgentProc, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("f" * 64)
    with CoworkClient(agent.target, str(bad)) as c, pytest.raises(Unauthenticated):
        c.info()


def test_same_client_works_after_agent_restart(own_agent: AgentProc) -> None:
    with own_agent.client() as c:
        assert c.run(["echo", "before"]).output == "before\n"
        own_agent.restart()
        assert c.run(["echo", "after"]).output == "after\n"
        assert c.info()["agent_version"]


def test_async_client_works_after_agent_restart(own_agent: AgentProc) -> None:
    async def main() -> None:
        async with AsyncCoworkClient(own_agent.target, str(own_agent.token_file)) as c:
            assert (await c.run(["true"])).exit_code == 0
            await asyncio.get_running_loop().run_in_executor(None, own_agent.restart)
            assert (await c.run(["true"])).exit_code == 0

    asyncio.run(main())


def test_unreachable_agent_is_a_clear_error(tmp_path: Path) -> None:
    tok = tmp_path / "t"
    tok.write_text("x" * 40)
    with CoworkClient(f"unix:{tmp_path}/none.sock", str(tok), connect_timeout=0.5) as c:
        with pytest.raises(AgentUnavailable, match="agent unavailable"):
            c.run(["true"])
        with pytest.raises(AgentUnavailable, match="not ready"):
            c.wait_ready(0.5)


def test_gib_upload_and_download_keep_agent_rss_bounded(
    own_agent: AgentProc, tmp_path: Path
) -> None:
    src = tmp_path / "big.bin"
    chunk = os.urandom(1024 * 1024)
    digest = hashlib.sha256()
    with open(src, "wb") as f:
        for i in range(1024):
            block = chunk[i:] + chunk[:i]
            f.write(block)
            digest.update(block)
    with own_agent.client() as c, RssSampler(own_agent.pid) as rss:
        up = c.upload(str(src), "big.bin")
        src.unlink()
        down = c.download("big.bin", str(tmp_path / "back.bin"))
    assert up.bytes == down.bytes == 1024 * 1024 * 1024
    assert up.sha256 == down.sha256 == digest.hexdigest()
    assert rss.peak < RSS_LIMIT, f"agent RSS peaked at {rss.peak / 2**20:.0f} MiB"


def test_2_gib_of_stdout_keeps_agent_rss_bounded(own_agent: AgentProc) -> None:
    total = 0
    with own_agent.client() as c, RssSampler(own_agent.pid) as rss:
        for ev in c.exec(["head", "-c", str(2 * 1024**3), "/dev/zero"]):
            if isinstance(ev, Output):
                total += len(ev.data)
    assert total == 2 * 1024**3
    assert rss.peak < RSS_LIMIT, f"agent RSS peaked at {rss.peak / 2**20:.0f} MiB"


def test_slow_reader_slows_the_writer_instead_of_growing_memory(own_agent: AgentProc) -> None:
    import time

    with own_agent.client() as c, RssSampler(own_agent.pid) as rss:
        stream = c.exec(["head", "-c", str(512 * 1024**2), "/dev/zero"])
        got = 0
        for i, ev in enumerate(stream):
            if isinstance(ev, Output):
                got += len(ev.data)
                if i < 50:
                    time.sleep(0.02)  # a deliberately slow consumer at the start
    assert got == 512 * 1024**2
    assert rss.peak < RSS_LIMIT
