"""An app for the cross-process encoder tests, run by a real ``stem worker start``.

Its registry comes from ``CROSS_AES_KEYS`` (``id:hexkey,id:hexkey``; the first key
encrypts), so the test decides which keys the worker process holds. Run as a module
(``python -m tests.encoding.cross_app <task-id>``) it is a third process that only
reads a stored result and prints its decoded value as JSON.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import orjson

import stem
from stem.encoding import AesGcmPayloadEncoder, GzipJsonPayloadEncoder, TaskPayloadEncoderRegistry


def build_registry(spec: str) -> TaskPayloadEncoderRegistry:
    """AES-GCM for args and results (keys from ``spec``), plus gzip-json registered."""
    keys = {kid: bytes.fromhex(hexkey) for kid, hexkey in
            (item.split(":", 1) for item in spec.split(","))}
    aes = AesGcmPayloadEncoder(keys, primary=next(iter(keys)))
    return TaskPayloadEncoderRegistry(args_encoder=aes, result_encoder=aes,
                                      encoders=[GzipJsonPayloadEncoder()])


app = stem.Stem("cross", encoders=build_registry(
    os.environ.get("CROSS_AES_KEYS", "unset:" + "00" * 32)))


@app.task(name="cross.invoice")
def invoice(customer: str, lines: list[dict[str, Any]]) -> dict[str, Any]:
    total = sum(line["qty"] * line["price"] for line in lines)
    return {"customer": customer, "total": total, "pid": os.getpid()}


@app.task(name="cross.numbers", result_encoder=GzipJsonPayloadEncoder())
def numbers(n: int) -> list[int]:
    return list(range(n))


async def _read(task_id: str) -> None:
    try:
        result = await app.get_result(task_id)
        assert result is not None, f"no result for {task_id}"
        sys.stdout.buffer.write(orjson.dumps({"pid": os.getpid(), "value": result.value}))
    finally:
        await app.close()


if __name__ == "__main__":
    asyncio.run(_read(sys.argv[1]))
