"""Storage rules every adapter follows (issue "Hardening"): namespaces map to storage
one-to-one, stored numbers are bounded (priority 0-9, lease within stem.limits), and
no stored value can make a fetch fail for the other rows."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import pytest

from stem._time import now_epoch
from stem.adapters import backend_from_url, broker_from_url
from stem.envelope import Envelope
from stem.errors import ConfigurationError, ServiceUnavailableError
from stem.limits import MAX_VISIBILITY_TIMEOUT
from stem.ports import Broker, Delivery, ResultBackend
from stem.status import TaskState, TaskStatus
from tests.conformance.conftest import ADAPTERS
from tests.services import drop_pg_schema, drop_redis_keys

Q = "rules"

#: Namespaces the old sanitising mapped to one Postgres schema / SQLite prefix.
ALIKE = ("{}-a-b", "{}_a_b")
#: Namespaces outside the documented set (lower-case a-z, 0-9, '_', '-'; 1-63 long;
#: not starting with 'pg_' or '-'/'_').
REFUSED = ["a b", "a.b", "p:t", "{x}", "App", "", "x" * 64, "pg_x", "-x", "_x", "a/b", "é"]


def env(i: int = 0, **kw: object) -> Envelope:
    kw.setdefault("queue", Q)
    return Envelope(name="rules.task", args={"i": i}, **kw)  # type: ignore[arg-type]


async def fetch_now(broker: Broker, n: int = 100) -> list[Delivery]:
    return await broker.fetch([Q], n, block=0, consumer="c1")


UrlFor = Callable[..., str]


def shared_store_url(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> UrlFor:
    """URL of one store shared by several namespaces (no ``?schema=``: the namespace
    alone decides where Postgres keeps a namespace's tables). ``url(ns)`` also drops
    what ``ns`` stored at the end; ``url(ns, cleanup=False)`` is for adapters that are
    never used (so nothing of a shared namespace such as ``stem`` is touched)."""
    if name == "memory":
        return lambda ns, cleanup=True: "memory://rules"
    if name == "sqlite":
        return lambda ns, cleanup=True: f"sqlite:///{tmp_path / 'shared.db'}"
    base = request.getfixturevalue(f"{name}_url")

    def url(ns: str, cleanup: bool = True) -> str:
        if cleanup:
            drop = drop_pg_schema if name == "postgres" else drop_redis_keys
            request.addfinalizer(lambda: asyncio.run(drop(base, ns)))
        return str(base)

    return url


@pytest.fixture(params=ADAPTERS)
def url_for(request: pytest.FixtureRequest, tmp_path: Path) -> UrlFor:
    return shared_store_url(request.param, tmp_path, request)


@pytest.fixture
async def opened() -> AsyncIterator[list[Broker | ResultBackend]]:
    made: list[Broker | ResultBackend] = []
    yield made
    for a in made:
        await a.close()


async def test_namespaces_that_used_to_sanitise_alike_do_not_share_jobs_or_results(
    url_for: UrlFor, namespace: str, opened: list[Broker | ResultBackend]
) -> None:
    one_ns, two_ns = (n.format(namespace) for n in ALIKE)
    one = broker_from_url(url_for(one_ns), namespace=one_ns)
    two = broker_from_url(url_for(two_ns), namespace=two_ns)
    r_one = backend_from_url(url_for(one_ns), namespace=one_ns)
    r_two = backend_from_url(url_for(two_ns), namespace=two_ns)
    opened.extend([one, two, r_one, r_two])
    e = env(1)
    await one.publish([e])
    assert await fetch_now(two) == []
    assert (await two.stats(Q)).pending == 0
    [d] = await fetch_now(one)
    assert d.envelope is not None and d.envelope.id == e.id
    await r_one.set_many([(TaskStatus(id=e.id, state=TaskState.SUCCEEDED, payload=1), None)])
    assert await r_two.get(e.id) is None
    assert (await r_one.get(e.id)) is not None


@pytest.mark.parametrize("bad", REFUSED)
async def test_a_namespace_outside_the_documented_set_is_refused(
    url_for: UrlFor, bad: str
) -> None:
    url = url_for(bad, cleanup=False)
    with pytest.raises(ConfigurationError, match=r"a-z, 0-9, '_' and '-'"):
        broker_from_url(url, namespace=bad)
    with pytest.raises(ConfigurationError, match=r"a-z, 0-9, '_' and '-'"):
        backend_from_url(url, namespace=bad)


@pytest.mark.parametrize("ok", ["stem", "a", "0", "app-one", "app_one", "x" * 63, "t-1_b"])
async def test_namespaces_in_the_documented_set_are_accepted(
    url_for: UrlFor, ok: str, opened: list[Broker | ResultBackend]
) -> None:
    url = url_for(ok, cleanup=False)  # built, never used: nothing is created
    opened.extend([broker_from_url(url, namespace=ok), backend_from_url(url, namespace=ok)])


@pytest.mark.parametrize("vt", [1e13, 0.0, -1.0, 0.05, float("inf"), float("nan")])
async def test_publish_refuses_a_visibility_timeout_out_of_range(broker: Broker, vt: float) -> None:
    with pytest.raises(ConfigurationError, match="visibility timeout"):
        await broker.publish([env(1), env(2, visibility_timeout=vt)])
    # All or nothing: the valid envelope of the batch was not stored either.
    assert (await broker.stats(Q)).pending == 0
    await broker.publish([env(3, visibility_timeout=MAX_VISIBILITY_TIMEOUT)])
    assert (await broker.stats(Q)).pending == 1


def _raw(i: int, **fields: object) -> bytes:
    data = orjson.loads(env(i).to_json())
    data.update(fields)
    return orjson.dumps(data)


async def test_a_huge_visibility_timeout_in_stored_bytes_does_not_block_the_queue(
    broker: Broker,
) -> None:
    # publish_raw stores the bytes as they are; whatever the decoder makes of them,
    # the stored lease is bounded and the other rows are handed out with it.
    await broker.publish_raw(Q, _raw(1, visibilityTimeout=1e16))
    await broker.publish_raw(Q, _raw(2, visibilityTimeout=-5000))
    await broker.publish_raw(Q, _raw(3, visibilityTimeout=10**18))
    await broker.publish([env(4)])
    got = await fetch_now(broker)
    assert len(got) == 4
    now = now_epoch()
    for d in got:
        assert d.lease_expires_at is not None
        assert now - 5 < d.lease_expires_at <= now + MAX_VISIBILITY_TIMEOUT + 5


async def test_priority_42_behaves_like_9(broker: Broker) -> None:
    # Published in this order; 42 and 9 are the same priority, so first in, first out.
    order = [env(0, priority=9), env(1, priority=42), env(2, priority=0), env(3, priority=-3)]
    for e in order:
        await broker.publish([e])
    got = [(await fetch_now(broker, 1))[0] for _ in order]
    assert [d.envelope.args["i"] for d in got if d.envelope is not None] == [0, 1, 2, 3]


async def test_publish_raw_priority_is_clamped_like_publish(broker: Broker) -> None:
    await broker.publish_raw(Q, _raw(0), priority=9)
    await broker.publish_raw(Q, _raw(1), priority=42)
    await broker.publish_raw(Q, _raw(2), priority=100_000)  # beyond Postgres' smallint
    await broker.publish_raw(Q, _raw(3), priority=0)
    await broker.publish_raw(Q, _raw(4), priority=-100_000)
    got = [(await fetch_now(broker, 1))[0] for _ in range(5)]
    assert [d.envelope.args["i"] for d in got if d.envelope is not None] == [0, 1, 2, 3, 4]


async def test_extend_lease_to_an_absurd_length_is_bounded(broker: Broker) -> None:
    await broker.publish([env(1)])
    [d] = await fetch_now(broker)
    await broker.extend_lease([d], 1e13)
    assert d.lease_expires_at is not None
    assert d.lease_expires_at <= now_epoch() + MAX_VISIBILITY_TIMEOUT + 5
    await broker.ack([d])
    assert (await broker.stats(Q)).in_flight == 0


# -- empty batches --------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unreachable_url(name: str, tmp_path: Path) -> str:
    """A URL of ``name``'s kind whose store cannot be reached (memory always can)."""
    if name == "memory":
        return "memory://unreachable"
    if name == "sqlite":
        blocker = tmp_path / "a-file"
        blocker.write_bytes(b"")
        return f"sqlite:///{blocker / 'stem.db'}"  # its directory is a file
    if name == "redis":
        return f"redis://127.0.0.1:{_closed_port()}/0"
    return f"postgresql://stem@127.0.0.1:{_closed_port()}/stem"


@pytest.mark.parametrize("name", ADAPTERS)
async def test_empty_batches_do_no_io(name: str, tmp_path: Path) -> None:
    """Every publish/settle call with nothing in it returns at once, even when the store
    is unreachable: it never talks to the store."""
    broker = broker_from_url(unreachable_url(name, tmp_path))
    try:
        await broker.publish([])
        await broker.ack([])
        await broker.nack([])
        await broker.retry([])
        await broker.dead_letter([])
        await broker.extend_lease([], 10.0)
        if name != "memory":
            with pytest.raises(ServiceUnavailableError):
                await broker.ping()  # the store really is unreachable
    finally:
        await broker.close()


async def test_a_delivery_from_another_broker_is_refused_by_every_settle_call(
        broker: Broker) -> None:
    """A foreign delivery is a programming error (TypeError), on every adapter alike;
    a lost lease of this broker's own is what settle calls ignore silently."""
    await broker.publish([Envelope(name="t", queue="q")])
    [own] = await broker.fetch(["q"], 1, block=0, consumer="c")
    foreign = Delivery(envelope=own.envelope, receipt="elsewhere:1", queue="q", raw=own.raw,
                       lease=("someone", "else"))
    for call in (lambda: broker.ack([foreign]), lambda: broker.nack([foreign]),
                 lambda: broker.retry([(foreign, own.envelope)]),  # type: ignore[list-item]
                 lambda: broker.dead_letter([(foreign, "x")]),
                 lambda: broker.extend_lease([foreign], 5)):
        with pytest.raises(TypeError, match="not fetched from this"):
            await call()
    assert (await broker.stats("q")).in_flight == 1  # nothing happened to the real one
    await broker.ack([own])
