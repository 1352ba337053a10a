"""Task definitions: argument binding, options, retry strategy."""

from __future__ import annotations

import pytest

import stem
from stem import ConfigurationError, ExponentialJitterRetryStrategy, TaskArgumentError


def make_app() -> stem.Stem:
    return stem.Stem("t", broker="memory://unused", backend="memory://unused")


def test_positional_args_bind_to_parameter_names_without_defaults() -> None:
    app = make_app()

    @app.task(name="send")
    def send(ctx: stem.TaskContext, to: str, subject: str = "hi", *, cc: str | None = None) -> str:
        return to

    assert send.takes_context
    assert send.bind(("a@b",), {"cc": "c"}) == {"to": "a@b", "cc": "c"}
    assert send.call_arguments({"to": "a@b", "cc": "c"}) == ([], {"to": "a@b", "cc": "c"})


@pytest.mark.parametrize("args,kwargs", [((), {}), (("a", "b", "c"), {}), ((), {"nope": 1})])
def test_wrong_arguments_raise_at_bind_time(args: tuple[object, ...], kwargs: dict[str, object]) -> None:
    app = make_app()

    @app.task(name="send")
    def send(to: str, subject: str = "hi") -> None: ...

    with pytest.raises(TaskArgumentError, match="send"):
        send.bind(args, kwargs)


def test_var_positional_and_var_keyword_round_trip() -> None:
    app = make_app()

    @app.task(name="v")
    def v(a: int, /, *rest: int, **extra: int) -> None: ...

    data = v.bind((1, 2, 3), {"x": 4})
    assert data == {"a": 1, "rest": [2, 3], "x": 4}
    assert v.call_arguments(data) == ([1, 2, 3], {"x": 4})


def test_default_isolation_and_names() -> None:
    app = make_app()

    @app.task
    async def a() -> None: ...

    @app.task
    def b() -> None: ...

    @app.task(time_limit=2)
    def c() -> None: ...

    assert a.name == f"{__name__}.test_default_isolation_and_names.<locals>.a"
    assert (a.effective_isolation, b.effective_isolation, c.effective_isolation) == (
        "inline", "thread", "process")


@pytest.mark.parametrize("pool_default", [False, True])
@pytest.mark.parametrize("hard", [None, 2.0])
def test_one_isolation_rule_for_the_worker_and_tasks_ls(hard: float | None,
                                                       pool_default: bool) -> None:
    """stem.task.isolation_for is the rule; effective_isolation and the executor use it."""
    from stem.task import isolation_for
    from stem.worker.executor import Executor

    app = make_app()

    @app.task
    async def coro() -> None: ...

    @app.task
    def sync() -> None: ...

    @app.task(isolation="process")
    async def coro_process() -> None: ...

    @app.task(isolation="thread")
    def sync_thread() -> None: ...

    @app.task(isolation="inline")
    def sync_inline() -> None: ...

    expected = {
        # async def: inline whatever the limit or pool (cancellation stops it).
        coro: "inline",
        # def: a thread, unless a hard limit (threads can't be killed) or --pool.
        sync: "process" if hard is not None or pool_default else "thread",
        # explicit isolation always wins.
        coro_process: "process",
        sync_thread: "thread",
        sync_inline: "inline",
    }
    executor = Executor(threads=1, app=app, pool_default=pool_default)
    for definition, where in expected.items():
        assert isolation_for(definition, hard, pool_default) == where, definition.name
        assert executor.isolation_for(definition, hard) == where, definition.name


def test_effective_isolation_is_the_rule_for_a_worker_without_pool() -> None:
    from stem.task import isolation_for

    app = make_app()

    @app.task(time_limit=3)
    def limited() -> None: ...

    @app.task
    def plain() -> None: ...

    for d in (limited, plain):
        assert d.effective_isolation == isolation_for(d, d.options.time_limit, False)
    assert (limited.effective_isolation, plain.effective_isolation) == ("process", "thread")


def test_async_handler_cannot_ask_for_a_thread() -> None:
    app = make_app()
    with pytest.raises(ConfigurationError, match="async handlers run inline or in the process"):
        @app.task(isolation="thread")
        async def nope() -> None: ...


def test_invalid_options_are_configuration_errors() -> None:
    app = make_app()
    with pytest.raises(ConfigurationError):
        app.task(priority=10)
    with pytest.raises(ConfigurationError):
        app.task(isolation="fork")  # type: ignore[arg-type]


def test_exponential_jitter_bounds() -> None:
    s = ExponentialJitterRetryStrategy(base=2, max_delay=300)
    for attempt in range(12):
        for _ in range(50):
            assert 0 <= s.next_delay(attempt, None) <= min(300, 2 * 2**attempt)
    assert ExponentialJitterRetryStrategy(base=1, jitter=False).next_delay(3, None) == 8


def test_call_builder_reaches_the_envelope() -> None:
    app = make_app()

    @app.task(name="send", queue="emails", priority=1, max_retries=2)
    def send(to: str) -> None: ...

    call = send.call("x").with_options(priority=9, queue="urgent", headers={"h": "1"},
                                       meta={"m": 2}, time_limit=5, countdown=10, max_retries=4)
    env = app.build_envelope(call)
    assert (env.queue, env.priority, env.max_retries, env.args) == ("urgent", 9, 4, {"to": "x"})
    assert env.headers["h"] == "1" and env.headers["stem-args-encoder"] == "json"
    assert env.meta["m"] == 2 and env.meta["stem.timeLimitMs"] == 5000
    assert env.not_before is not None and 9 < (env.not_before - env.enqueued_at).total_seconds() <= 10


@pytest.mark.parametrize("vt", [0, -1, 0.05, 7 * 86_400 + 1, float("nan")])
def test_visibility_timeouts_outside_the_lease_bounds_are_refused(vt: float) -> None:
    app = make_app()
    with pytest.raises(ConfigurationError, match="visibility timeout"):
        app.task(visibility_timeout=vt)

    @app.task(name="ok")
    def ok() -> None: ...

    with pytest.raises(ConfigurationError, match="visibility timeout"):
        ok.call().with_options(visibility_timeout=vt)
    # A TaskCall built directly is checked when its envelope is built.
    with pytest.raises(ConfigurationError, match="visibility timeout"):
        app.build_envelope(stem.TaskCall(ok, {}, visibility_timeout=vt))


def test_retry_budgets_outside_the_wire_range_are_refused() -> None:
    app = make_app()
    with pytest.raises(ConfigurationError, match="max_retries"):
        app.task(max_retries=-1)

    @app.task(name="ok")
    def ok() -> None: ...

    for bad in (-1, 10**7):
        with pytest.raises(ConfigurationError, match="max_retries"):
            ok.call().with_options(max_retries=bad)


def test_priority_outside_0_9_is_clamped_when_the_envelope_is_built() -> None:
    app = make_app()

    @app.task(name="ok")
    def ok() -> None: ...

    assert app.build_envelope(stem.TaskCall(ok, {}, priority=42)).priority == 9
    assert app.build_envelope(stem.TaskCall(ok, {}, priority=-4)).priority == 0


def test_a_countdown_too_large_for_a_date_is_a_configuration_error() -> None:
    app = make_app()

    @app.task(name="ok")
    def ok() -> None: ...

    with pytest.raises(ConfigurationError, match="countdown"):
        app.build_envelope(ok.call().with_options(countdown=1e300))


@pytest.mark.parametrize("attempt", [63, 1023, 1024, 1100, 10**6])
def test_the_exponential_strategy_never_overflows(attempt: int) -> None:
    for s in (ExponentialJitterRetryStrategy(), ExponentialJitterRetryStrategy(jitter=False),
              ExponentialJitterRetryStrategy(base=1e300, max_delay=1e308, jitter=False)):
        delay = s.next_delay(attempt, None)
        assert 0 <= delay <= s.max_delay


def test_retry_delays_are_clamped_into_a_documented_range() -> None:
    from stem.retry import MAX_RETRY_DELAY, clamp_delay

    assert MAX_RETRY_DELAY == 365 * 86_400
    assert clamp_delay(-5) == 0.0 and clamp_delay(12.5) == 12.5
    assert clamp_delay(1e300) == clamp_delay(float("inf")) == MAX_RETRY_DELAY
    assert clamp_delay(float("nan")) == MAX_RETRY_DELAY


@pytest.mark.parametrize("option", [{"rate_limit": "10/s"}, {"unique": True},
                                    {"unique_for": 60.0}])
def test_options_not_built_yet_are_refused_not_ignored(option: dict[str, object]) -> None:
    app = stem.Stem("t", broker="memory://opts")
    with pytest.raises(stem.ConfigurationError, match="not supported yet"):
        app.task(name="charge", **option)(lambda: None)
