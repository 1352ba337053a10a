"""Property: random JSON with the envelope's keys, written straight into every broker.

Each example publishes a batch of objects whose fields hold random values of random
types (and some non-objects) with ``publish_raw``, runs a worker, and checks that
every delivery got exactly one outcome — acked (success, failure), retried or
dead-lettered — that the broker agrees (nothing pending or leased, one dead letter
per reject), and that the worker then still completes a normal task.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stem
from stem import ExponentialJitterRetryStrategy, signals
from stem.envelope import Envelope
from stem.worker import Worker
from tests.conformance.conftest import ADAPTERS, adapter_url
from tests.helpers import eventually, running_worker

MISSING = object()  # a key left out of the object
UNIQUE = object()  # a fresh id, so outcomes can be told apart

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
hostile = scalars | st.lists(scalars, max_size=3) | st.dictionaries(
    st.text(max_size=6), scalars, max_size=3)
PAST = "2020-01-02T03:04:05.678Z"
COUNTS = [0, 1, 3, 1023, 1024, 1100, 2000, 999_999, 1_000_000, 1_000_001, -1]

# Plausible values per key, edges included (a whole object of random values would be
# refused at its first field and never reach the deeper paths).
plausible: dict[str, st.SearchStrategy[Any]] = {
    "id": st.just(UNIQUE),
    "name": st.sampled_from(["h.ok", "h.fail", "h.far", "h.one", "no.such.task"]),
    "args": st.sampled_from([{}, {"x": 1}, {"x": [1, 2]}, {"y": 2}]),
    "headers": st.sampled_from([{}, {"stem-args-encoder": "json"},
                                {"stem-args-encoder": "nope"}, {"a": 1}]),
    "enqueuedAt": st.sampled_from([PAST, None]),
    "notBefore": st.sampled_from([None, PAST]),
    "priority": st.integers(-100, 100),
    "attempt": st.sampled_from(COUNTS) | st.integers(-3, 2_000_000),
    "maxRetries": st.sampled_from(COUNTS) | st.integers(-3, 2_000_000),
    "visibilityTimeout": st.sampled_from(
        [None, 0, -1, 99, 100, 30_000, 604_800_000, 604_800_001, 10**13]),
    "queue": st.sampled_from(["@q", "@q", None, "elsewhere"]),  # "@q": the queue under test
    "meta": st.one_of(
        st.just({}),
        st.fixed_dictionaries({"__stemMaxRetries": st.sampled_from(COUNTS) | hostile}),
        # time limits that are refused, or too long to fire while the test runs
        st.fixed_dictionaries({"timeLimit": st.sampled_from([-1, 0, 60, 1e15, "5"])})),
}
KEYS = sorted(plausible)


@st.composite
def envelope_fields(draw: st.DrawFn) -> dict[str, Any]:
    """Plausible values for every key, then a few keys dropped or given any JSON at all."""
    obj = {key: draw(strategy) for key, strategy in plausible.items()}
    for key in draw(st.sets(st.sampled_from(KEYS), max_size=2)):
        obj[key] = MISSING
    for key in draw(st.sets(st.sampled_from(KEYS), max_size=3)):
        obj[key] = draw(hostile)
    return obj


non_objects = st.one_of(scalars, st.lists(scalars, max_size=3))
batches = st.lists(st.one_of(envelope_fields(), envelope_fields(), envelope_fields(),
                             non_objects), min_size=1, max_size=24)

TERMINAL = ("success", "failure", "rejected")


def build(batch: list[Any], queue: str, prefix: str) -> list[bytes]:
    out = []
    for i, item in enumerate(batch):
        if not isinstance(item, dict):
            out.append(orjson.dumps(item))
            continue
        obj: dict[str, Any] = {"hx": i}  # an unknown key: kept on retries and in the DLQ
        for key, value in item.items():
            if value is MISSING:
                continue
            if value is UNIQUE:
                value = f"{prefix}-{i}"
            elif value == "@q":
                value = queue
            obj[key] = value
        out.append(orjson.dumps(obj))
    return out


def make_app(url: str, namespace: str, failed_once: set[str]) -> stem.Stem:
    app = stem.Stem("hostile", broker=url, backend=url, namespace=namespace)
    no_wait = ExponentialJitterRetryStrategy(base=0.0, jitter=False)

    @app.task(name="h.ok")
    async def ok(**kwargs: Any) -> int:
        return len(kwargs)

    @app.task(name="h.one")
    async def one(x: Any) -> Any:
        return x

    @app.task(name="h.fail", retry_strategy=no_wait)
    async def fail(ctx: stem.TaskContext, **kwargs: Any) -> str:
        # Fails once per id, then succeeds: a retry that comes back ends in a success.
        if ctx.id in failed_once:
            return "second time"
        failed_once.add(ctx.id)
        raise RuntimeError("first time")

    @app.task(name="h.far")
    async def far(**kwargs: Any) -> None:
        raise stem.Retry(countdown=1e300)  # clamped to a year: retried, never seen again

    return app


class Outcomes:
    """Outcome signals of one worker, keyed by the ``hx`` index of the published object."""

    def __init__(self, worker_ref: list[Worker]) -> None:
        self.worker_ref = worker_ref
        self.by_index: dict[int, list[tuple[str, Envelope | None]]] = defaultdict(list)
        self.anonymous_rejects = 0
        self.receivers = {
            signals.task_success: self.on("success"), signals.task_failure: self.on("failure"),
            signals.task_retry: self.on("retry"), signals.task_rejected: self.on("rejected"),
        }

    def on(self, kind: str) -> Any:
        def receive(sender: object, *, envelope: Envelope | None = None, raw: bytes = b"",
                    **_: Any) -> None:
            if not self.worker_ref or sender is not self.worker_ref[0]:
                return
            index = envelope.extra.get("hx") if envelope is not None else _hx(raw)
            if isinstance(index, int) and type(index) is int:
                self.by_index[index].append((kind, envelope))
            else:
                self.anonymous_rejects += 1
        return receive

    def __enter__(self) -> Outcomes:
        for sig, receiver in self.receivers.items():
            sig.connect(receiver)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, receiver in self.receivers.items():
            sig.disconnect(receiver)


def _hx(raw: bytes) -> Any:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return data.get("hx") if isinstance(data, dict) else None


def comes_back(kind: str, env: Envelope | None, queue: str) -> bool:
    """Whether this outcome leads to another delivery in the queue under test."""
    return kind == "retry" and env is not None and env.queue == queue and env.name == "h.fail"


def finished(outcomes: Outcomes, raws: list[bytes], queue: str) -> bool:
    objects = 0
    for i, raw in enumerate(raws):
        if not raw.startswith(b"{"):
            continue
        objects += 1
        seen = outcomes.by_index.get(i)
        if not seen:
            return False
        kind, env = seen[-1]
        if comes_back(kind, env, queue):
            return False
    return outcomes.anonymous_rejects == len(raws) - objects


async def run_example(url: str, namespace: str, raws: list[bytes], queue: str) -> None:
    failed_once: set[str] = set()
    app = make_app(url, namespace, failed_once)
    worker_ref: list[Worker] = []
    try:
        for raw in raws:
            await app.broker.publish_raw(queue, raw)
        with Outcomes(worker_ref) as outcomes:
            async with running_worker(app, queues=[queue]) as worker:
                worker_ref.append(worker)
                await eventually(lambda: _true(finished(outcomes, raws, queue)), timeout=15)
                # Rejected deliveries and failures (here all out of retries) are
                # dead-lettered.
                rejects = outcomes.anonymous_rejects + sum(
                    1 for seen in outcomes.by_index.values() for k, _ in seen
                    if k in ("rejected", "failure"))
                await eventually(lambda: _settled(app, queue, rejects), timeout=15)
                # ...and the worker still serves normal work afterwards.
                call = app.definition("h.ok").call(n=1).with_options(queue=queue)
                res = await app.wait(await app.enqueue_call(call), timeout=15)
                assert res.value == 1
        for i, seen in outcomes.by_index.items():
            kinds = [k for k, _ in seen]
            # One outcome per delivery: retries that come back, then exactly one final one.
            for kind, env in seen[:-1]:
                assert comes_back(kind, env, queue), (i, kinds)
            assert kinds[-1] in TERMINAL or not comes_back(*seen[-1], queue), (i, kinds)
        stats = await app.broker.stats(queue)
        assert (stats.pending, stats.in_flight) == (0, 0)
    finally:
        await app.broker.purge(queue)
        await app.close()


async def _true(value: bool) -> bool:
    return value


async def _settled(app: stem.Stem, queue: str, rejects: int) -> bool:
    s = await app.broker.stats(queue)
    return (s.pending, s.in_flight, s.dead) == (0, 0, rejects)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_random_envelopes_each_settle_exactly_once_and_the_worker_keeps_serving(
        adapter: str, namespace: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = adapter_url(adapter, namespace, tmp_path, request)

    @settings(max_examples=30, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(batch=batches)
    def check(batch: list[Any]) -> None:
        queue = "q" + uuid.uuid4().hex[:8]
        raws = build(batch, queue, queue)
        asyncio.run(run_example(url, namespace, raws, queue))

    check()
