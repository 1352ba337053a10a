"""Rate limits in the worker, in process on the memory adapters: options, deferral
(same attempt, no retry used, Dart's status meta), reservations that spread denied
deliveries instead of spinning on them, group limits and an unreachable limiter."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

import stem
from stem import TaskState
from stem.ports import RateLimitDecision, RateLimiter
from stem.ratelimit import Rate, gcra, parse_rate
from stem.worker import ratelimit as worker_ratelimit
from stem.worker.ratelimit import META_RATE_SLOTS
from tests.helpers import eventually, running_worker


@pytest.fixture
def app(namespace: str) -> stem.Stem:
    return stem.Stem("t", broker=f"memory://{namespace}", backend=f"memory://{namespace}")


# -- options ------------------------------------------------------------------------


@pytest.mark.parametrize("text,rate", [("10/s", Rate(10, 1.0)), ("100/m", Rate(100, 60.0)),
                                       (" 500 / h ", Rate(500, 3600.0))])
def test_rates_parse(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("option", ["rate_limit", "group_rate_limit"])
@pytest.mark.parametrize("bad", ["10", "0/s", "-1/s", "1.5/s", "10/d", "ten/s", "", "10/sec"])
def test_an_unparsable_rate_is_refused_at_definition(app: stem.Stem, option: str,
                                                     bad: str) -> None:
    with pytest.raises(stem.ConfigurationError, match=f"{option}: rate limit"):
        app.task(name="t", **{option: bad})(lambda: None)


def test_group_and_failure_options_are_checked(app: stem.Stem) -> None:
    with pytest.raises(stem.ConfigurationError, match="group_rate_key needs group_rate_limit"):
        app.task(name="t", group_rate_key="pay")(lambda: None)
    with pytest.raises(stem.ConfigurationError, match="rate_limit_failure"):
        app.task(name="t", rate_limit="1/s", rate_limit_failure="maybe")(  # type: ignore[arg-type]
            lambda: None)
    with pytest.raises(stem.ConfigurationError, match="rate_limit_key_header"):
        app.task(name="t", rate_limit="1/s", rate_limit_key_header="")(lambda: None)


def test_gcra_allows_the_burst_then_one_per_interval() -> None:
    tat = None
    for _ in range(3):
        tat, d = gcra(tat, 100.0, 3, 1.0)
        assert d.allowed
    new, d = gcra(tat, 100.0, 3, 1.0)
    assert new is None and not d.allowed and abs(d.retry_after - 1 / 3) < 1e-9
    new, d = gcra(tat, 100.0, 3, 1.0, max_wait=1.0)
    assert new is not None and d.reserved and abs(d.retry_after - 1 / 3) < 1e-9


# -- the worker ---------------------------------------------------------------------


async def _statuses_seen(app: stem.Stem, ids: list[str], state: TaskState,
                         seen: dict[str, Any]) -> bool:
    for tid in ids:
        r = await app.get_result(tid)
        if r is not None and r.state is state:
            seen[tid] = r
    return len(seen) == len(ids)


async def test_a_denied_delivery_is_rescheduled_same_attempt_then_runs(app: stem.Stem) -> None:
    ran: list[tuple[str, float, int]] = []

    @app.task(name="ping", rate_limit="2/s", max_retries=0)
    async def ping(ctx: stem.TaskContext) -> str:
        ran.append((ctx.id, time.monotonic(), ctx.attempt))
        return "pong"

    async with running_worker(app) as worker:
        ids = [await ping.enqueue() for _ in range(4)]
        # Two pass at once; the other two are re-scheduled to their own slots.
        retried: dict[str, Any] = {}
        await eventually(lambda: _any_retried(app, ids, retried), timeout=5)
        results = [await app.wait(i, timeout=10) for i in ids]
    assert all(r.state is TaskState.SUCCEEDED and r.attempt == 0 for r in results)
    assert sorted(a for _, _, a in ran) == [0, 0, 0, 0]  # no retry used up
    status = next(iter(retried.values()))
    assert status.attempt == 0 and status.error is None
    assert status.meta["rateLimited"] is True and 0 < status.meta["retryAfterMs"] <= 1000
    assert status.meta["task"] == "ping" and "groupRateLimited" not in status.meta
    # The slot used is gone from the envelope that ran (a retry would ask again).
    assert all(META_RATE_SLOTS not in r.meta for r in results)
    # Each denied delivery reserved its slot once, in at most one call per delivery
    # (calls for deliveries started together are one batch).
    assert 1 <= worker.rate_gate.calls <= 4
    times = sorted(t for _, t, _ in ran)
    assert times[2] - times[0] >= 0.4 and times[3] - times[0] >= 0.9, times


async def _any_retried(app: stem.Stem, ids: list[str], seen: dict[str, Any]) -> bool:
    for tid in ids:
        r = await app.get_result(tid)
        if r is not None and r.state is TaskState.RETRIED:
            seen[tid] = r
    return len(seen) >= 1


async def test_prefetched_deliveries_do_not_spin_or_stampede(
        app: stem.Stem, monkeypatch: pytest.MonkeyPatch) -> None:
    # 10/s, slots reserved at most one period ahead (the horizon is shrunk to show the
    # deliveries beyond it too): 40 deliveries prefetched by one worker.
    monkeypatch.setattr(worker_ratelimit, "RESERVE_HORIZON", 0.0)
    starts: list[float] = []

    @app.task(name="limited", rate_limit="10/s")
    async def limited() -> None:
        starts.append(time.monotonic())

    for _ in range(40):
        await limited.enqueue()
    async with running_worker(app, concurrency=8, prefetch_multiplier=8) as worker:
        await eventually(lambda: _true(len(starts) == 40), timeout=15)
        calls = worker.rate_gate.calls
    starts.sort()
    # The burst of 10, then one every 0.1 s: after the burst never more than 10 in any
    # second (one extra for a reservation run a little late).
    steady = starts[10:]
    for i, t in enumerate(steady):
        assert sum(1 for u in steady[i:] if u < t + 0.999) <= 11, steady
    # Each delivery asked a few times at most: no busy loop, no herd at the window's edge.
    # (With the default horizon each asks once; here those beyond it ask again later.)
    assert calls <= 40 * 3, calls
    # And the rate held exactly: 40 at 10/s after a burst of 10 take 3 s.
    assert 2.85 < starts[-1] - starts[0] < 4.0, starts


async def test_task_limits_are_per_tenant_header(app: stem.Stem) -> None:
    @app.task(name="per_tenant", rate_limit="1/m")
    async def per_tenant() -> None: ...

    async with running_worker(app):
        ids: dict[str | None, list[str]] = {}
        for who in ("a", "b", "a", None):
            call = per_tenant.call()
            if who is not None:
                call = call.with_options(headers={"tenant": who})
            ids.setdefault(who, []).append(await app.enqueue_call(call))
        for first in (ids["a"][0], ids["b"][0], ids[None][0]):
            assert (await app.wait(first, timeout=5)).state is TaskState.SUCCEEDED
        second_a = ids["a"][1]
        await eventually(lambda: _state_is(app, second_a, TaskState.RETRIED), timeout=5)


async def _true(value: bool) -> bool:
    return value


async def _state_is(app: stem.Stem, tid: str, state: TaskState) -> bool:
    r = await app.get_result(tid)
    return r is not None and r.state is state


async def test_group_limit_gives_each_tenant_its_own_budget(app: stem.Stem) -> None:
    @app.task(name="export", group_rate_limit="2/m")
    async def export() -> None: ...

    async with running_worker(app):
        ids: dict[str, list[str]] = {"acme": [], "globex": []}
        for tenant in ("acme", "globex") * 3:
            ids[tenant].append(await app.enqueue_call(
                export.call().with_options(headers={"tenant": tenant})))
        for tenant, tids in ids.items():
            for tid in tids[:2]:
                assert (await app.wait(tid, timeout=5)).state is TaskState.SUCCEEDED, tenant
            await eventually(lambda t=tids[2]: _state_is(app, t, TaskState.RETRIED), timeout=5)
            status = await app.get_result(tids[2])
            assert status is not None and status.attempt == 0
            assert status.meta["rateLimited"] is True
            assert status.meta["groupRateLimited"] is True
            assert status.meta["groupKey"] == tenant


async def test_a_named_group_is_shared_by_several_tasks(app: stem.Stem) -> None:
    @app.task(name="charge", group_rate_key="payments", group_rate_limit="2/m")
    async def charge() -> None: ...

    @app.task(name="refund", group_rate_key="payments", group_rate_limit="2/m")
    async def refund() -> None: ...

    async with running_worker(app):
        first = [await charge.enqueue(), await refund.enqueue()]
        for tid in first:
            assert (await app.wait(tid, timeout=5)).state is TaskState.SUCCEEDED
        third = await refund.enqueue()
        await eventually(lambda: _state_is(app, third, TaskState.RETRIED), timeout=5)
    status = await app.get_result(third)
    assert status is not None and status.meta["groupKey"] == "payments"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_an_unreachable_limiter_fails_open_or_closed(namespace: str, mode: str) -> None:
    app = stem.Stem("t", broker=f"memory://{namespace}", backend=f"memory://{namespace}",
                    rate_limit_url=f"redis://127.0.0.1:{_closed_port()}/0")

    @app.task(name="guarded", group_rate_limit="5/s", rate_limit="5/s",
              rate_limit_failure=mode)  # type: ignore[arg-type]
    async def guarded() -> str:
        return "ran"

    async with running_worker(app):
        tid = await guarded.enqueue()
        if mode == "open":
            assert (await app.wait(tid, timeout=10)).value == "ran"
        else:
            await eventually(lambda: _state_is(app, tid, TaskState.RETRIED), timeout=10)
            status = await app.get_result(tid)
            assert status is not None and status.attempt == 0
            meta = status.meta
            assert meta["rateLimiterUnavailable"] is True and meta["failureMode"] == "closed"
            assert meta["groupRateLimited"] is True and "Connection" in meta["error"]
            # It keeps waiting for the limiter rather than running.
            await asyncio.sleep(1.5)
            again = await app.get_result(tid)
            assert again is not None and again.state is TaskState.RETRIED


class _Counting:
    """A limiter that admits everything and counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def acquire(self, key: str, limit: int, period: float, *, max_wait: float = 0.0
                      ) -> RateLimitDecision:
        self.calls += 1
        return RateLimitDecision(True)

    async def acquire_many(self, key: str, limit: int, period: float, count: int, *,
                           max_wait: float = 0.0) -> list[RateLimitDecision]:
        self.calls += 1
        return [RateLimitDecision(True)] * count

    async def close(self) -> None: ...


async def test_unlimited_tasks_never_ask_the_limiter(app: stem.Stem,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    counting = _Counting()
    assert isinstance(counting, RateLimiter)
    monkeypatch.setattr(type(app), "rate_limiter", property(lambda self: counting))

    @app.task(name="free")
    async def free() -> int:
        return 1

    async with running_worker(app):
        assert (await app.wait(await free.enqueue(), timeout=5)).value == 1
    assert counting.calls == 0


async def test_limiter_calls_for_deliveries_started_together_are_batched(
        app: stem.Stem) -> None:
    @app.task(name="many", rate_limit="100000/s")
    async def many() -> None: ...

    ids = [await many.enqueue() for _ in range(100)]
    async with running_worker(app, concurrency=100) as worker:
        for tid in ids:
            assert (await app.wait(tid, timeout=10)).state is TaskState.SUCCEEDED
    # One call per key per batch started together, not one per delivery.
    assert worker.rate_gate.calls <= 20, worker.rate_gate.calls


async def test_a_call_can_set_its_own_rate_limit(app: stem.Stem) -> None:
    @app.task(name="plain")
    async def plain() -> None: ...

    with pytest.raises(stem.ConfigurationError, match="rate_limit: rate limit"):
        plain.call().with_options(rate_limit="often")
    call = plain.call().with_options(rate_limit="1/m")
    envelope = app.build_envelope(call)
    assert envelope.meta["stem.rateLimit"] == "1/m"
    async with running_worker(app):
        first, second = await app.enqueue_call(call), await app.enqueue_call(call)
        free = await plain.enqueue()  # calls without it are not limited
        assert (await app.wait(first, timeout=5)).state is TaskState.SUCCEEDED
        assert (await app.wait(free, timeout=5)).state is TaskState.SUCCEEDED
        await eventually(lambda: _state_is(app, second, TaskState.RETRIED), timeout=5)


async def test_a_rescheduled_delivery_is_signed_again(namespace: str) -> None:
    from stem.signing import SigningConfig

    app = stem.Stem("t", broker=f"memory://{namespace}", backend=f"memory://{namespace}",
                    signing=SigningConfig(keys={"k1": b"s" * 32}, active_key="k1"))

    @app.task(name="signed", rate_limit="2/s")
    async def signed() -> None: ...

    async with running_worker(app):
        ids = [await signed.enqueue() for _ in range(4)]
        # The two re-scheduled ones carry a new notBefore and slot: a stale signature
        # would dead-letter them.
        for tid in ids:
            assert (await app.wait(tid, timeout=10)).state is TaskState.SUCCEEDED
    assert await app.broker.dead_letters("default") == []
