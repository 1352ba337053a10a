"""The LockStore contract (stem.testing.conformance.LockConformance) on every adapter
in ADAPTERS, through ``store.locks``; ``lock_store_factory`` comes from conftest.py.
Also: acquirers in two processes on one store, exactly one winner per key."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from stem.adapters import store_from_url
from stem.testing.conformance import LockConformance
from tests.helpers import eventually, wait_until


class TestLocks(LockConformance):
    """Every check of the shared suite, once per built-in adapter."""


_RACER = """
import asyncio, os, sys
from stem.adapters import store_from_url

url, namespace, tag, ready, go, *keys = sys.argv[1:]

async def main():
    store = store_from_url(url, namespace=namespace)
    locks = store.locks
    await locks.owner_of("warm-up")  # connect (and create tables) before the race
    open(ready, "w").close()
    while not os.path.exists(go):
        await asyncio.sleep(0.005)
    won = await asyncio.gather(*(locks.acquire(k, f"{tag}-{n}", 60) for k in keys
                                 for n in range(4)))
    print(" ".join(str(sum(won[i * 4:(i + 1) * 4])) for i in range(len(keys))))
    await store.close()

asyncio.run(main())
"""


def _race(store_url: str, namespace: str, tmp_path: Path, keys: list[str]) -> list[int]:
    """Two racer processes, four acquirers each, released at once; wins per key."""
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, store_url, namespace, tag,
             str(tmp_path / f"ready-{tag}"), str(go), *keys],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for tag in ("left", "right")
    ]
    try:
        wait_until(lambda: all((tmp_path / f"ready-{t}").exists() for t in ("left", "right"))
                   or any(p.poll() is not None for p in procs), timeout=60)
        go.touch()
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    left, right = ([int(n) for n in out.split()] for out, _ in outs)
    return [a + b for a, b in zip(left, right, strict=True)]


async def test_acquirers_in_two_processes_exactly_one_wins(
    store_url: str, namespace: str, tmp_path: Path
) -> None:
    if store_url.startswith("memory:"):
        pytest.skip("a memory store lives in one process")
    keys = ["p-1", "p-2", "p-3"]
    assert await asyncio.to_thread(_race, store_url, namespace, tmp_path, keys) == [1, 1, 1]
    async with store_from_url(store_url, namespace=namespace) as store:
        for key in keys:
            owner = await eventually(lambda k=key: store.locks.owner_of(k))
            assert owner.rsplit("-", 1)[0] in ("left", "right")
