"""Every query the Postgres adapters run, rendered once per schema.

The table layout lives in :mod:`stem.adapters.postgres.migrations`; this module holds
the statements that use it, so the broker, the result backend and the combined
ack-with-results path share one text of each query.

Conventions: batches travel as parallel arrays through ``unnest`` (one statement, one
round-trip, any batch size); times go in as epoch seconds (float8) and come back
through ``date_part('epoch', ...)`` (float8, cheaper to decode than timestamps or
numerics); NOTIFY is sent by the same statement that changes the rows, so it is
delivered exactly when (and only if) that transaction commits.
"""

from __future__ import annotations

from stem.limits import MAX_VISIBILITY_TIMEOUT, MIN_VISIBILITY_TIMEOUT

#: Result states a waiter is woken for (TaskState.is_terminal).
TERMINAL_STATES = "('succeeded', 'failed', 'cancelled')"

# A job is available when it is due and its lease is absent or expired. Expired
# leases need no reclaim step: the fetch query itself picks them up again.
_AVAILABLE = "not_before <= now() AND (locked_until IS NULL OR locked_until < now())"

# A lease is committed without waiting for the WAL flush (set for this transaction
# only, from a returned row): a Postgres crash can forget a lease, which just makes
# the job available again — at-least-once already allows that redelivery. It saves
# an fsync on every fetch. Enqueues, results and acks stay synchronous.
_ASYNC_COMMIT = "set_config('synchronous_commit', 'off', true) AS _async_commit"

# One row per queue named in the batch: pg_notify(channel, queue).
_NOTIFY_QUEUES = "SELECT count(pg_notify({chan}, q)) FROM (SELECT DISTINCT queue AS q FROM {src}) n"

# Terminal results notify with comma-joined task ids, several per notification but
# under the 8000-byte payload limit.
_NOTIFY_RESULTS = f"""
SELECT count(pg_notify({{chan}}, ids)) FROM (
    SELECT string_agg(task_id, ',') AS ids FROM (
        SELECT task_id,
               sum(octet_length(task_id) + 1) OVER (ORDER BY task_id) / 7000 AS grp
        FROM up WHERE state IN {TERMINAL_STATES}
    ) x GROUP BY grp
) y"""

_UPSERT_RESULTS = """
up AS (
    INSERT INTO {s}.stem_results AS r (task_id, state, status, expires_at, updated_at)
    SELECT t.task_id, t.state, t.status, now() + t.ttl * interval '1 second', now()
    FROM unnest({a}::text[], {b}::text[], {c}::bytea[], {d}::float8[])
         AS t(task_id, state, status, ttl)
    ON CONFLICT (task_id) DO UPDATE
       SET state = excluded.state, status = excluded.status,
           expires_at = excluded.expires_at, updated_at = excluded.updated_at
    RETURNING r.task_id, r.state
)"""

# A job's lease length in seconds: its own visibility (NaN: none) or the default $3,
# forced into MIN..MAX_VISIBILITY_TIMEOUT (least/greatest also bound +-infinity).
_LEASE = (
    f"least(greatest(coalesce(nullif(j.visibility, 'NaN'), $3::float8), "
    f"{MIN_VISIBILITY_TIMEOUT!r}::float8), {MAX_VISIBILITY_TIMEOUT!r}::float8)"
)

_JOB_COLUMNS = "task_id, queue, priority, not_before, visibility, attempt, envelope"
# Column values from an unnest alias ``t`` carrying the publish arrays.
_JOB_VALUES = (
    "t.task_id, t.queue, t.priority, coalesce(to_timestamp(t.nb), now()), t.vis, t.attempt, t.env"
)


# Insert-if-absent for statuses: a row whose TTL ran out counts as absent (it is only
# waiting for the purge). RETURNING yields exactly the ids written.
_ADD_RESULTS = """
st AS (
    INSERT INTO {s}.stem_results AS r (task_id, state, status, expires_at, updated_at)
    SELECT t.task_id, t.state, t.status, now() + t.ttl * interval '1 second', now()
    FROM unnest({a}::text[], {b}::text[], {c}::bytea[], {d}::float8[])
         AS t(task_id, state, status, ttl)
    ON CONFLICT (task_id) DO UPDATE
       SET state = excluded.state, status = excluded.status,
           expires_at = excluded.expires_at, updated_at = excluded.updated_at
       WHERE r.expires_at <= now()
    RETURNING r.task_id
)"""


def _publish_unnest(first: int) -> str:
    n = [f"${first + i}" for i in range(7)]
    return (
        f"unnest({n[0]}::text[], {n[1]}::text[], {n[2]}::int2[], {n[3]}::float8[], "
        f"{n[4]}::float8[], {n[5]}::int4[], {n[6]}::bytea[]) "
        "AS t(task_id, queue, priority, nb, vis, attempt, env)"
    )


class Statements:
    """The SQL for one schema (``schema`` is an already quoted identifier)."""

    def __init__(self, schema: str) -> None:
        s = schema
        jobs = f"{s}.stem_jobs"
        dead = f"{s}.stem_dead_letters"

        # -- publishing -------------------------------------------------------
        # $1..$7 parallel arrays (task_id, queue, priority, not_before epoch or NULL,
        # visibility seconds or NULL, attempt, envelope bytes); $8 channel.
        self.publish = f"""
            WITH ins AS (
                INSERT INTO {jobs} ({_JOB_COLUMNS})
                SELECT {_JOB_VALUES} FROM {_publish_unnest(1)}
                RETURNING queue
            ) {_NOTIFY_QUEUES.format(chan="$8", src="ins")}"""
        # Publish only the envelopes whose status is new, with that status, in one
        # statement: $1..$7 publish arrays, $8 channel, $9 status JSON bytes, $10 TTLs
        # (aligned with the jobs; ids unique). Returns the ids published.
        self.publish_new = f"""
            WITH {_ADD_RESULTS.format(s=s, a="$1", b="array_fill('queued'::text, ARRAY[cardinality($1::text[])])", c="$9", d="$10")},
            ins AS (
                INSERT INTO {jobs} ({_JOB_COLUMNS})
                SELECT {_JOB_VALUES} FROM {_publish_unnest(1)}
                WHERE t.task_id IN (SELECT task_id FROM st)
                RETURNING queue, task_id
            )
            SELECT array(SELECT task_id FROM ins) AS ids,
                   (SELECT count(pg_notify($8, q)) FROM (SELECT DISTINCT queue AS q FROM ins) n)
                   AS notified"""
        # The same for one envelope, with scalars (cheaper to encode than 1-element
        # arrays): $1..$7 as publish_one, $8 channel, $9 status JSON, $10 TTL. Returns
        # the id when published, no row when the status existed.
        self.publish_new_one = f"""
            WITH st AS (
                INSERT INTO {s}.stem_results AS r (task_id, state, status, expires_at, updated_at)
                VALUES ($1, 'queued', $9, now() + $10::float8 * interval '1 second', now())
                ON CONFLICT (task_id) DO UPDATE
                   SET state = excluded.state, status = excluded.status,
                       expires_at = excluded.expires_at, updated_at = excluded.updated_at
                   WHERE r.expires_at <= now()
                RETURNING r.task_id
            ), ins AS (
                INSERT INTO {jobs} ({_JOB_COLUMNS})
                SELECT $1, $2, $3, coalesce(to_timestamp($4::float8), now()), $5, $6, $7
                WHERE EXISTS (SELECT 1 FROM st)
                RETURNING queue, task_id
            ) SELECT task_id, pg_notify($8, queue) FROM ins"""
        # The status half alone (before a COPY of the new jobs, in one transaction;
        # also ResultBackend.add_many): $1 ids, $2 states, $3 JSON bytes, $4 TTLs.
        self.add_results = (
            "WITH " + _ADD_RESULTS.format(s=s, a="$1", b="$2", c="$3", d="$4")
            + " SELECT task_id FROM st")
        self.forget_results = f"DELETE FROM {s}.stem_results WHERE task_id = ANY($1::text[])"
        # Ids among $1 with an unexpired status (a unique publish checks before locking).
        self.live_results = f"""
            SELECT task_id FROM {s}.stem_results
            WHERE task_id = ANY($1::text[]) AND expires_at > now()"""
        # After a COPY: wake the fetchers of each queue ($1 channel, $2 text[] queues).
        self.notify_queues = "SELECT count(pg_notify($1, q)) FROM unnest($2::text[]) AS q"
        # The common single-envelope case without array encoding; same parameters as
        # scalars.
        self.publish_one = f"""
            WITH ins AS (
                INSERT INTO {jobs} ({_JOB_COLUMNS})
                VALUES ($1, $2, $3, coalesce(to_timestamp($4::float8), now()), $5, $6, $7)
                RETURNING queue
            ) SELECT pg_notify($8, queue) FROM ins"""

        # -- fetching ---------------------------------------------------------
        # $1 queue, $2 limit, $3 default visibility seconds, $4 owner, $5 lease token.
        # The lease length is clamped in the statement (_LEASE), so no stored value
        # (1e13, -1, NaN, infinity: publish clamps, but rows may be written by other
        # programs) can overflow ``now() + interval`` and fail the fetch of every row.
        lease_update = f"""
            upd AS (
                UPDATE {jobs} j
                SET locked_until = now() + {_LEASE} * interval '1 second',
                    owner = $4, lease = $5, deliveries = j.deliveries + 1
                WHERE j.id = ANY(ARRAY(SELECT id FROM picked))
                RETURNING j.id, j.queue, j.priority, j.not_before, j.envelope, j.locked_until,
                          j.deliveries
            )"""
        self.fetch_one_queue = f"""
            WITH picked AS (
                SELECT id FROM {jobs}
                WHERE queue = $1 AND {_AVAILABLE}
                ORDER BY priority DESC, not_before, id
                LIMIT $2
                FOR UPDATE SKIP LOCKED
            ), {lease_update}
            SELECT id, queue, envelope, date_part('epoch', locked_until) AS until, deliveries,
                   {_ASYNC_COMMIT}
            FROM upd ORDER BY priority DESC, not_before, id"""
        # Same with $1 a text[] of queues in the order to serve them (stem.ports.Broker:
        # queue order first, then priority, then age). Each queue's best rows come
        # from the index (a LATERAL probe per queue, in list order, so the ORDER BY
        # only sorts within a queue: an incremental sort on the ordinality); once $2
        # rows are found the later queues are not even probed, so no more rows are
        # locked than one queue's probe past the batch.
        self.fetch_many_queues = f"""
            WITH picked AS (
                SELECT c.id
                FROM unnest($1::text[]) WITH ORDINALITY AS q(name, rank)
                CROSS JOIN LATERAL (
                    SELECT id, priority, not_before FROM {jobs}
                    WHERE queue = q.name AND {_AVAILABLE}
                    ORDER BY priority DESC, not_before, id
                    LIMIT $2
                    FOR UPDATE SKIP LOCKED
                ) c
                ORDER BY q.rank, c.priority DESC, c.not_before, c.id
                LIMIT $2
            ), {lease_update}
            SELECT id, queue, envelope, date_part('epoch', locked_until) AS until, deliveries,
                   {_ASYNC_COMMIT}
            FROM upd ORDER BY array_position($1::text[], queue), priority DESC, not_before, id"""
        # Seconds until the earliest not-yet-available job of $1 (text[]) becomes
        # available — a delayed job coming due or a lease expiring; NULL when none.
        self.next_due = f"""
            SELECT date_part('epoch', least(
                (SELECT min(not_before) FROM {jobs}
                 WHERE queue = ANY($1::text[]) AND locked_until IS NULL),
                (SELECT min(greatest(locked_until, not_before)) FROM {jobs}
                 WHERE queue = ANY($1::text[]) AND locked_until IS NOT NULL)
            ) - clock_timestamp())"""

        # -- settling deliveries ($1 ids, $2 lease tokens) ----------------------
        # ``j.id = ANY($1)`` looks redundant next to the join, but it lets the planner
        # find the rows through the primary key instead of hashing the whole table.
        self.ack = f"""
            DELETE FROM {jobs} j USING unnest($1::int8[], $2::uuid[]) AS t(id, lease)
            WHERE j.id = ANY($1::int8[]) AND j.id = t.id AND j.lease = t.lease"""
        self.nack = f"""
            WITH upd AS (
                UPDATE {jobs} j SET locked_until = NULL, owner = NULL, lease = NULL
                FROM unnest($1::int8[], $2::uuid[]) AS t(id, lease)
                WHERE j.id = ANY($1::int8[]) AND j.id = t.id AND j.lease = t.lease
                RETURNING j.queue
            ) {_NOTIFY_QUEUES.format(chan="$3", src="upd")}"""
        # $3 seconds from now.
        self.extend = f"""
            UPDATE {jobs} j SET locked_until = now() + $3::float8 * interval '1 second'
            FROM unnest($1::int8[], $2::uuid[]) AS t(id, lease)
            WHERE j.id = ANY($1::int8[]) AND j.id = t.id AND j.lease = t.lease
            RETURNING j.id, date_part('epoch', j.locked_until)"""
        # Replace each still-leased job by its new envelope: the insert only happens
        # for rows the delete removed, so a stale lease holder adds nothing.
        # $1 ids, $2 leases, $3..$9 publish arrays, $10 channel.
        self.retry = f"""
            WITH t AS (
                SELECT * FROM unnest($1::int8[], $2::uuid[], $3::text[], $4::text[],
                                     $5::int2[], $6::float8[], $7::float8[], $8::int4[],
                                     $9::bytea[])
                    AS t(old_id, lease, task_id, queue, priority, nb, vis, attempt, env)
            ), d AS (
                DELETE FROM {jobs} j USING t WHERE j.id = ANY($1::int8[]) AND j.id = t.old_id AND j.lease = t.lease
                RETURNING j.id
            ), ins AS (
                INSERT INTO {jobs} ({_JOB_COLUMNS})
                SELECT {_JOB_VALUES} FROM t JOIN d ON d.id = t.old_id ORDER BY t.old_id
                RETURNING queue
            ) {_NOTIFY_QUEUES.format(chan="$10", src="ins")}"""
        # $1 ids, $2 leases, $3 reasons.
        self.dead_letter = f"""
            WITH t AS (
                SELECT * FROM unnest($1::int8[], $2::uuid[], $3::text[]) AS t(id, lease, reason)
            ), d AS (
                DELETE FROM {jobs} j USING t WHERE j.id = ANY($1::int8[]) AND j.id = t.id AND j.lease = t.lease
                RETURNING j.id, j.task_id, j.queue, j.attempt, j.owner, j.envelope
            )
            INSERT INTO {dead} (task_id, queue, reason, attempt, owner, envelope)
            SELECT d.task_id, d.queue, t.reason, d.attempt, d.owner, d.envelope
            FROM d JOIN t ON t.id = d.id ORDER BY d.id"""

        # The planner's row count of the jobs table, the statistics system's count of
        # live rows (reported up to seconds late) and the rows of the queues $1 (text[])
        # there are now, counted up to $2 (maintenance).
        self.table_stats = f"""
            SELECT c.reltuples, s.n_live_tup,
                   (SELECT count(*) FROM (SELECT 1 FROM {jobs}
                                          WHERE queue = ANY($1::text[]) LIMIT $2) q) AS seen
            FROM pg_class c
            JOIN pg_stat_user_tables s ON s.relid = c.oid
            WHERE c.oid = '{jobs}'::regclass"""

        # -- inspection and maintenance ($1 queue) ------------------------------
        self.stats = f"""
            SELECT count(*) FILTER (WHERE {_AVAILABLE}) AS pending,
                   count(*) FILTER (WHERE not_before > now()
                                    AND (locked_until IS NULL OR locked_until < now())) AS delayed,
                   count(*) FILTER (WHERE locked_until >= now()) AS in_flight,
                   (SELECT count(*) FROM {dead} WHERE queue = $1) AS dead
            FROM {jobs} WHERE queue = $1"""
        self.purge = f"""
            DELETE FROM {jobs} WHERE queue = $1 AND (locked_until IS NULL OR locked_until < now())"""
        # $2 limit, $3 offset, $4 since (epoch seconds or NULL).
        self.dead_letters = f"""
            SELECT id, queue, envelope, reason, date_part('epoch', dead_at) AS dead_at,
                   attempt, owner, task_id
            FROM {dead} WHERE queue = $1
              AND ($4::float8 IS NULL OR dead_at >= to_timestamp($4::float8))
            ORDER BY id LIMIT $2 OFFSET $3"""
        # $2 dead letter id (a task id), $3 a row id (an id made up for unreadable bytes).
        self.dead_letter_by_id = f"""
            SELECT id, queue, envelope, reason, date_part('epoch', dead_at) AS dead_at,
                   attempt, owner, task_id
            FROM {dead} WHERE queue = $1 AND (task_id = $2 OR id = $3)
            ORDER BY id DESC"""
        # Replay reads candidates in id order, page by page ($2 = last id seen, $3 page
        # size), locking them; the caller decodes them, deletes the replayable ones
        # ($1 ids) and re-publishes those, all in one transaction.
        self.dead_letter_page = f"""
            SELECT id, queue, envelope FROM {dead}
            WHERE queue = $1 AND id > $2
              AND ($4::float8 IS NULL OR dead_at >= to_timestamp($4::float8))
            ORDER BY id LIMIT $3
            FOR UPDATE SKIP LOCKED"""
        self.delete_dead_letters = f"DELETE FROM {dead} WHERE id = ANY($1::int8[])"
        self.purge_dead_letters = f"DELETE FROM {dead} WHERE queue = $1"
        # $1 retention in seconds: dead letters older than that, of every queue.
        self.sweep_dead_letters = f"""
            DELETE FROM {dead} WHERE dead_at < now() - make_interval(secs => $1::float8)"""

        # -- results -----------------------------------------------------------
        # $1 task ids, $2 states, $3 status JSON bytes, $4 TTL seconds; $5 channel.
        self.set_results = (
            "WITH "
            + _UPSERT_RESULTS.format(s=s, a="$1", b="$2", c="$3", d="$4")
            + _NOTIFY_RESULTS.format(chan="$5")
        )
        self.get_result = (
            f"SELECT status FROM {s}.stem_results WHERE task_id = $1 AND expires_at > now()"
        )
        self.get_results = f"""
            SELECT status FROM {s}.stem_results
            WHERE task_id = ANY($1::text[]) AND expires_at > now()"""
        # append_meta: read the unexpired status and lock its row ($1 task id), then
        # write its new JSON ($2) in the same transaction; state and expiry stay.
        self.lock_result = (
            f"SELECT status FROM {s}.stem_results WHERE task_id = $1 AND expires_at > now() "
            "FOR UPDATE")
        self.rewrite_result = f"UPDATE {s}.stem_results SET status = $2 WHERE task_id = $1"
        # One bounded batch so purging never holds many row locks or runs long.
        self.purge_expired_results = f"""
            DELETE FROM {s}.stem_results WHERE task_id IN (
                SELECT task_id FROM {s}.stem_results WHERE expires_at <= now() LIMIT 1000
            ) AND expires_at <= now()"""
        # Ack ($6 ids, $7 leases) and result upsert in one statement, hence one
        # transaction: the status can't be written without the ack or the other way.
        self.ack_with_results = (
            "WITH "
            + _UPSERT_RESULTS.format(s=s, a="$1", b="$2", c="$3", d="$4")
            + f""", acked AS (
                DELETE FROM {jobs} j USING unnest($6::int8[], $7::uuid[]) AS t(id, lease)
                WHERE j.id = ANY($6::int8[]) AND j.id = t.id AND j.lease = t.lease
            )"""
            + _NOTIFY_RESULTS.format(chan="$5")
        )


class LockStatements:
    """The lock store's SQL for one schema (``stem_locks``; times are the server's)."""

    def __init__(self, schema: str) -> None:
        locks = f"{schema}.stem_locks"
        # $1 key, $2 owner, $3 ttl seconds. Insert, or take over a row whose lease ran
        # out or that $2 holds already; a row comes back exactly when $2 holds the key.
        self.acquire = f"""
            INSERT INTO {locks} AS l (key, owner, expires_at)
            VALUES ($1, $2, now() + $3::float8 * interval '1 second')
            ON CONFLICT (key) DO UPDATE SET owner = excluded.owner,
                                            expires_at = excluded.expires_at
               WHERE l.expires_at <= now() OR l.owner = excluded.owner
            RETURNING l.owner"""
        self.renew = f"""
            UPDATE {locks} SET expires_at = now() + $3::float8 * interval '1 second'
            WHERE key = $1 AND owner = $2 AND expires_at > now()"""
        self.release = f"DELETE FROM {locks} WHERE key = $1 AND owner = $2 AND expires_at > now()"
        self.owner_of = f"SELECT owner FROM {locks} WHERE key = $1 AND expires_at > now()"
        # Rows whose lease ran out (a key nobody takes again), one bounded batch.
        self.purge = f"""
            DELETE FROM {locks} WHERE key IN (
                SELECT key FROM {locks} WHERE expires_at <= now() LIMIT 1000
            ) AND expires_at <= now()"""


#: The entry columns in the order of the write statements' $1..$22.
SCHEDULE_COLUMNS = (
    "id", "task_name", "queue", "spec", "args", "kwargs", "enabled", "jitter_ms", "timezone",
    "expire_at", "meta", "next_run_at", "last_run_at", "last_jitter_ms", "last_error",
    "last_success_at", "last_error_at", "total_run_count", "drift_ms", "created_at",
    "updated_at", "extra",
)
_JSONB = frozenset({"spec", "args", "kwargs", "meta", "extra"})


class ScheduleStatements:
    """The schedule store's SQL for one schema (``stem_schedules`` and
    ``stem_schedule_runs``). Every write is one statement."""

    def __init__(self, schema: str) -> None:
        entries = f"{schema}.stem_schedules"
        runs = f"{schema}.stem_schedule_runs"
        cols = ", ".join(SCHEDULE_COLUMNS)
        values = ", ".join(f"${n}::jsonb" if c in _JSONB else f"${n}"
                           for n, c in enumerate(SCHEDULE_COLUMNS, 1))
        # Every column but the id and created_at (an entry keeps its creation time).
        assign = ", ".join(f"{c} = excluded.{c}" for c in SCHEDULE_COLUMNS
                           if c not in ("id", "created_at"))
        select = f"{cols}, version"
        self.get = f"SELECT {select} FROM {entries} WHERE id = $1"
        self.entries = f"SELECT {select} FROM {entries} ORDER BY id"
        self.version = f"SELECT version FROM {entries} WHERE id = $1"
        # $1..$22 the columns: create or replace whatever is stored.
        self.put = f"""
            INSERT INTO {entries} AS e ({cols}, version) VALUES ({values}, 1)
            ON CONFLICT (id) DO UPDATE SET {assign}, version = e.version + 1
            RETURNING version, created_at"""
        # Only if the id is new (expected version 0); no row back on a conflict.
        self.create = f"""
            INSERT INTO {entries} ({cols}, version) VALUES ({values}, 1)
            ON CONFLICT (id) DO NOTHING
            RETURNING version, created_at"""
        # Only if the stored version is $23; no row back when it is not (or no entry).
        sets = ", ".join(f"{c} = ${n}::jsonb" if c in _JSONB else f"{c} = ${n}"
                         for n, c in enumerate(SCHEDULE_COLUMNS, 1)
                         if c not in ("id", "created_at"))
        # ($20 is only there to keep the parameter list the same: created_at is never null.)
        self.replace = f"""
            UPDATE {entries} SET {sets}, created_at = coalesce(created_at, $20),
                                 version = version + 1
            WHERE id = $1 AND version = $23
            RETURNING version, created_at"""
        self.remove = f"DELETE FROM {entries} WHERE id = $1"  # runs go by ON DELETE CASCADE
        # $1 now (the beat's clock), $2 limit.
        self.due = f"""
            SELECT {select} FROM {entries}
            WHERE enabled AND next_run_at <= $1 ORDER BY next_run_at, id LIMIT $2"""
        # One array per field, element i for the i-th run (entry ids distinct): $1 ids,
        # $2 expected versions, $3 executed_at, $4 next_run_at, $5 disable, $6 success,
        # $7 error, $8 drift ms, $9 jitter ms, $10 scheduled_at, $11 duration ms; then
        # $12 now, $13 runs to keep (>= 1), $14 trim period (>= 1). mark_run for the
        # whole batch in one statement: each entry whose version matches is updated and
        # gets its history row; the others (stale, gone) are untouched. An entry's runs
        # beyond the bound are deleted every $14-th run of it (the phase differs per
        # entry, so each batch trims a few entries), not on every run: finding the
        # bound's row reads the entry's whole history, and 1,000 entries with 1,000
        # runs each then took a second per batch. Reads never see more than the bound.
        self.mark_runs = f"""
            WITH batch AS (
                SELECT * FROM unnest($1::text[], $2::bigint[], $3::timestamptz[],
                                     $4::timestamptz[], $5::boolean[], $6::boolean[],
                                     $7::text[], $8::bigint[], $9::bigint[],
                                     $10::timestamptz[], $11::bigint[])
                    AS b(b_id, b_version, b_executed, b_next, b_disable, b_success, b_error,
                         b_drift, b_jitter, b_scheduled, b_duration)
            ), locked AS (
                -- Rows locked in id order, so concurrent batches cannot deadlock.
                SELECT l.id FROM {entries} AS l WHERE l.id = ANY($1::text[])
                ORDER BY l.id FOR UPDATE
            ), up AS (
                UPDATE {entries} AS e SET
                    last_run_at = b_executed,
                    next_run_at = CASE WHEN b_disable THEN NULL ELSE b_next END,
                    enabled = e.enabled AND NOT b_disable,
                    total_run_count = e.total_run_count + 1,
                    last_error = CASE WHEN b_success THEN NULL ELSE b_error END,
                    last_success_at = CASE WHEN b_success THEN b_executed
                                           ELSE e.last_success_at END,
                    last_error_at = CASE WHEN b_success THEN e.last_error_at
                                         ELSE b_executed END,
                    drift_ms = b_drift, last_jitter_ms = b_jitter, version = e.version + 1,
                    updated_at = $12
                FROM batch JOIN locked ON locked.id = b_id
                WHERE e.id = b_id AND e.version = b_version
                RETURNING {", ".join(f"e.{c}" for c in SCHEDULE_COLUMNS)}, e.version
            ), ins AS (
                INSERT INTO {runs} (entry_id, scheduled_at, executed_at, success, duration_ms,
                                    error)
                SELECT b_id, b_scheduled, b_executed, b_success, b_duration, b_error
                FROM batch JOIN up ON up.id = b_id
            ), trimmed AS (
                -- The statement's snapshot does not see the new runs: keep $13 - 1 older.
                DELETE FROM {runs} AS r USING up
                WHERE r.entry_id = up.id
                AND mod(up.total_run_count + abs(hashtext(up.id) % $14::int), $14::int) = 0
                AND r.id <= (SELECT o.id FROM {runs} AS o WHERE o.entry_id = up.id
                             ORDER BY o.id DESC OFFSET $13::int - 1 LIMIT 1)
            )
            SELECT * FROM up"""
        # $1 id, $2 limit.
        self.history = f"""
            SELECT scheduled_at, executed_at, success, duration_ms, error FROM {runs}
            WHERE entry_id = $1 ORDER BY id DESC LIMIT $2"""
