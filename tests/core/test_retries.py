"""Retry filters, RetryPolicy, Reject, jitter, exhausted retries in the dead letters,
and the Dart Stem's meta keys for per-call limits and lineage (memory adapter)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import orjson
import pytest

import stem
from stem import ExponentialJitterRetryStrategy, Reject, RetryPolicy, TaskState
from stem.errors import ConfigurationError
from stem.retry import dart_jitter
from stem.task import META_PARENT_TASK_ID, META_RETRY_POLICY, META_ROOT_TASK_ID
from stem.worker.processor import effective_limits, meta_problem
from tests.helpers import eventually, running_worker

WIRE = Path(__file__).resolve().parents[1] / "fixtures" / "wire"
NO_WAIT = RetryPolicy(default_delay=0.0)


def make_app(namespace: str) -> stem.Stem:
    return stem.Stem("retries", broker=f"memory://{namespace}",
                     backend=f"memory://{namespace}")


class Fatal(Exception):
    stem_retryable = False


async def final(app: stem.Stem, task_id: str) -> stem.TaskResult[Any]:
    async def done() -> stem.TaskResult[Any] | None:
        s = await app.get_result(task_id)
        return s if s is not None and s.state.is_terminal else None
    return await eventually(done, timeout=10)


# -- delays ----------------------------------------------------------------------------


def test_default_jitter_is_75_to_100_percent_of_the_cap() -> None:
    s = ExponentialJitterRetryStrategy()
    random.seed(7)
    for attempt, cap in ((0, 2.0), (3, 16.0), (20, 300.0), (5000, 300.0)):
        delays = [s.next_delay(attempt, None) for _ in range(300)]
        assert all(0.75 * cap <= d <= cap for d in delays), (attempt, min(delays))
        assert min(delays) < 0.8 * cap  # it does jitter
    full = [ExponentialJitterRetryStrategy(jitter="full").next_delay(3, None)
            for _ in range(300)]
    assert all(0 <= d <= 16 for d in full) and min(full) < 4  # the whole range


def test_policy_delay_formula() -> None:
    assert RetryPolicy(default_delay=3).next_delay(5) == 3  # no backoff: the default delay
    backoff = RetryPolicy(default_delay=1, backoff=True, backoff_max=10)
    assert [backoff.next_delay(n) for n in range(5)] == [1, 2, 4, 8, 10]
    jittered = RetryPolicy(default_delay=1, backoff=True, backoff_max=10, jitter=True)
    assert all(7.5 <= jittered.next_delay(4) <= 10 for _ in range(200))
    assert dart_jitter(0.0) == 0.0


def test_policy_meta_round_trip_and_checks() -> None:
    p = RetryPolicy(max_retries=3, default_delay=0.5, backoff=True, backoff_max=60,
                    jitter=False, auto_retry_for=("TimeoutError",),
                    dont_auto_retry_for=("ValueError",))
    meta = p.to_meta()
    assert meta == {"backoff": True, "jitter": False, "defaultDelayMs": 500,
                    "backoffMaxMs": 60000, "maxRetries": 3,
                    "autoRetryFor": ["TimeoutError"], "dontAutoRetryFor": ["ValueError"]}
    assert RetryPolicy.from_meta(meta) == p
    dart = orjson.loads((WIRE / "envelope_dart_utc_micros.json").read_bytes())
    read = RetryPolicy.from_meta(dart["meta"]["stem.retryPolicy"])
    assert (read.backoff, read.backoff_max, read.default_delay, read.max_retries) == \
        (True, 60.0, 0.5, 3)
    assert read.auto_retry_for == ("TimeoutException",)
    for bad in ("x", {"maxRetries": -1}, {"defaultDelayMs": "5"}, {"autoRetryFor": "E"}):
        assert meta_problem({META_RETRY_POLICY: bad}) is not None
    with pytest.raises(ConfigurationError):
        RetryPolicy(max_retries=-1)
    with pytest.raises(ConfigurationError):
        RetryPolicy(auto_retry_for="OSError")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        stem.TaskOptions(autoretry_for=("OSError",))  # type: ignore[arg-type]


def test_policy_filters_by_name_deny_wins() -> None:
    p = RetryPolicy(auto_retry_for=("OSError",), dont_auto_retry_for=("ConnectionResetError",))
    assert p.retries(ConnectionError())  # a base class's name counts
    assert not p.retries(ConnectionResetError())
    assert not p.retries(ValueError())
    assert RetryPolicy().retries(ValueError())  # no allow list: everything


# -- the worker ------------------------------------------------------------------------


async def test_autoretry_for_and_deny_list(namespace: str) -> None:
    app = make_app(namespace)
    calls: dict[str, int] = {}

    @app.task(name="r.io", max_retries=2, autoretry_for=(OSError,),
              dont_autoretry_for=(FileNotFoundError,), retry_policy=NO_WAIT)
    async def io(kind: str) -> str:
        calls[kind] = calls.get(kind, 0) + 1
        if kind == "io":
            raise ConnectionError("flaky")
        if kind == "missing":
            raise FileNotFoundError("gone")
        raise ValueError("bad input")

    async with running_worker(app):
        ids = {k: await io.enqueue(k) for k in ("io", "missing", "value")}
        statuses = {k: await final(app, i) for k, i in ids.items()}
    assert calls == {"io": 3, "missing": 1, "value": 1}
    assert all(s.state is TaskState.FAILED for s in statuses.values())
    # Out of retries: dead-lettered; filtered out: failed and acked.
    dead = await app.broker.dead_letters("default")
    assert [d.id for d in dead] == [ids["io"]]
    assert dead[0].reason == "max-retries-exhausted"
    assert dead[0].meta["error"] == "ConnectionError: flaky"
    assert statuses["io"].meta["deadLetterReason"] == "max-retries-exhausted: ConnectionError: flaky"
    assert statuses["missing"].error is not None
    assert statuses["missing"].error.retryable is False
    await app.close()


async def test_no_filters_retry_everything_and_policy_meta_wins(namespace: str) -> None:
    app = make_app(namespace)
    attempts: list[int] = []

    @app.task(name="r.any", max_retries=1, retry_policy=RetryPolicy(
        max_retries=1, default_delay=0, dont_auto_retry_for=("KeyError",)))
    async def anything(ctx: stem.TaskContext) -> str:
        attempts.append(ctx.attempt)
        if ctx.attempt < 2:
            raise KeyError("k")
        return "done"

    async with running_worker(app):
        # The task's policy refuses KeyError...
        refused = await anything.enqueue()
        assert (await final(app, refused)).state is TaskState.FAILED
        assert attempts == [0]
        # ...a call's policy (meta stem.retryPolicy) replaces it: 2 retries, no filter.
        call = anything.call().with_options(retry_policy=RetryPolicy(max_retries=2))
        env = app.build_envelope(call)
        assert env.meta[META_RETRY_POLICY]["maxRetries"] == 2
        ok = await app.enqueue_call(call)
        status = await final(app, ok)
    assert status.state is TaskState.SUCCEEDED and attempts == [0, 0, 1, 2]
    await app.close()


async def test_reject_and_non_retryable_errors(namespace: str) -> None:
    app = make_app(namespace)
    runs: list[str] = []

    @app.task(name="r.rej", max_retries=5, retry_policy=NO_WAIT)
    async def rej(mode: str) -> None:
        runs.append(mode)
        if mode == "dead":
            raise Reject("customer deleted", dead_letter=True)
        if mode == "ack":
            raise Reject("nothing to do")
        if mode == "fatal":
            raise Fatal("no point")
        raise stem.NonRetryableError("also no point")

    async with running_worker(app):
        ids = {m: await rej.enqueue(m) for m in ("dead", "ack", "fatal", "sub")}
        statuses = {m: await final(app, i) for m, i in ids.items()}
        await eventually(lambda: _dead_count(app, 1), timeout=10)
    assert sorted(runs) == ["ack", "dead", "fatal", "sub"]  # one attempt each
    assert all(s.state is TaskState.FAILED for s in statuses.values())
    assert statuses["dead"].error is not None and statuses["dead"].error.type == "Reject"
    [dead] = await app.broker.dead_letters("default")
    assert (dead.id, dead.reason) == (ids["dead"], "customer deleted")
    stats = await app.broker.stats("default")
    assert (stats.pending, stats.in_flight, stats.dead) == (0, 0, 1)
    await app.close()


async def _dead_count(app: stem.Stem, n: int) -> bool:
    return (await app.broker.stats("default")).dead == n


async def test_exhausted_task_is_replayed_and_succeeds(namespace: str) -> None:
    app = make_app(namespace)
    broken = {"yes": True}

    @app.task(name="r.flaky", max_retries=1, retry_policy=NO_WAIT)
    async def flaky(n: int) -> int:
        if broken["yes"]:
            raise RuntimeError(f"down {n}")
        return n * 2

    async with running_worker(app):
        task_id = await flaky.enqueue(21)
        status = await final(app, task_id)
        assert status.state is TaskState.FAILED and status.attempt == 1
        [dead] = await eventually(lambda: app.broker.dead_letters("default"), timeout=10)
        assert dead.id == task_id
        assert (dead.reason, dead.meta["error"]) == ("max-retries-exhausted",
                                                     "RuntimeError: down 21")
        broken["yes"] = False
        assert await app.broker.replay_dead_letters("default", ids=[task_id]) == 1
        result = await eventually(lambda: _succeeded(app, task_id), timeout=10)
    assert result.value == 42 and result.attempt == 0  # a replay starts at attempt 0
    assert await app.broker.dead_letters("default") == []
    await app.close()


async def _succeeded(app: stem.Stem, task_id: str) -> stem.TaskResult[Any] | None:
    s = await app.get_result(task_id)
    return s if s is not None and s.state is TaskState.SUCCEEDED else None


async def test_explicit_retry_is_not_filtered_and_can_carry_a_policy(namespace: str) -> None:
    app = make_app(namespace)
    seen: list[Any] = []

    @app.task(name="r.explicit", autoretry_for=(KeyError,))
    async def explicit(ctx: stem.TaskContext) -> str:
        seen.append(ctx.envelope.meta.get(META_RETRY_POLICY))
        if ctx.attempt == 0:
            raise stem.Retry(countdown=0, max_retries=3,
                             retry_policy=RetryPolicy(default_delay=0), time_limit=9)
        if ctx.attempt == 1:
            assert ctx.envelope.meta["stem.timeLimitMs"] == 9000
            raise ValueError("policy retries it")
        return "ok"

    async with running_worker(app):
        status = await final(app, await explicit.enqueue())
    assert status.state is TaskState.FAILED  # ValueError is not in autoretry_for
    assert seen[0] is None and seen[1] == {"backoff": False, "jitter": False,
                                           "defaultDelayMs": 0}
    await app.close()


# -- Dart meta keys ----------------------------------------------------------------------


def test_per_call_limits_read_from_both_key_sets(namespace: str) -> None:
    app = make_app(namespace)

    @app.task(name="r.lim", time_limit=60, soft_time_limit=50)
    async def lim() -> None: ...

    env = app.build_envelope(lim.call().with_options(time_limit=2.5, soft_time_limit=0.0004))
    assert env.meta["stem.timeLimitMs"] == 2500 and env.meta["stem.softTimeLimitMs"] == 1
    assert "timeLimit" not in env.meta
    assert effective_limits(env, lim) == (0.001, 2.5)
    old = env.copy(meta={"timeLimit": 7, "softTimeLimit": 3})
    assert effective_limits(old, lim) == (3.0, 7.0)
    both = env.copy(meta={"timeLimit": 7, "stem.timeLimitMs": 1000})
    assert effective_limits(both, lim) == (50.0, 1.0)  # the Dart key wins
    assert effective_limits(env.copy(meta={}), lim) == (50.0, 60.0)
    assert meta_problem({"stem.timeLimitMs": 0}) is not None
    assert meta_problem({"stem.softTimeLimitMs": "5"}) is not None


async def test_dart_envelope_with_limits_in_ms_is_honoured(namespace: str) -> None:
    app = make_app(namespace)
    seen: dict[str, Any] = {}

    @app.task(name="reports.slow")
    async def slow(ctx: stem.TaskContext, day: str) -> None:
        seen["parent"], seen["root"] = ctx.parent_id, ctx.root_id
        await asyncio.Event().wait()  # never set: only the limits in the meta end it

    raw = (WIRE / "envelope_dart_limits_lineage.json").read_bytes()
    async with running_worker(app):
        await app.broker.publish_raw("default", raw)
        status = await final(app, "019610a2-5b7e-7c3d-9e21-4b5f6a7b8c77")
    assert status.state is TaskState.FAILED
    # The soft limit (150 ms) fires first, then nothing retries it.
    assert status.error is not None and status.error.type == "SoftTimeLimitExceeded"
    assert seen == {"parent": "019610a2-5b7e-7c3d-9e21-4b5f6a7b8c70",
                    "root": "019610a2-5b7e-7c3d-9e21-4b5f6a7b8c6f"}
    assert status.meta["stem.task"] == "reports.slow" and status.meta["stem.queue"] == "default"
    # Its policy says no retries: out of retries at once, so in the dead letters.
    [dead] = await app.broker.dead_letters("default")
    assert dead.reason == "max-retries-exhausted"
    assert dead.meta["error"].startswith("SoftTimeLimitExceeded")
    await app.close()


async def test_children_carry_dart_lineage_and_old_headers_are_read(namespace: str) -> None:
    app = make_app(namespace)
    envelopes: list[stem.Envelope] = []

    @app.task(name="r.child")
    async def child(ctx: stem.TaskContext) -> str:
        envelopes.append(ctx.envelope)
        return ctx.root_id

    @app.task(name="r.parent")
    async def parent(ctx: stem.TaskContext) -> str:
        return await ctx.enqueue(child)

    async with running_worker(app):
        parent_id = await parent.enqueue()
        child_id = (await final(app, parent_id)).value
        assert (await final(app, child_id)).value == parent_id
        # An envelope from an older release: lineage in headers.
        old = await app.enqueue("r.child", headers={"stem-parent-id": "p0",
                                                    "stem-root-id": "root0"})
        assert (await final(app, old)).value == "root0"
    assert envelopes[0].meta[META_PARENT_TASK_ID] == parent_id
    assert envelopes[0].meta[META_ROOT_TASK_ID] == parent_id
    assert envelopes[0].headers["stem-parent-id"] == parent_id  # for older workers too
    await app.close()
