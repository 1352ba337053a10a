"""The process pool's wire between the worker and its children: length-prefixed orjson.

Every frame is a 4-byte big-endian length followed by one JSON object with a ``t``
(type) key. Nothing is pickled: envelopes travel with their already-encoded args,
results travel encoded by the task's payload encoder, exceptions travel as
:class:`~stem.status.TaskError` objects.

Worker → child:  ``init`` (app spec, sys.path), ``run`` (seq, envelope, soft limit),
                 ``revoke`` (seqs: give queued tasks back), ``reply`` (answer to an
                 ``enqueue``), ``stop`` (exit when idle), ``terminate`` (raise
                 SystemExit in the running task now: its hard limit).
Child → worker:  ``ready`` / ``fatal`` (after importing the app), ``done`` (seq and
                 either ``ok``+``enc`` or ``err`` [+ ``retry``]), ``revoked`` (seqs
                 given back unstarted), ``soft`` (the soft limit fired),
                 ``progress``, ``lease``, ``enqueue`` (a child task).
"""

from __future__ import annotations

import signal
from dataclasses import fields, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from stem._time import from_iso, to_iso
from stem.encoding import json_default

if TYPE_CHECKING:
    from stem.app import Stem
    from stem.task import TaskCall

HEADER = 4

#: What a signal to the whole process group brings (systemd's KillMode=control-group,
#: ``kill -TERM -PGID``, Ctrl-C): children start with these blocked, catch and drop
#: them; only the worker stops a child (``stop`` / ``terminate`` frames, SIGKILL).
GROUP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def frame(msg: dict[str, Any]) -> bytes:
    """Encode one message (raises TypeError when it is not JSON-serialisable)."""
    body = orjson.dumps(msg, default=json_default)
    return len(body).to_bytes(HEADER, "big") + body


class FrameReader:
    """Accumulates bytes and yields every complete message (no copies of whole frames)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        """Add ``data``; return the messages completed by it, in order."""
        buf = self._buf
        buf += data
        out: list[Any] = []
        off, n = 0, len(buf)
        with memoryview(buf) as view:
            while n - off >= HEADER:
                size = int.from_bytes(view[off:off + HEADER], "big")
                end = off + HEADER + size
                if end > n:
                    break
                out.append(orjson.loads(view[off + HEADER:end]))
                off = end
        if off:
            del buf[:off]
        return out


def call_to_wire(call: TaskCall[Any]) -> dict[str, Any]:
    """A TaskCall as JSON: the task name plus every option field (datetimes as ISO)."""
    out: dict[str, Any] = {"name": call.name}
    for f in fields(call):
        if f.name == "definition":
            continue
        value = getattr(call, f.name)
        out[f.name] = {"$dt": to_iso(value)} if isinstance(value, datetime) else value
    return out


def call_from_wire(app: Stem, data: dict[str, Any]) -> TaskCall[Any]:
    """Rebuild a TaskCall sent by :func:`call_to_wire`, against ``app``'s registry."""
    from stem.task import TaskCall

    data = dict(data)
    definition = app.definition(data.pop("name"))
    changes: dict[str, Any] = {
        k: (from_iso(v["$dt"]) if isinstance(v, dict) and set(v) == {"$dt"} else v)
        for k, v in data.items()
    }
    args = changes.pop("args", {})
    return replace(TaskCall(definition, args), **changes)
