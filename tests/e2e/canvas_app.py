"""Tasks for the canvas process tests (``--app tests.e2e.canvas_app:app``).

The chord callback counts its runs where every worker process and the test can see
them: an INCR on Redis, a row in a side table on Postgres and SQLite (``CANVAS_SIDE_URL``,
the test's store URL; a SQLite side file next to the store).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from typing import Any

import stem
from stem.adapters.sqlite._db import path_from_url


def make_app(url: str | None = None, namespace: str | None = None) -> stem.Stem:
    app = stem.Stem("canvas-e2e", broker=url, namespace=namespace)

    @app.task(name="c.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="c.member", visibility_timeout=3)
    async def member(i: int, delay: float = 0.0) -> int:
        if delay:
            await asyncio.sleep(delay)
        return i

    @app.task(name="c.collect", visibility_timeout=3)
    async def collect(results: list[int], run: str) -> dict[str, Any]:
        await count_run(run)
        return {"n": len(results), "ordered": results == list(range(len(results)))}

    return app


async def count_run(run: str) -> None:
    url = os.environ["CANVAS_SIDE_URL"]
    ns = os.environ["STEM_NAMESPACE"]
    if url.startswith("redis"):
        import redis.asyncio as redis

        client = redis.Redis.from_url(url)
        await client.incr(f"{ns}:side:{run}")
        await client.aclose()
    elif url.startswith("postgres"):
        import asyncpg

        conn = await asyncpg.connect(url)
        await conn.execute(f'INSERT INTO "{ns}".side_effects (run) VALUES ($1)', run)
        await conn.close()
    else:
        conn = sqlite3.connect(side_path(url), timeout=30)
        with conn:
            conn.execute("INSERT INTO side_effects (run) VALUES (?)", (run,))
        conn.close()


def side_path(url: str) -> str:
    return path_from_url(url) + ".side"


app = make_app()
