"""The control plane: commands broadcast to workers and their replies.

Messages travel on the broker store's :class:`~stem.ports.ControlChannel`, a log that
every worker reads (real fan-out on every broker). A command is the Dart Stem's
control payload, ``{"kind": "command", "requestId", "type", "targets": ["*"] | [worker
ids], "payload": {...}, "timeoutMs", "namespace"}``; a reply is ``{"kind": "reply",
"requestId", "workerId", "status": "ok" | "error", "payload": {...}, "error"?}``. When
payload signing is configured (:mod:`stem.signing`), commands carry ``signature`` and
``signatureKey`` over their canonical JSON, and workers ignore commands whose signature
does not verify (replying with an error).

:class:`ControlClient` sends one command and collects replies until every targeted
worker answered (for a broadcast: every worker with a live heartbeat) or the timeout.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stem.errors import ConfigurationError
from stem.log import get_logger
from stem.ports import ControlChannel, HeartbeatStore
from stem.revoke import QUEUE_PAUSE_PREFIX, RevokeEntry, default_requester, new_version

if TYPE_CHECKING:
    from stem.app import Stem
    from stem.signing import PayloadSigner

log = get_logger(__name__)

#: Seconds a caller waits for replies unless told (``STEM_CONTROL_TIMEOUT``).
DEFAULT_TIMEOUT = 5.0
#: Seconds between two heartbeats of a worker unless told (``STEM_HEARTBEAT_INTERVAL``).
DEFAULT_HEARTBEAT_INTERVAL = 10.0
#: The commands workers understand.
COMMANDS = ("ping", "stats", "inspect", "revoke", "queue_pause", "queue_resume",
            "queue_status", "shutdown")
SHUTDOWN_MODES = {"warm": "warm", "graceful": "warm", "soft": "soft", "hard": "hard",
                  "force": "hard"}


def store_part(store: object, name: str) -> Any:
    """``store.<name>`` (``control``, ``heartbeats``), or None when the store has no such
    part (an adapter object, or an outside store that predates it)."""
    try:
        return getattr(store, name, None)
    except NotImplementedError:
        return None


def heartbeat_interval() -> float:
    """``STEM_HEARTBEAT_INTERVAL`` (seconds, > 0), else 10."""
    raw = os.environ.get("STEM_HEARTBEAT_INTERVAL")
    if not raw:
        return DEFAULT_HEARTBEAT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 86_400:
        raise ConfigurationError(
            f"STEM_HEARTBEAT_INTERVAL={raw!r} is not a number of seconds in (0, 86400]")
    return value


def canonical(message: dict[str, Any]) -> bytes:
    """The bytes a command's signature covers: its JSON without the signature fields,
    keys sorted, no spaces."""
    body = {k: v for k, v in message.items() if k not in ("signature", "signatureKey")}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def encode(message: dict[str, Any], signer: PayloadSigner | None = None) -> bytes:
    """A message's bytes; a command is signed when ``signer`` can sign."""
    if signer is not None and signer.can_sign and message.get("kind") == "command":
        message = {**message,
                   "signature": base64.b64encode(signer.signature(canonical(message))).decode(),
                   "signatureKey": signer.active_key}
    return json.dumps(message, separators=(",", ":"), default=str).encode()


def signature_problem(message: dict[str, Any], signer: PayloadSigner | None) -> str | None:
    """Why a command's signature is not acceptable (None: fine, or signing is off)."""
    if signer is None:
        return None
    sig, key = message.get("signature"), message.get("signatureKey")
    if not isinstance(sig, str) or not isinstance(key, str):
        return "unsigned control command"
    return signer.verify_data(canonical(message), sig, key)


def decode(raw: bytes) -> dict[str, Any] | None:
    """A message, or None for bytes that are not one."""
    try:
        msg = json.loads(raw)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


@dataclass(slots=True)
class ControlReply:
    """One worker's answer to a command."""

    worker_id: str
    status: str
    payload: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"workerId": self.worker_id, "status": self.status,
                               "payload": self.payload}
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass(slots=True)
class Heartbeat:
    """A worker's latest heartbeat as read back (``stale`` when older than 2 intervals)."""

    worker_id: str
    data: dict[str, Any]
    age: float
    stale: bool


class ControlClient:
    """Sends control commands for ``app`` and collects the replies."""

    def __init__(self, app: Stem) -> None:
        self.app = app

    @property
    def channel(self) -> ControlChannel:
        channel = store_part(self.app.broker_store, "control")
        if channel is None:
            raise ConfigurationError(
                "the control plane needs the broker as a URL or a store (its control "
                "channel); this app's broker is an adapter object")
        return channel  # type: ignore[no-any-return]

    @property
    def heartbeats(self) -> HeartbeatStore:
        for store in (self.app.backend_store, self.app.broker_store):
            beats = store_part(store, "heartbeats")
            if beats is not None:
                return beats  # type: ignore[no-any-return]
        raise ConfigurationError("worker heartbeats need the result backend as a URL or a store")

    async def workers(self) -> list[Heartbeat]:
        """The workers with a heartbeat in the store (stale ones marked)."""
        interval = heartbeat_interval()
        now = time.time()
        out = []
        for raw in await self.heartbeats.current():
            data = decode(raw)
            if data is None or not isinstance(data.get("workerId"), str):
                continue
            sent = data.get("timestampEpoch")
            age = now - sent if isinstance(sent, int | float) else 0.0
            out.append(Heartbeat(data["workerId"], data, age, age > 2 * interval))
        return sorted(out, key=lambda h: h.worker_id)

    def command(self, type_: str, payload: dict[str, Any] | None = None, *,
                targets: Sequence[str] | None = None, timeout: float = DEFAULT_TIMEOUT
                ) -> dict[str, Any]:
        """A command message (not sent)."""
        return {"kind": "command", "requestId": uuid.uuid4().hex, "type": type_,
                "targets": list(targets) if targets else ["*"], "payload": payload or {},
                "timeoutMs": round(timeout * 1000), "namespace": self.app.namespace}

    async def announce(self, type_: str, payload: dict[str, Any]) -> None:
        """Broadcast a command without waiting for replies (a revoke already stored)."""
        await self.channel.publish(encode(self.command(type_, payload), self.app.signer))

    async def send(self, type_: str, payload: dict[str, Any] | None = None, *,
                   targets: Sequence[str] | None = None, timeout: float = DEFAULT_TIMEOUT
                   ) -> list[ControlReply]:
        """Send a command and return the replies: until every targeted worker (for a
        broadcast: every worker with a fresh heartbeat) answered, or ``timeout``."""
        channel = self.channel
        expected: set[str] | None = set(targets) if targets else None
        if expected is None:
            try:
                expected = {h.worker_id for h in await self.workers() if not h.stale}
            except Exception as exc:  # no heartbeats: wait for the whole timeout
                log.debug("control.no_heartbeats", error=repr(exc))
        message = self.command(type_, payload, targets=targets, timeout=timeout)
        pos = await channel.position()
        await channel.publish(encode(message, self.app.signer))
        replies: dict[str, ControlReply] = {}
        deadline = time.monotonic() + timeout
        while True:
            if expected and expected <= replies.keys():
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            pos, raws = await channel.read(pos, min(left, 1.0))
            for raw in raws:
                msg = decode(raw)
                if (msg is None or msg.get("kind") != "reply"
                        or msg.get("requestId") != message["requestId"]):
                    continue
                worker = str(msg.get("workerId"))
                body = msg.get("payload")
                replies[worker] = ControlReply(
                    worker, str(msg.get("status")), body if isinstance(body, dict) else {},
                    msg.get("error") if isinstance(msg.get("error"), str) else None)
        return sorted(replies.values(), key=lambda r: r.worker_id)




def queue_entries(app: Stem, queues: Sequence[str], *, pause: bool,
                  reason: str | None = None, requested_by: str | None = None
                  ) -> list[RevokeEntry]:
    """The revoke-store entries that pause (or resume: expired now) ``queues``."""
    base = new_version()
    return [RevokeEntry.new(QUEUE_PAUSE_PREFIX + q, reason=reason,
                            requested_by=requested_by or default_requester(),
                            expires_in=None if pause else 0.0, namespace=app.namespace,
                            version=base + n)
            for n, q in enumerate(queues)]


async def announce_quietly(app: Stem, type_: str, payload: dict[str, Any]) -> None:
    """Broadcast a command whose effect is already stored; a failure is only logged
    (workers read the store within a second anyway)."""
    try:
        await ControlClient(app).announce(type_, payload)
    except Exception as exc:
        log.warning("control.announce_failed", command=type_, error=repr(exc))
