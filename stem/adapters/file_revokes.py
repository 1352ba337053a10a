"""The file revoke store: newline-delimited entry JSON in one file (the Dart Stem's
``file:///path`` store; ``./revokes.stem`` by default).

Every write is an exclusive ``flock`` on a ``<file>.lock`` beside it, a read of the
file, the merge (higher version wins) and an atomic rename of the new file, so
processes on one host share it safely. Reads take the shared lock. Lines that are not
entries are kept as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

from stem._time import utcnow
from stem.revoke import RevokeEntry

#: The file used by ``file://`` without a path (as in the Dart Stem).
DEFAULT_PATH = "revokes.stem"


def path_from_url(url: str) -> str:
    """The file of a ``file:///abs/path`` or ``file://relative`` URL, or a bare path."""
    if "://" not in url:
        return url or DEFAULT_PATH
    parts = urlsplit(url)
    path = unquote(parts.netloc + parts.path)
    return path or DEFAULT_PATH


class FileRevokeStore:
    """:class:`stem.ports.RevokeStore` in a file on this host."""

    def __init__(self, path: str, *, namespace: str = "stem") -> None:
        self.path = Path(path)
        self.namespace = namespace
        self._cache: tuple[tuple[int, int, int], list[RevokeEntry]] | None = None

    def __repr__(self) -> str:
        return f"FileRevokeStore({str(self.path)!r})"

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read(self) -> tuple[dict[str, RevokeEntry], list[str]]:
        entries: dict[str, RevokeEntry] = {}
        other: list[str] = []
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return entries, other
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                e = RevokeEntry.from_json(json.loads(line))
            except ValueError:
                other.append(line)
                continue
            if e.namespace != self.namespace:
                other.append(line)  # another namespace's: kept, not ours to read
                continue
            cur = entries.get(e.task_id)
            if cur is None or e.version > cur.version:
                entries[e.task_id] = e
        return entries, other

    def _write(self, entries: dict[str, RevokeEntry], other: list[str]) -> None:
        lines = other + [json.dumps(e.to_json())
                         for e in sorted(entries.values(), key=lambda e: e.version)]
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, self.path)

    def _upsert(self, new: Sequence[RevokeEntry]) -> None:
        with self._locked(True):
            entries, other = self._read()
            changed = False
            for e in new:
                cur = entries.get(e.task_id)
                if cur is None or e.version > cur.version:
                    entries[e.task_id] = e.with_namespace(self.namespace)
                    changed = True
            if changed:
                self._write(entries, other)

    def _all(self) -> list[RevokeEntry]:
        try:
            st = self.path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # a rewrite is a new inode
        except FileNotFoundError:
            return []
        if self._cache is not None and self._cache[0] == stamp:
            return self._cache[1]  # unchanged since the last read: the workers' poll
        with self._locked(False):
            entries, _ = self._read()
        out = sorted(entries.values(), key=lambda e: e.version)
        self._cache = (stamp, out)
        return out

    def _prune(self, at: datetime) -> int:
        with self._locked(True):
            entries, other = self._read()
            gone = [k for k, e in entries.items() if e.is_expired(at)]
            for k in gone:
                del entries[k]
            if gone:
                self._write(entries, other)
        return len(gone)

    async def upsert_many(self, entries: Sequence[RevokeEntry]) -> None:
        if entries:
            await asyncio.to_thread(self._upsert, list(entries))

    async def entries(self) -> list[RevokeEntry]:
        return list(await asyncio.to_thread(self._all))

    async def changed_since(self, version: int) -> list[RevokeEntry]:
        return [e for e in await asyncio.to_thread(self._all) if e.version > version]

    async def prune_expired(self, now: datetime | None = None) -> int:
        return await asyncio.to_thread(self._prune, now or utcnow())

    async def close(self) -> None:
        """Nothing stays open between calls."""
