"""The canvas's wire keys (envelope meta and headers) and their one shared parser.

Apart from :mod:`stem.canvas` so that the worker, which looks for these keys on every
finished task (:mod:`stem.worker.canvas_hooks`), does not import the canvas itself
until a task has follow-ups. :mod:`stem.canvas` re-exports all of them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from stem._time import from_iso

# -- wire keys (the Dart Stem's where it has one) ---------------------------------------

META_LINK = "stem.link"
META_LINK_ERROR = "stem.linkError"
META_PARENT_ID = "stem.parentTaskId"
META_ROOT_ID = "stem.rootTaskId"
META_PARENT_ATTEMPT = "stem.parentAttempt"
META_CHAIN = "stem.chain"
META_CHAIN_ID = "chainId"
META_CHAIN_INDEX = "chainIndex"
HEADER_CHAIN_ID = "stem-chain-id"
HEADER_CHAIN_INDEX = "stem-chain-index"
META_GROUP_ID = "groupId"
META_GROUP_INDEX = "stem.groupIndex"
HEADER_GROUP_ID = "stem-group-id"
META_CHORD_ID = "chordId"
META_CHORD_CALLBACK_ID = "stem.chord.callbackTaskId"
META_CHORD_CALLBACK = "stem.chord.callback"
HEADER_CHORD_ID = "stem-chord-id"
META_BATCH = "stem.batch"
META_BATCH_ID = "stem.batchId"
META_BATCH_TASK_IDS = "stem.batch.taskIds"

#: The meta keys that give a finished task follow-up work (see stem.worker.canvas_hooks).
CANVAS_META_KEYS = (META_LINK, META_LINK_ERROR, META_CHAIN, META_GROUP_INDEX)


def parse_not_before(value: Any) -> datetime | None:
    """An entry's ``notBefore`` (ISO-8601 or null)."""
    return from_iso(value) if isinstance(value, str) else None
