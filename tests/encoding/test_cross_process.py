"""Encoded payloads between processes: a real worker process on a SQLite file.

The worker process decrypts args and encrypts results with keys it got from its
environment; this process (and a third, read-only one) decode the stored results
with the same registry. A worker without the producer's key dead-letters the task
with the reason, and the waiting caller gets that reason.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import orjson
import pytest

import stem
from stem import TaskState
from stem.encoding import RESULT_ENCODER_META
from tests.encoding.cross_app import build_registry
from tests.helpers import eventually

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
KEYS_2026 = "2026:" + bytes(range(32)).hex()
KEYS_2025 = "2025:" + bytes(range(40, 72)).hex()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'stem.db'}"


def _env(sqlite_url: str, keys: str) -> dict[str, str]:
    env = {**os.environ, "STEM_BROKER_URL": sqlite_url, "CROSS_AES_KEYS": keys}
    env.pop("STEM_RESULT_BACKEND_URL", None)
    return env


@pytest.fixture
def start_worker(sqlite_url: str, tmp_path: Path) -> Iterator[Callable[[str], None]]:
    """Start ``stem worker start`` for tests.encoding.cross_app holding ``keys``."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(keys: str) -> None:
        log = (tmp_path / f"worker-{len(procs)}.log").open("wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "stem_cli", "worker", "start", "--app",
             "tests.encoding.cross_app:app", "--block-time", "0.1"],
            cwd=ROOT, env=_env(sqlite_url, keys), stdout=log, stderr=subprocess.STDOUT,
        ))

    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


@pytest.fixture
async def producer(sqlite_url: str) -> AsyncIterator[stem.Stem]:
    """A producer that does not import the tasks; same registry as the worker."""
    app = stem.Stem("producer", broker=sqlite_url, backend=sqlite_url, namespace="cross",
                    encoders=build_registry(KEYS_2026))  # the worker's app: Stem("cross")
    yield app
    await app.close()


async def test_results_written_by_a_worker_process_decode_elsewhere(
    start_worker: Callable[[str], None], producer: stem.Stem, sqlite_url: str
) -> None:
    start_worker(KEYS_2026)
    lines = [{"sku": "A", "qty": 2, "price": 1.25}, {"sku": "B", "qty": 1, "price": 10.0}]
    tid = await producer.enqueue("cross.invoice", customer="acme", lines=lines)
    nid = await producer.enqueue("cross.numbers", n=500)
    res = await producer.wait(tid, timeout=30)
    assert res.state is TaskState.SUCCEEDED, res.error
    assert res.value is not None and res.value["total"] == 12.5
    assert res.value["pid"] != os.getpid()
    numbers = await producer.wait(nid, timeout=30)
    assert numbers.value == list(range(500))

    stored = await producer.backend.get(tid)
    assert stored is not None and stored.meta[RESULT_ENCODER_META] == "aes-gcm"
    assert stored.payload["keyId"] == "2026" and "acme" not in orjson.dumps(stored).decode()
    stored_numbers = await producer.backend.get(nid)
    assert stored_numbers is not None and stored_numbers.meta[RESULT_ENCODER_META] == "gzip-json"

    # A third process, which neither wrote nor enqueued it, reads and decodes it too.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.encoding.cross_app", tid, cwd=ROOT,
        env=_env(sqlite_url, KEYS_2026), stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    reader = orjson.loads(stdout)
    assert reader["value"] == res.value and reader["pid"] not in (os.getpid(), res.value["pid"])


async def test_a_worker_without_the_key_dead_letters_with_the_reason(
    start_worker: Callable[[str], None], sqlite_url: str
) -> None:
    start_worker(KEYS_2026)
    producer = stem.Stem("producer", broker=sqlite_url, backend=sqlite_url, namespace="cross",
                         encoders=build_registry(KEYS_2025))
    try:
        tid = await producer.enqueue("cross.invoice", customer="acme", lines=[])
        res = await producer.wait(tid, timeout=30)
        assert res.state is TaskState.FAILED and res.error is not None
        assert res.error.type == "PayloadEncodingError"
        assert "'2025', which this process does not have" in res.error.message
        dead = await eventually(lambda: producer.broker.dead_letters("default"))
        assert dead[0].envelope is not None and dead[0].envelope.id == tid
        assert "'2025', which this process does not have" in dead[0].reason
    finally:
        await producer.close()
