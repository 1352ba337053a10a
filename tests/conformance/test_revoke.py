"""The RevokeStore contract (stem.testing.conformance.RevokeStoreConformance) on every
adapter in ADAPTERS through ``store.revokes``, and on the file store; plus what the app
does with the revoke store URL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import stem
from stem.adapters.file_revokes import FileRevokeStore, path_from_url
from stem.config import StemConfig
from stem.ports import RevokeStore, Store
from stem.revoke import RevokeEntry
from stem.testing.conformance import RevokeStoreConformance
from stem.testing.conformance.revoke import BrokerDeleteConformance


class TestRevokeStores(RevokeStoreConformance):
    """Every check of the shared suite, once per built-in adapter."""

    @pytest.fixture
    def revoke_store_factory(self, store: Store) -> Callable[[], RevokeStore]:
        return lambda: store.revokes  # type: ignore[attr-defined,no-any-return]


class TestBrokerDelete(BrokerDeleteConformance):
    """Broker.delete on every adapter (broker_factory from conftest.py)."""


class TestFileRevokeStore(RevokeStoreConformance):
    """The same checks on the file store."""

    @pytest.fixture
    def revoke_store_factory(self, tmp_path: Path) -> Callable[[], RevokeStore]:
        return lambda: FileRevokeStore(str(tmp_path / "revokes.stem"))


def test_file_urls() -> None:
    assert path_from_url("file:///var/lib/stem/revokes") == "/var/lib/stem/revokes"
    assert path_from_url("file://revokes.stem") == "revokes.stem"
    assert path_from_url("./here.stem") == "./here.stem"
    assert path_from_url("file://") == "revokes.stem"


async def test_file_store_is_dart_ndjson(tmp_path: Path) -> None:
    path = tmp_path / "r.stem"
    store = FileRevokeStore(str(path), namespace="ns")
    await store.upsert_many([RevokeEntry.new("t1", reason="why", namespace="ns")])
    [line] = path.read_text().splitlines()
    assert '"taskId": "t1"' in line and '"namespace": "ns"' in line and '"reason": "why"' in line


async def test_app_resolves_the_revoke_store(tmp_path: Path, namespace: str) -> None:
    db = f"sqlite:///{tmp_path / 'b.db'}"
    app = stem.Stem("r", broker=db, backend=f"memory://{namespace}", namespace=namespace)
    assert type(app.revokes).__name__ == "MemoryRevokeStore"  # the backend's first
    app = stem.Stem("r", broker=db, namespace=namespace)
    assert type(app.revokes).__name__ == "SqliteRevokeStore"
    app = stem.Stem("r", broker=db, namespace=namespace,
                    config=StemConfig(broker_url=db,
                                      revoke_store_url=f"file://{tmp_path}/x.stem"))
    assert isinstance(app.revokes, FileRevokeStore)
    [entry] = await app.revoke("some-id", reason="r", expires_in=60)
    assert [e.task_id for e in await app.revokes.entries()] == ["some-id"]
    assert entry.requested_by and entry.expires_at is not None
    await app.close()
