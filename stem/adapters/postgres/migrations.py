"""Versioned schema migrations for the Postgres adapters.

Each migration is applied once per schema and recorded in ``stem_migrations``. They
run automatically on first connect and explicitly through :func:`migrate` (what
``stem migrate`` calls). Concurrent starters serialise on a transaction-scoped
advisory lock keyed by the schema name, so ten workers starting at once migrate
exactly once and none of them fails on a half-created schema.

Append new migrations to :data:`MIGRATIONS`; never edit one that has shipped.
``{s}`` in the SQL is the quoted schema name.
"""

from __future__ import annotations

from typing import Any

import asyncpg

#: (version, name, sql). Versions are consecutive integers from 1.
MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "jobs, dead letters and results",
        """
        -- fillfactor leaves room on each page so lease updates (which touch no
        -- indexed column) are HOT updates and never write index entries.
        CREATE TABLE {s}.stem_jobs (
            id           bigserial PRIMARY KEY,
            task_id      text,
            queue        text NOT NULL,
            priority     smallint NOT NULL DEFAULT 0,
            not_before   timestamptz NOT NULL DEFAULT now(),
            visibility   float8,
            attempt      integer NOT NULL DEFAULT 0,
            owner        text,
            lease        uuid,
            locked_until timestamptz,
            created_at   timestamptz NOT NULL DEFAULT now(),
            envelope     bytea NOT NULL
        ) WITH (fillfactor = 70);
        -- Serves the fetch query's WHERE queue = .. ORDER BY priority DESC, not_before, id.
        CREATE INDEX stem_jobs_fetch ON {s}.stem_jobs (queue, priority DESC, not_before, id);

        CREATE TABLE {s}.stem_dead_letters (
            id        bigserial PRIMARY KEY,
            task_id   text,
            queue     text NOT NULL,
            reason    text NOT NULL,
            attempt   integer NOT NULL DEFAULT 0,
            owner     text,
            dead_at   timestamptz NOT NULL DEFAULT now(),
            envelope  bytea NOT NULL
        );
        CREATE INDEX stem_dead_letters_queue ON {s}.stem_dead_letters (queue, id);

        CREATE TABLE {s}.stem_results (
            task_id    text PRIMARY KEY,
            state      text NOT NULL,
            status     bytea NOT NULL,
            expires_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX stem_results_expires ON {s}.stem_results (expires_at);
        """,
    ),
    (
        2,
        "delivery count, so first deliveries skip the worker's duplicate check",
        """
        ALTER TABLE {s}.stem_jobs ADD COLUMN deliveries integer NOT NULL DEFAULT 0;
        """,
    ),
    (
        3,
        "vacuum the jobs table early",
        """
        -- A queue table is rewritten all day: have autovacuum (where it is on) visit it
        -- after a few thousand dead rows, not after a fifth of the table.
        ALTER TABLE {s}.stem_jobs SET (
            autovacuum_vacuum_scale_factor = 0.0,
            autovacuum_vacuum_threshold = 5000,
            autovacuum_vacuum_cost_delay = 0
        );
        """,
    ),
    (
        4,
        "locks, schedule entries and their run history (stem beat)",
        """
        CREATE TABLE {s}.stem_locks (
            key        text PRIMARY KEY,
            owner      text NOT NULL,
            expires_at timestamptz NOT NULL
        );
        CREATE INDEX stem_locks_expires ON {s}.stem_locks (expires_at);

        -- Ids sort bytewise (COLLATE "C"), as on every other store.
        CREATE TABLE {s}.stem_schedules (
            id              text COLLATE "C" PRIMARY KEY,
            task_name       text NOT NULL,
            queue           text NOT NULL,
            spec            jsonb NOT NULL,
            args            jsonb NOT NULL,
            kwargs          jsonb NOT NULL,
            enabled         boolean NOT NULL,
            jitter_ms       bigint NOT NULL,
            timezone        text,
            expire_at       timestamptz,
            meta            jsonb NOT NULL,
            next_run_at     timestamptz,
            last_run_at     timestamptz,
            last_jitter_ms  bigint,
            last_error      text,
            last_success_at timestamptz,
            last_error_at   timestamptz,
            total_run_count bigint NOT NULL,
            drift_ms        bigint,
            created_at      timestamptz NOT NULL,
            updated_at      timestamptz NOT NULL,
            version         bigint NOT NULL,
            extra           jsonb NOT NULL
        );
        -- Serves due(): WHERE enabled AND next_run_at <= $now ORDER BY next_run_at, id.
        CREATE INDEX stem_schedules_due ON {s}.stem_schedules (next_run_at, id) WHERE enabled;

        CREATE TABLE {s}.stem_schedule_runs (
            id           bigserial PRIMARY KEY,
            entry_id     text COLLATE "C" NOT NULL
                         REFERENCES {s}.stem_schedules (id) ON DELETE CASCADE,
            scheduled_at timestamptz NOT NULL,
            executed_at  timestamptz NOT NULL,
            success      boolean NOT NULL,
            duration_ms  bigint NOT NULL,
            error        text
        );
        CREATE INDEX stem_schedule_runs_entry ON {s}.stem_schedule_runs (entry_id, id);
        """,
    ),
    (
        5,
        "rate limits",
        """
        -- One row per rate-limit key: its GCRA theoretical arrival time in epoch
        -- seconds and the tokens the last acquisition took
        -- (stem.adapters.postgres.ratelimit).
        CREATE TABLE {s}.stem_rate_limits (
            key   text PRIMARY KEY,
            tat   float8 NOT NULL,
            taken integer NOT NULL
        );
        """,
    ),
    (
        6,
        "groups, chords and batches",
        """
        CREATE TABLE {s}.stem_groups (
            id         text PRIMARY KEY,
            expected   integer NOT NULL,
            completed  integer NOT NULL DEFAULT 0,
            failed     integer NOT NULL DEFAULT 0,
            claimed    boolean NOT NULL DEFAULT false,
            meta       bytea NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            expires_at timestamptz NOT NULL
        );
        CREATE INDEX stem_groups_expires ON {s}.stem_groups (expires_at);
        -- One row per member outcome; the primary key makes the first record of an
        -- index win, so a redelivered member is never counted twice.
        CREATE TABLE {s}.stem_group_members (
            group_id text NOT NULL REFERENCES {s}.stem_groups (id) ON DELETE CASCADE,
            idx      integer NOT NULL,
            data     bytea NOT NULL,
            PRIMARY KEY (group_id, idx)
        );
        """,
    ),
]

#: Latest schema version this code knows.
LATEST = MIGRATIONS[-1][0]

# Two-int advisory lock key: a constant class id ("STEM") and the schema's hash.
_LOCK_CLASS = 0x5354454D


async def current_version(conn: Any, schema: str) -> int:
    """Applied version of ``schema`` (quoted), 0 when Stem's tables don't exist yet."""
    try:
        version = await conn.fetchval(f"SELECT max(version) FROM {schema}.stem_migrations")
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
        return 0
    return int(version or 0)


async def apply(conn: Any, schema: str) -> list[int]:
    """Bring ``schema`` (quoted identifier) up to date on ``conn``; return versions applied.

    The common case (already current) is one cheap query and takes no lock.
    """
    if await current_version(conn, schema) >= LATEST:
        return []
    applied: list[int] = []
    async with conn.transaction():
        # CREATE SCHEMA IF NOT EXISTS is not safe against a concurrent twin (unique
        # violation on pg_namespace), so take the lock first and check again under it.
        await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _LOCK_CLASS, schema)
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await conn.execute(
            f"""CREATE TABLE IF NOT EXISTS {schema}.stem_migrations (
                    version    integer PRIMARY KEY,
                    name       text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now(),
                    applied_by integer NOT NULL DEFAULT pg_backend_pid()
                )"""
        )
        done = await current_version(conn, schema)
        for version, name, sql in MIGRATIONS:
            if version <= done:
                continue
            await conn.execute(sql.replace("{s}", schema))
            await conn.execute(
                f"INSERT INTO {schema}.stem_migrations (version, name) VALUES ($1, $2)",
                version,
                name,
            )
            applied.append(version)
    return applied
