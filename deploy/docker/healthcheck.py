"""Container health: exit 0 when the broker and result backend of the ``STEM_*``
environment answer a ping within ``STEM_HEALTHCHECK_TIMEOUT`` seconds (default 5),
else print why and exit 1."""

from __future__ import annotations

import asyncio
import os
import sys

import stem


async def ping() -> None:
    app = stem.Stem.from_env()
    try:
        await app.broker.ping()
        await app.backend.ping()
    finally:
        await app.close()


def main() -> int:
    try:
        asyncio.run(asyncio.wait_for(ping(), float(os.environ.get("STEM_HEALTHCHECK_TIMEOUT",
                                                                   "5"))))
    except Exception as exc:
        print(f"unhealthy: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
