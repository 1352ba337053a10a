"""The ResultBackend contract (:class:`stem.ports.ResultBackend`) as a test class any
adapter can run: subclass :class:`BackendConformance` and give it a
``backend_factory`` fixture (see :mod:`stem.testing.conformance.broker` and
docs/conformance.md)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from stem.ports import DEFAULT_RESULT_TTL, ResultBackend
from stem.status import TaskError, TaskState, TaskStatus
from stem.testing import eventually

__all__ = ["BackendConformance", "BackendFactory"]

#: Builds the result backend under test (or an awaitable of it), on storage no other
#: test uses.
BackendFactory = Callable[[], ResultBackend | Awaitable[ResultBackend]]


def status(task_id: str, state: TaskState = TaskState.SUCCEEDED, **kw: object) -> TaskStatus:
    return TaskStatus(id=task_id, state=state, **kw)  # type: ignore[arg-type]


class BackendConformance:
    """The checks every :class:`stem.ports.ResultBackend` passes (Stem's four adapters do).

    A subclass provides the ``backend_factory`` fixture (:data:`BackendFactory`); each
    test builds one backend with it and closes it at the end.
    """

    pytestmark = [pytest.mark.asyncio]

    @pytest_asyncio.fixture
    async def backend(self, backend_factory: BackendFactory) -> AsyncIterator[ResultBackend]:
        """The result backend under test, closed after the test."""
        made = backend_factory()
        b = await made if inspect.isawaitable(made) else made
        try:
            yield b
        finally:
            await b.close()

    async def test_set_get_and_get_many(self, backend: ResultBackend) -> None:
        a = status("a", payload={"v": 1}, attempt=2)
        b = status("b", TaskState.RUNNING, meta={"progress": {"percent": 50.0, "data": None}})
        await backend.set_many([(a, None), (b, 60)])
        assert await backend.get("a") == a
        assert await backend.get("b") == b
        assert await backend.get("missing") is None
        assert await backend.get_many(["a", "missing", "b"]) == {"a": a, "b": b}
        assert await backend.get_many([]) == {}


    async def test_overwrite_keeps_the_latest(self, backend: ResultBackend) -> None:
        await backend.set_many([(status("x", TaskState.QUEUED), None)])
        await backend.set_many([(status("x", TaskState.RUNNING), None)])
        final = status("x", TaskState.FAILED, error=TaskError("ValueError", "bad", "tb", False))
        await backend.set_many([(final, None)])
        assert await backend.get("x") == final


    async def test_unknown_keys_round_trip(self, backend: ResultBackend) -> None:
        s = status(
            "dart",
            payload=[1, "two", None],
            error=TaskError("E", "m", retryable=True, extra={"code": 7}),
            meta={"__stemResultEncoder": "json", "nested": {"a": [1]}},
            extra={"dartOnlyKey": {"x": 1}, "another": "y"},
        )
        await backend.set_many([(s, None)])
        got = await backend.get("dart")
        assert got == s
        assert got is not None and got.to_dict() == s.to_dict()


    async def test_add_many_writes_only_new_ids(self, backend: ResultBackend) -> None:
        await backend.set_many([(status("old", TaskState.RUNNING), None)])
        added = await backend.add_many([
            (status("old", TaskState.QUEUED), None),
            (status("new", TaskState.QUEUED), 60),
            (status("new", TaskState.FAILED), 60),  # a repeated id keeps its first status
        ])
        assert added == {"new"}
        old, new = await backend.get("old"), await backend.get("new")
        assert old is not None and old.state is TaskState.RUNNING
        assert new is not None and new.state is TaskState.QUEUED
        assert await backend.add_many([]) == set()

    async def test_add_many_treats_an_expired_status_as_absent(self, backend: ResultBackend
                                                                 ) -> None:
        await backend.set_many([(status("gone", TaskState.SUCCEEDED), 0.2)])

        async def expired() -> bool:
            return await backend.get("gone") is None

        await eventually(expired, timeout=5)
        assert await backend.add_many([(status("gone", TaskState.QUEUED), 60)]) == {"gone"}

    async def test_add_many_is_atomic_per_id_under_concurrency(self, backend: ResultBackend
                                                                ) -> None:
        # Eight producers race for the same ten ids: each id is won exactly once.
        ids = [f"race-{i}" for i in range(10)]
        results = await asyncio.gather(*(
            backend.add_many([(status(i, TaskState.QUEUED, meta={"by": n}), None) for i in ids])
            for n in range(8)))
        won = [task_id for r in results for task_id in r]
        assert sorted(won) == sorted(ids)

    async def test_forget_many_deletes(self, backend: ResultBackend) -> None:
        await backend.set_many([(status("f1"), None), (status("f2"), None), (status("keep"), None)])
        await backend.forget_many(["f1", "f2", "never-existed"])
        assert set(await backend.get_many(["f1", "f2", "keep"])) == {"keep"}
        await backend.forget_many([])

    async def test_ttl_expiry(self, backend: ResultBackend) -> None:
        await backend.set_many([(status("short"), 0.3), (status("long"), 60)])
        assert await backend.get("short") is not None

        async def gone() -> bool:
            return await backend.get("short") is None

        await eventually(gone, timeout=5)
        assert set(await backend.get_many(["short", "long"])) == {"long"}


    async def test_default_ttl_applies_when_none_given(self, backend: ResultBackend) -> None:
        assert backend.default_ttl == DEFAULT_RESULT_TTL
        backend.default_ttl = 0.3
        await backend.set_many([(status("d"), None), (status("explicit"), 60)])
        assert await backend.get("d") is not None

        async def gone() -> bool:
            return await backend.get("d") is None

        await eventually(gone, timeout=5)
        assert await backend.get("explicit") is not None


    async def test_wait_returns_promptly_when_another_task_finishes(self, backend: ResultBackend) -> None:
        final = status("w", payload=42)
        set_at: list[float] = []

        async def finish_later() -> None:
            await asyncio.sleep(0.2)  # the waiter must be waiting by then: that's the case under test
            await backend.set_many([(status("w", TaskState.RUNNING), None)])
            set_at.append(time.monotonic())
            await backend.set_many([(final, None)])

        finisher = asyncio.create_task(finish_later())
        start = time.monotonic()
        got = await backend.wait("w", timeout=5)
        returned = time.monotonic()
        await finisher
        assert got == final
        assert returned - set_at[0] < 0.5
        assert returned - start < 1.5


    async def test_wait_without_timeout_returns_once_terminal(self, backend: ResultBackend) -> None:
        waiter = asyncio.create_task(backend.wait("nt", timeout=None))
        await backend.set_many([(status("nt", TaskState.CANCELLED), None)])
        got = await asyncio.wait_for(waiter, 5)
        assert got is not None and got.state is TaskState.CANCELLED


    async def test_wait_returns_none_on_timeout(self, backend: ResultBackend) -> None:
        start = time.monotonic()
        assert await backend.wait("never", timeout=0.3) is None
        assert 0.25 <= time.monotonic() - start < 2.0


    async def test_wait_returns_at_once_when_already_terminal(self, backend: ResultBackend) -> None:
        done = status("done", TaskState.FAILED, error=TaskError("E", "boom"))
        await backend.set_many([(done, None)])
        start = time.monotonic()
        assert await backend.wait("done", timeout=5) == done
        assert time.monotonic() - start < 0.3


    async def test_non_terminal_states_do_not_end_wait(self, backend: ResultBackend) -> None:
        waiter = asyncio.create_task(backend.wait("nt2", timeout=10))
        for state in (TaskState.QUEUED, TaskState.RUNNING, TaskState.RETRIED):
            await backend.set_many([(status("nt2", state), None)])
        # Give the waiter time to see those writes: staying asleep is what's under test.
        await asyncio.sleep(0.3)
        assert not waiter.done()
        await backend.set_many([(status("nt2", TaskState.SUCCEEDED, payload="ok"), None)])
        got = await asyncio.wait_for(waiter, 5)
        assert got is not None and got.state is TaskState.SUCCEEDED and got.payload == "ok"


    async def test_many_concurrent_waits(self, backend: ResultBackend) -> None:
        ids = [f"m{i}" for i in range(50)]
        waiters = [asyncio.create_task(backend.wait(i, timeout=10)) for i in ids]
        await backend.set_many([(status(i, payload=n), None) for n, i in enumerate(ids)])
        got = await asyncio.wait_for(asyncio.gather(*waiters), 5)
        assert [s.payload if s else None for s in got] == list(range(50))


    async def test_ping(self, backend: ResultBackend) -> None:
        await backend.ping()


    async def test_append_meta_appends_and_keeps_the_rest(self, backend: ResultBackend
                                                          ) -> None:
        # Shapes a careless JSON round trip breaks: empty objects and lists, long
        # numbers, unknown keys (the Dart Stem's), unicode.
        original = status(
            "app", TaskState.RUNNING, payload={"n": 12345678901234567, "x": 0.1, "e": {}},
            error=TaskError("E", "m", extra={"code": 7}), attempt=3,
            meta={"progress": {"percent": 50.0}, "empty": {}, "none": [], "note": "é✓"},
            extra={"dartOnlyKey": {"x": 1}})
        await backend.set_many([(original, 60)])
        first = {"taskId": "d1", "headers": {}, "meta": {"k": [1, {}]}}
        second = {"taskId": "d2", "headers": {"h": "v"}, "meta": {}}
        assert await backend.append_meta("app", "dups", first) is True
        assert await backend.append_meta("app", "dups", second) is True
        got = await backend.get("app")
        assert got is not None
        expected = original.to_dict()
        expected["meta"] = {**original.meta, "dups": [first, second]}
        assert got.to_dict() == expected

    async def test_append_meta_is_capped_and_replaces_a_non_list(self, backend: ResultBackend
                                                                  ) -> None:
        await backend.set_many([(status("cap", TaskState.QUEUED, meta={"dups": "odd"}), None)])
        for n in range(5):
            assert await backend.append_meta("cap", "dups", {"n": n}, max_items=3)
        got = await backend.get("cap")
        assert got is not None and got.meta["dups"] == [{"n": 2}, {"n": 3}, {"n": 4}]
        assert got.state is TaskState.QUEUED
        with pytest.raises(ValueError):
            await backend.append_meta("cap", "dups", {"n": 9}, max_items=0)

    async def test_append_meta_on_a_missing_or_expired_status(self, backend: ResultBackend
                                                             ) -> None:
        assert await backend.append_meta("nobody", "dups", {"n": 1}) is False
        assert await backend.get("nobody") is None  # nothing was created
        await backend.set_many([(status("brief", TaskState.QUEUED), 0.5)])
        assert await backend.append_meta("brief", "dups", {"n": 1}) is True

        async def expired() -> bool:  # the append kept the short TTL
            return await backend.get("brief") is None

        await eventually(expired, timeout=5)
        assert await backend.append_meta("brief", "dups", {"n": 2}) is False

    async def test_concurrent_appends_are_all_kept(self, backend: ResultBackend) -> None:
        await backend.set_many([(status("busy", TaskState.QUEUED), None)])
        done = await asyncio.gather(*(backend.append_meta("busy", "dups", {"n": n})
                                      for n in range(20)))
        assert all(done)
        got = await backend.get("busy")
        assert got is not None
        assert sorted(d["n"] for d in got.meta["dups"]) == list(range(20))

    async def test_append_meta_never_brings_back_an_older_state(self, backend: ResultBackend
                                                                ) -> None:
        # A worker finishing the task while appends run: whichever order they land in,
        # the status ends succeeded (a read-then-write append could restore "queued").
        await backend.set_many([(status("fin", TaskState.QUEUED), None)])
        final = status("fin", TaskState.SUCCEEDED, payload="ok")
        appends = [backend.append_meta("fin", "dups", {"n": n}) for n in range(10)]
        await asyncio.gather(*appends[:5], backend.set_many([(final, None)]), *appends[5:])
        got = await backend.get("fin")
        assert got is not None and got.state is TaskState.SUCCEEDED and got.payload == "ok"
