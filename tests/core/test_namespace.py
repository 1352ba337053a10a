"""Issue 11, namespaces: two apps on one store never take each other's tasks.

An app's namespace is ``Stem(namespace=...)``, else ``STEM_NAMESPACE``, else derived
from its name, else ``stem`` (``Stem()``). The isolation tests run two apps that
register the same task name on the same queue of one store (memory, an SQLite file,
Redis, Postgres) and check each worker runs only its own app's tasks.
"""

from __future__ import annotations

import asyncio
import string
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import stem
from stem.adapters._shared import check_namespace
from stem.config import DEFAULT_NAMESPACE, StemConfig, namespace_from_name
from stem.errors import ConfigurationError
from tests.helpers import running_worker
from tests.services import drop_pg_schema, drop_redis_keys

NO_ENV = StemConfig.from_env({})
ENV = StemConfig.from_env({"STEM_NAMESPACE": "ops"})
URL = "memory://namespace-rules"


def ns(name: str = "stem", *, config: StemConfig = NO_ENV, **kwargs: str) -> str:
    return stem.Stem(name, broker=URL, backend=URL, config=config, **kwargs).namespace


# -- precedence: namespace= > STEM_NAMESPACE > the app's name > "stem" --------------------

def test_no_name_and_nothing_configured_is_the_dart_default() -> None:
    app = stem.Stem(broker=URL, backend=URL, config=NO_ENV)
    assert app.namespace == DEFAULT_NAMESPACE == "stem"


def test_the_name_is_the_namespace_when_nothing_is_configured() -> None:
    assert ns("billing") == "billing"
    assert NO_ENV.namespace is None  # unset, not "stem": the app can tell


def test_stem_namespace_beats_the_name() -> None:
    assert (ns("billing", config=ENV), ns(config=ENV)) == ("ops", "ops")
    assert ENV.namespace_for("billing") == ENV.namespace_for(None) == "ops"


def test_the_argument_beats_everything() -> None:
    assert ns("billing", config=ENV, namespace="tenant-7") == "tenant-7"
    assert ns("__main__", namespace="tenant-7") == "tenant-7"  # nothing to derive


def test_from_env_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEM_BROKER_URL", URL)
    monkeypatch.delenv("STEM_RESULT_BACKEND_URL", raising=False)
    monkeypatch.setenv("STEM_NAMESPACE", "from-env")
    assert stem.Stem.from_env("billing").namespace == "from-env"
    assert stem.Stem("billing").namespace == "from-env"  # no config= reads the env too
    monkeypatch.setenv("STEM_NAMESPACE", "")  # empty is unset
    assert stem.Stem.from_env("billing").namespace == "billing"
    monkeypatch.delenv("STEM_NAMESPACE")
    assert (stem.Stem.from_env().namespace, stem.Stem().namespace) == ("stem", "stem")


def test_the_default_app_without_stem_namespace_is_stem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEM_BROKER_URL", URL)
    monkeypatch.delenv("STEM_NAMESPACE", raising=False)
    stem.set_default_app(None)
    try:
        assert stem.default_app().namespace == "stem"
    finally:
        stem.set_default_app(None)


def test_a_bad_namespace_is_refused_when_the_app_is_built() -> None:
    with pytest.raises(ConfigurationError, match="namespace 'Shop' is not allowed"):
        ns("shop", namespace="Shop")
    with pytest.raises(ConfigurationError, match=r"^STEM_NAMESPACE: namespace 'a\.b'"):
        StemConfig.from_env({"STEM_NAMESPACE": "a.b"})
    with pytest.raises(ConfigurationError, match="namespace 'pg_x' is not allowed"):
        StemConfig(namespace="pg_x")


# -- deriving a namespace from an app name -------------------------------------------------

@pytest.mark.parametrize("name,namespace", [
    ("billing", "billing"),
    ("stem", "stem"),
    ("Billing API", "billing-api"),
    ("shop.tasks", "shop-tasks"),          # Stem(__name__) in a module shop/tasks.py
    ("tasks.billing_v2", "tasks-billing_v2"),
    ("Billing :: API!", "billing-api"),    # one "-" per run of other characters
    ("a - b", "a---b"),                    # "-" itself is kept
    ("__init__", "init__"),
    ("_private", "private"),
    ("billing-", "billing-"),              # already valid: used as it is
    ("Café", "caf"),
    ("PG tools", "pg-tools"),
    ("x" * 70, "x" * 63),
    ("a" * 62 + ".b", "a" * 62),           # cut to 63, then the trailing "-" dropped
])
def test_derivation(name: str, namespace: str) -> None:
    assert namespace_from_name(name) == ns(name) == namespace


@pytest.mark.parametrize("name", ["", "...", "__", "pg_stats", "日本"])
def test_a_name_that_leaves_nothing_valid_asks_for_namespace(name: str) -> None:
    with pytest.raises(ConfigurationError, match=r"gives no valid namespace.*pass namespace="):
        ns(name)


def test_main_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigurationError) as info:
        ns("__main__")
    message = str(info.value)
    assert "__name__" in message and "worker" in message
    assert "Stem('billing')" in message and "namespace=" in message


def test_a_name_that_is_not_a_string_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="app name must be a string"):
        namespace_from_name(None)  # type: ignore[arg-type]


@given(st.text(max_size=100))
def test_derivation_is_valid_or_refused(name: str) -> None:
    try:
        derived = namespace_from_name(name)
    except ConfigurationError:
        return
    assert check_namespace(derived) == derived


@given(st.text(alphabet=string.ascii_lowercase + string.digits + "_-", min_size=1, max_size=63))
def test_a_valid_namespace_as_a_name_is_kept(name: str) -> None:
    try:
        check_namespace(name)
    except ConfigurationError:
        return
    assert namespace_from_name(name) == name


# -- isolation: two apps, one store ---------------------------------------------------------

@pytest.fixture(params=["memory", "sqlite", "redis", "postgres"])
def shared_url(request: pytest.FixtureRequest, namespace: str, tmp_path: Path) -> Iterator[str]:
    """One store both apps use; what they created there is dropped afterwards."""
    if request.param == "memory":
        yield f"memory://{namespace}"
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
    elif request.param == "redis":
        url: str = request.getfixturevalue("redis_url")
        yield url
        for app in ("billing", "shipping"):
            asyncio.run(drop_redis_keys(url, f"{app}-{namespace}"))
    else:
        url = request.getfixturevalue("postgres_url")
        yield url  # no ?schema=: each app's namespace is its schema
        for app in ("billing", "shipping"):
            asyncio.run(drop_pg_schema(url, f"{app}-{namespace}"))


def make_app(name: str, url: str) -> stem.Stem:
    app = stem.Stem(name, broker=url, backend=url, config=NO_ENV)

    @app.task(name="work")
    async def work(n: int) -> str:
        return f"{name}:{n}"

    return app


@pytest.fixture
async def apps(shared_url: str, namespace: str) -> AsyncIterator[tuple[stem.Stem, stem.Stem]]:
    billing = make_app(f"billing-{namespace}", shared_url)
    shipping = make_app(f"Shipping {namespace}", shared_url)  # derived: shipping-<ns>
    yield billing, shipping
    await billing.close()
    await shipping.close()


async def test_two_apps_on_one_store_run_only_their_own_tasks(
        apps: tuple[stem.Stem, stem.Stem], namespace: str) -> None:
    billing, shipping = apps
    assert (billing.namespace, shipping.namespace) == (f"billing-{namespace}",
                                                       f"shipping-{namespace}")
    b_ids = [await billing.enqueue("work", n) for n in range(3)]
    s_ids = [await shipping.enqueue("work", n) for n in range(2)]
    assert (await billing.broker.stats("default")).pending == 3
    assert (await shipping.broker.stats("default")).pending == 2

    # Billing's worker drains billing's queue; shipping's work stays where it was.
    async with running_worker(billing):
        done = [await billing.wait(t, timeout=10) for t in b_ids]
    assert [r.value for r in done] == [f"billing-{namespace}:{n}" for n in range(3)]
    assert (await billing.broker.stats("default")).pending == 0
    shipped = await shipping.broker.stats("default")
    assert (shipped.pending, shipped.in_flight, shipped.dead) == (2, 0, 0)
    # Results are separate too: neither backend knows the other app's task ids.
    assert await shipping.get_result(b_ids[0]) is None
    assert await billing.get_result(s_ids[0]) is None

    async with running_worker(shipping):
        done = [await shipping.wait(t, timeout=10) for t in s_ids]
    assert [r.value for r in done] == [f"Shipping {namespace}:{n}" for n in range(2)]
    assert (await shipping.broker.stats("default")).pending == 0


async def test_same_namespace_means_same_queue(shared_url: str, namespace: str) -> None:
    """A producer that names the worker's namespace (or the same app name) reaches it."""
    worker_app = make_app(f"billing-{namespace}", shared_url)
    producer = stem.Stem("producer", broker=shared_url, backend=shared_url, config=NO_ENV,
                         namespace=f"billing-{namespace}")
    try:
        tid = await producer.enqueue("work", n=7)
        async with running_worker(worker_app):
            assert (await producer.wait(tid, timeout=10)).value == f"billing-{namespace}:7"
    finally:
        await producer.close()
        await worker_app.close()
