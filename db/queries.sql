-- Every statement the project runs against the job store. One named statement per operation;
-- `db/sql.py` loads them. Each statement takes `:now` (NULL means the database clock) so tests can
-- move time instead of sleeping. Every write to a running job is fenced by id, status, attempt and
-- worker: zero rows changed means the caller lost the job.
--
-- Side effects of a job's status (the strings are db/states.py's JobStatus; the check constraints
-- are in db/models.py). Changing a status anywhere means minding all of these:
--   * trigger jobs_notify_inserted (migrations/versions/0001, function acestep_notify_jobs):
--     AFTER INSERT ON jobs, once per statement: NOTIFY acestep_jobs, which wakes LISTENing idle
--     workers (db/wakeups.py). Fires for submit_job and submit_jobs (new 'queued' jobs).
--   * explicit pg_notify('acestep_jobs') in fail_job and release_job: a job back in the queue wakes
--     idle workers too. rescue_expired and cancel_job do not notify (workers poll as a fallback).
--   * trigger jobs_queue_webhook (migrations/versions/0003, function acestep_queue_webhook):
--     AFTER UPDATE OF status ON jobs, per row, when the status changes to 'succeeded', 'failed' or
--     'canceled' and request->>'webhook_url' is set: inserts a webhook_outbox row (event
--     'job.<status>') in the same transaction. Fires for complete_jobs, fail_job, release_job,
--     finish_canceled, cancel_job and rescue_expired; delivered by handler/webhooks.py, run by
--     handler/maintenance.py.
--   * webhook_outbox.job_id REFERENCES jobs ON DELETE CASCADE: prune_finished deletes a job's
--     deliveries with it; handler/maintenance.py then deletes its files (jobs/<id>/ in storage).
--   * check ck_jobs_lease_only_while_running: status = 'running' exactly when lease_expires_at is
--     set, so every statement that enters or leaves 'running' sets or clears the lease.
--   * check ck_jobs_status: the five statuses; partial indexes ix_jobs_queue and
--     ix_jobs_owner_queued cover status = 'queued' rows only.
-- Who changes a status: submit_job/submit_jobs (new, 'queued'), claim_jobs ('queued' -> 'running'),
-- complete_jobs ('running' -> 'succeeded'), fail_job ('running' -> 'queued' | 'failed'),
-- release_job ('running' -> 'queued' | 'canceled'), finish_canceled ('running' -> 'canceled'),
-- cancel_job ('queued' -> 'canceled'), rescue_expired ('running' -> 'queued' | 'failed' |
-- 'canceled', run by handler/maintenance.py), prune_finished (deletes finished jobs, same module).

-- name: submit_job
-- Insert one job; with an idempotency key, return the existing job instead (locked, so a
-- concurrent duplicate is seen even if it committed after this statement began). With
-- :max_queued, nothing is inserted (no row returned) while the owner has that many queued or
-- running (the queued ones through their partial index; running jobs, few as the worker slots,
-- through the lease index).
WITH clock AS (SELECT COALESCE(CAST(:now AS timestamptz), now()) AS now)
INSERT INTO jobs (id, owner, idempotency_key, request_hash, priority, request, model, lm_model, task_type,
                  items, audio_seconds, dit_steps, lm_mode, max_attempts, created_at, run_after)
SELECT :id, :owner, :idempotency_key, :request_hash, :priority, CAST(:request AS jsonb), :model, :lm_model, :task_type,
       :items, :audio_seconds, :dit_steps, :lm_mode, :max_attempts, clock.now, clock.now
FROM clock
WHERE CAST(:max_queued AS int) IS NULL
   OR (SELECT count(*) FROM (SELECT 1 FROM jobs WHERE owner = :owner AND status = 'queued'
                             LIMIT CAST(:max_queued AS int)) AS mine)
    + (SELECT count(*) FROM jobs WHERE lease_expires_at IS NOT NULL AND owner = :owner) < CAST(:max_queued AS int)
ON CONFLICT (owner, idempotency_key) WHERE idempotency_key IS NOT NULL
DO UPDATE SET idempotency_key = EXCLUDED.idempotency_key
RETURNING id, request_hash, status, (xmax = 0) AS created;

-- name: submit_jobs
-- Insert many jobs of one owner in one statement (bulk clients, benchmarks). :jobs is a JSON array
-- of {id, request, priority?, model?, lm_model?, task_type?, items?, audio_seconds?, dit_steps?, lm_mode?}
-- (absent: the column's default); returns how many were inserted.
WITH clock AS (SELECT COALESCE(CAST(:now AS timestamptz), now()) AS now),
inserted AS (
    INSERT INTO jobs (id, owner, priority, request, model, lm_model, task_type, items, audio_seconds, dit_steps,
                      lm_mode, max_attempts, created_at, run_after)
    SELECT n.id, :owner, COALESCE(n.priority, 0), n.request, COALESCE(n.model, ''), COALESCE(n.lm_model, ''),
           COALESCE(n.task_type, 'text2music'), COALESCE(n.items, 1), n.audio_seconds, COALESCE(n.dit_steps, 8),
           COALESCE(n.lm_mode, 0), :max_attempts, clock.now, clock.now
    FROM clock,
         jsonb_to_recordset(CAST(:jobs AS jsonb)) AS n(id uuid, priority int, request jsonb, model text,
                                                      lm_model text, task_type text, items int, audio_seconds float8,
                                                      dit_steps int, lm_mode smallint)
    RETURNING 1
)
SELECT count(*) AS inserted FROM inserted;

-- name: claim_jobs
-- Take up to :limit claimable jobs in claim order; never more than the caller's free slots. Without
-- :batch_key and :job_id (NULL) they are the first claimable jobs, skipping those another claimer
-- has locked. With :batch_key, only jobs of that batch key (request->>'batch_key') among the next
-- :lookahead in claim order, to share one GPU batch with a job the worker already holds. With
-- :job_id, that job alone if it is claimable (a platform invocation that carries its own job).
-- Exactly one of the three pickers runs (the others' conditions are one-time filters); all share
-- the claim below.
-- Routing: each picker takes only jobs the caller serves. :dits (text[]) are its DiTs: a job's
-- `model` must be one of them ('' = any DiT, rows from before routing). :lms (text[]) are its LMs:
-- a job's `lm_model` is '' (needs none), one of them, or '*' (any LM: the caller has at least one).
-- NULL for either means "any" (a claimer that declares nothing: tests, benchmarks). Both columns
-- are INCLUDEd in ix_jobs_queue, so the filter is read from the index entries the walk visits.
WITH clock AS (SELECT COALESCE(CAST(:now AS timestamptz), now()) AS now),
next_jobs AS (
    SELECT j.id
    FROM jobs AS j
    WHERE CAST(:batch_key AS text) IS NULL AND CAST(:job_id AS uuid) IS NULL
      AND j.status = 'queued' AND j.run_after <= (SELECT now FROM clock)
      AND (CAST(:dits AS text[]) IS NULL OR j.model = '' OR j.model = ANY(CAST(:dits AS text[])))
      AND (j.lm_model = '' OR CAST(:lms AS text[]) IS NULL OR j.lm_model = ANY(CAST(:lms AS text[]))
           OR (j.lm_model = '*' AND cardinality(CAST(:lms AS text[])) > 0))
    ORDER BY j.priority, j.created_at, j.id
    LIMIT :limit
    FOR UPDATE OF j SKIP LOCKED
),
ahead AS (
    SELECT j.id
    FROM jobs AS j
    WHERE CAST(:batch_key AS text) IS NOT NULL
      AND j.status = 'queued' AND j.run_after <= (SELECT now FROM clock)
      AND (CAST(:dits AS text[]) IS NULL OR j.model = '' OR j.model = ANY(CAST(:dits AS text[])))
      AND (j.lm_model = '' OR CAST(:lms AS text[]) IS NULL OR j.lm_model = ANY(CAST(:lms AS text[]))
           OR (j.lm_model = '*' AND cardinality(CAST(:lms AS text[])) > 0))
    ORDER BY j.priority, j.created_at, j.id
    LIMIT :lookahead
),
batch_mates AS (
    SELECT j.id
    FROM jobs AS j JOIN ahead USING (id)
    WHERE j.status = 'queued' AND j.request->>'batch_key' = :batch_key
    ORDER BY j.priority, j.created_at, j.id
    LIMIT :limit
    FOR UPDATE OF j SKIP LOCKED
),
this_job AS (
    SELECT j.id
    FROM jobs AS j
    WHERE CAST(:job_id AS uuid) IS NOT NULL AND j.id = CAST(:job_id AS uuid)
      AND j.status = 'queued' AND j.run_after <= (SELECT now FROM clock)
      AND (CAST(:dits AS text[]) IS NULL OR j.model = '' OR j.model = ANY(CAST(:dits AS text[])))
      AND (j.lm_model = '' OR CAST(:lms AS text[]) IS NULL OR j.lm_model = ANY(CAST(:lms AS text[]))
           OR (j.lm_model = '*' AND cardinality(CAST(:lms AS text[])) > 0))
    FOR UPDATE OF j SKIP LOCKED
),
picked AS (
    SELECT id FROM next_jobs
    UNION ALL
    SELECT id FROM batch_mates
    UNION ALL
    SELECT id FROM this_job
)
UPDATE jobs AS j
SET status = 'running',
    attempt = j.attempt + 1,
    worker_id = :worker_id,
    started_at = clock.now,
    heartbeat_at = clock.now,
    lease_expires_at = clock.now + make_interval(secs => CAST(:lease_seconds AS float8)),
    stage = 'claimed',
    progress = 0
FROM picked, clock
WHERE j.id = picked.id AND j.status = 'queued'
RETURNING j.id, j.attempt, j.max_attempts, j.priority, j.owner, j.model, j.task_type, j.request,
          j.created_at, j.lease_expires_at;

-- name: heartbeat_job
-- Extend the lease and record progress; returns whether a cancel was requested.
WITH clock AS (SELECT COALESCE(CAST(:now AS timestamptz), now()) AS now)
UPDATE jobs AS j
SET heartbeat_at = clock.now,
    lease_expires_at = clock.now + make_interval(secs => CAST(:lease_seconds AS float8)),
    stage = COALESCE(CAST(:stage AS text), j.stage),
    progress = COALESCE(CAST(:progress AS float8), j.progress)
FROM clock
WHERE j.id = :id AND j.status = 'running' AND j.attempt = :attempt AND j.worker_id = :worker_id
RETURNING j.cancel_requested;

-- name: reprice_job
-- The worker learned the seconds per song (the LM chose them): the job's remaining work is priced on them.
UPDATE jobs AS j
SET audio_seconds = :audio_seconds
WHERE j.id = :id AND j.status = 'running' AND j.attempt = :attempt AND j.worker_id = :worker_id
RETURNING j.id;

-- name: complete_jobs
-- Mark jobs succeeded with their results, each fenced on its own attempt. :done is a JSON array of
-- {id, attempt, result, timings?}; returns the ids actually written.
WITH clock AS (SELECT COALESCE(CAST(:now AS timestamptz), now()) AS now),
done AS (
    SELECT * FROM jsonb_to_recordset(CAST(:done AS jsonb)) AS d(id uuid, attempt int, result jsonb, timings jsonb)
),
written AS (
    UPDATE jobs AS j
    SET status = 'succeeded',
        result = done.result,
        timings = done.timings,
        audio_seconds = COALESCE(CAST(done.timings->>'audio_seconds' AS float8), j.audio_seconds),
        finished_at = clock.now,
        heartbeat_at = clock.now,
        lease_expires_at = NULL,
        stage = NULL,
        progress = 1
    FROM done, clock
    WHERE j.id = done.id AND j.status = 'running' AND j.attempt = done.attempt AND j.worker_id = :worker_id
    RETURNING j.id
)
SELECT COALESCE(array_agg(id), '{}') AS ids FROM written;

-- name: fail_job
-- Record a failed attempt: back to the queue after a backoff while retryable attempts remain,
-- else failed for good with :error as the client-facing message.
WITH clock AS (SELECT COALESCE(CAST(:now AS timestamptz), now()) AS now),
target AS (
    SELECT id, CAST(:retryable AS boolean) AND attempt < max_attempts AND NOT cancel_requested AS retry
    FROM jobs
    WHERE id = :id AND status = 'running' AND attempt = :attempt AND worker_id = :worker_id
)
UPDATE jobs AS j
SET status = CASE WHEN t.retry THEN 'queued' ELSE 'failed' END,
    error = CASE WHEN t.retry THEN NULL ELSE CAST(:error AS text) END,
    errors = j.errors || jsonb_build_array(jsonb_build_object(
        'attempt', j.attempt, 'error', CAST(:error AS text), 'retryable', CAST(:retryable AS boolean),
        'at', clock.now)),
    run_after = clock.now + make_interval(secs => LEAST(
        CAST(:retry_base_seconds AS float8) * power(2, j.attempt - 1), CAST(:retry_max_seconds AS float8))),
    finished_at = CASE WHEN t.retry THEN NULL ELSE clock.now END,
    worker_id = CASE WHEN t.retry THEN NULL ELSE j.worker_id END,
    lease_expires_at = NULL,
    stage = NULL,
    progress = CASE WHEN t.retry THEN 0 ELSE j.progress END
FROM target AS t, clock
WHERE j.id = t.id AND j.status = 'running' AND j.attempt = :attempt AND j.worker_id = :worker_id
RETURNING j.status, pg_notify('acestep_jobs', '') AS notified;

-- name: release_job
-- Give a running job back to the queue at its old place (soft shutdown refunds the attempt);
-- a job whose cancel was requested ends canceled instead.
WITH clock AS (SELECT COALESCE(CAST(:now AS timestamptz), now()) AS now)
UPDATE jobs AS j
SET status = CASE WHEN j.cancel_requested THEN 'canceled' ELSE 'queued' END,
    attempt = j.attempt - CASE WHEN CAST(:refund AS boolean) AND NOT j.cancel_requested THEN 1 ELSE 0 END,
    finished_at = CASE WHEN j.cancel_requested THEN clock.now END,
    worker_id = NULL,
    started_at = NULL,
    lease_expires_at = NULL,
    run_after = clock.now,
    stage = NULL,
    progress = 0
FROM clock
WHERE j.id = :id AND j.status = 'running' AND j.attempt = :attempt AND j.worker_id = :worker_id
RETURNING j.status, pg_notify('acestep_jobs', '') AS notified;

-- name: finish_canceled
-- The worker honoured a cancel request between stages.
WITH clock AS (SELECT COALESCE(CAST(:now AS timestamptz), now()) AS now)
UPDATE jobs AS j
SET status = 'canceled', finished_at = clock.now, lease_expires_at = NULL, stage = NULL
FROM clock
WHERE j.id = :id AND j.status = 'running' AND j.attempt = :attempt AND j.worker_id = :worker_id
RETURNING j.status;

-- name: cancel_job
-- A client's cancel: a queued job ends canceled at once, a running one gets a cancel request and
-- NOTIFY acestep_cancel with its id, which its worker LISTENs for (db/cancel_notices.py) to stop
-- the pipeline within a moment. Returns the status before and after (after is NULL when the job
-- had already finished).
WITH clock AS (SELECT COALESCE(CAST(:now AS timestamptz), now()) AS now),
changed AS (
    UPDATE jobs AS j
    SET status = CASE WHEN j.status = 'queued' THEN 'canceled' ELSE j.status END,
        cancel_requested = true,
        finished_at = CASE WHEN j.status = 'queued' THEN clock.now ELSE j.finished_at END
    FROM clock
    WHERE j.id = :id AND j.status IN ('queued', 'running')
    RETURNING j.status
)
SELECT (SELECT status FROM jobs WHERE id = :id) AS status_before,
       (SELECT status FROM changed) AS status_after,
       (SELECT pg_notify('acestep_cancel', CAST(:id AS text)) FROM changed WHERE changed.status = 'running') AS notified;

-- name: rescue_expired
-- Jobs whose worker stopped heartbeating: requeue while attempts remain, else fail with a clear
-- error. One rescuer at a time (advisory lock); the UPDATE re-checks the expiry it acts on.
WITH clock AS (SELECT COALESCE(CAST(:now AS timestamptz), now()) AS now),
lock AS (SELECT pg_try_advisory_xact_lock(:lock_key) AS held),
expired AS (
    SELECT j.id
    FROM jobs AS j, clock, lock
    WHERE lock.held AND j.status = 'running' AND j.lease_expires_at < clock.now
    ORDER BY j.lease_expires_at
    LIMIT :limit
    FOR UPDATE OF j SKIP LOCKED
),
outcome AS (
    SELECT j.id,
           CASE WHEN j.cancel_requested THEN 'canceled'
                WHEN j.attempt < j.max_attempts THEN 'queued'
                ELSE 'failed' END AS status
    FROM jobs AS j JOIN expired USING (id)
)
UPDATE jobs AS j
SET status = o.status,
    error = CASE WHEN o.status = 'failed' THEN format(
        'The worker running this job stopped responding (attempt %s of %s); no attempts are left.',
        j.attempt, j.max_attempts) END,
    errors = j.errors || jsonb_build_array(jsonb_build_object(
        'attempt', j.attempt, 'error', 'lease expired: the worker stopped responding',
        'retryable', true, 'at', clock.now)),
    run_after = clock.now + make_interval(secs => LEAST(
        CAST(:retry_base_seconds AS float8) * power(2, j.attempt - 1), CAST(:retry_max_seconds AS float8))),
    finished_at = CASE WHEN o.status = 'queued' THEN NULL ELSE clock.now END,
    worker_id = CASE WHEN o.status = 'queued' THEN NULL ELSE j.worker_id END,
    lease_expires_at = NULL,
    stage = NULL,
    progress = CASE WHEN o.status = 'queued' THEN 0 ELSE j.progress END
FROM outcome AS o, clock
WHERE j.id = o.id AND j.status = 'running' AND j.lease_expires_at < clock.now
RETURNING j.id, j.status, j.attempt;

-- name: find_idempotent_job
-- The owner's job made with this Idempotency-Key, if any (the unique partial index finds it).
SELECT id, request FROM jobs WHERE owner = :owner AND idempotency_key = :key;

-- name: get_job
SELECT id, status, priority, owner, request, model, lm_model, task_type, items, audio_seconds, dit_steps, lm_mode, attempt,
       max_attempts, worker_id,
       cancel_requested, stage, progress, result, error, errors, created_at, started_at,
       finished_at, lease_expires_at, eta_predicted_at
FROM jobs
WHERE id = :id;

-- name: queue_position
-- 1-based rank in claim order for a queued job, 0 otherwise. Two index range counts: higher
-- priorities, then the same priority up to this job (a single row comparison would make the
-- index walk every job of the leading priority).
-- :models (text[]) in this and the other queue_* statements: count only the jobs of these DiTs,
-- the ones that compete with the job for the same workers (handler/http/eta.py); NULL: every job.
-- `model` is INCLUDEd in ix_jobs_queue, so the counts stay index-only.
SELECT j.status,
       CASE WHEN j.status = 'queued' THEN
           (SELECT count(*) FROM jobs AS q WHERE q.status = 'queued' AND q.priority < j.priority
              AND (CAST(:models AS text[]) IS NULL OR q.model = ANY(CAST(:models AS text[]))))
         + (SELECT count(*) FROM jobs AS q
            WHERE q.status = 'queued' AND q.priority = j.priority
              AND (q.created_at, q.id) <= (j.created_at, j.id)
              AND (CAST(:models AS text[]) IS NULL OR q.model = ANY(CAST(:models AS text[]))))
       ELSE 0 END AS position
FROM jobs AS j
WHERE j.id = :id;

-- name: queue_front
-- The jobs running now (of :models) and the first :limit queued jobs in claim order up to :id (itself
-- last when it is among them), with their cost features: what the estimator schedules onto the
-- worker slots. One statement, so one snapshot: a job claimed a moment ago is running here, never
-- missing from both parts (a claim between two reads would leave a busy slot looking free).
WITH me AS (SELECT priority, created_at, id FROM jobs WHERE id = :id AND status = 'queued')
(SELECT false AS running, q.priority, q.created_at, q.id, q.model, q.task_type, q.items, q.audio_seconds,
        q.dit_steps, q.lm_mode, CAST(NULL AS text) AS stage, CAST(NULL AS float8) AS progress
 FROM jobs AS q, me
 WHERE q.status = 'queued' AND (q.priority, q.created_at, q.id) <= (me.priority, me.created_at, me.id)
   AND (CAST(:models AS text[]) IS NULL OR q.model = ANY(CAST(:models AS text[])))
 ORDER BY q.priority, q.created_at, q.id
 LIMIT :limit)
UNION ALL
(SELECT true, r.priority, r.created_at, r.id, r.model, r.task_type, r.items, r.audio_seconds, r.dit_steps,
        r.lm_mode, r.stage, r.progress
 FROM jobs AS r
 WHERE r.lease_expires_at IS NOT NULL AND r.status = 'running'
   AND (CAST(:models AS text[]) IS NULL OR r.model = ANY(CAST(:models AS text[]))))
ORDER BY running, priority, created_at, id;

-- name: queue_ahead_total
-- How many queued jobs are ahead of :id (itself included) and their priced seconds: :costs maps a
-- model to its coefficient array (see acestep_job_seconds, migration 0004), :default_costs prices
-- the other models.
WITH me AS (SELECT priority, created_at, id FROM jobs WHERE id = :id AND status = 'queued'),
costs AS MATERIALIZED (
    SELECT m.key AS model,
           ARRAY(SELECT CAST(e.v AS float8) FROM jsonb_array_elements_text(m.value) WITH ORDINALITY AS e(v, i)
                 ORDER BY e.i) AS k
    FROM jsonb_each(CAST(:costs AS jsonb)) AS m
)
SELECT count(*) AS jobs,
       COALESCE(sum(acestep_job_seconds(COALESCE(c.k, CAST(:default_costs AS float8[])), q.task_type, q.items,
                                        q.audio_seconds, q.dit_steps, q.lm_mode)), 0) AS seconds
FROM jobs AS q CROSS JOIN me LEFT JOIN costs AS c ON c.model = q.model
WHERE q.status = 'queued' AND (q.priority, q.created_at, q.id) <= (me.priority, me.created_at, me.id)
  AND (CAST(:models AS text[]) IS NULL OR q.model = ANY(CAST(:models AS text[])));

-- name: cost_samples
-- Recent successful jobs with their stage timings: the cost model's training data.
SELECT model, task_type, items, audio_seconds, dit_steps, lm_mode, timings,
       jsonb_typeof(request->'audio_duration') = 'number' AS duration_given,
       CAST(EXTRACT(EPOCH FROM finished_at - started_at) AS float8) AS seconds
FROM jobs
WHERE finished_at IS NOT NULL AND status = 'succeeded' AND timings IS NOT NULL
ORDER BY finished_at DESC
LIMIT :limit;

-- name: queue_depth
-- What waits and what runs, for /metrics (handler/metrics.py): queued jobs per model, counted on
-- ix_jobs_queue (`model` is INCLUDEd: index-only), and running jobs per model and worker, on
-- ix_jobs_lease (as few as the worker slots). Finished jobs are left out: counting them would read
-- every retained row at each scrape.
SELECT 'queued' AS status, model, CAST(NULL AS text) AS worker_id, count(*) AS jobs
FROM jobs
WHERE status = 'queued'
GROUP BY model
UNION ALL
SELECT 'running' AS status, model, worker_id, count(*) AS jobs
FROM jobs
WHERE lease_expires_at IS NOT NULL AND status = 'running'
GROUP BY model, worker_id;

-- name: live_capacity
-- Job slots of workers that heartbeated recently and can take work.
WITH clock AS (SELECT COALESCE(CAST(:now AS timestamptz), now()) AS now)
SELECT COALESCE(sum(w.capacity), 0) AS slots, count(*) AS workers
FROM workers AS w, clock
WHERE w.heartbeat_at > clock.now - make_interval(secs => CAST(:stale_seconds AS float8))
  AND w.state IN ('READY', 'BUSY');

-- name: stats
WITH clock AS (SELECT COALESCE(CAST(:now AS timestamptz), now()) AS now)
SELECT
    (SELECT COALESCE(jsonb_object_agg(status, n), '{}'::jsonb)
     FROM (SELECT status, count(*) AS n FROM jobs
           WHERE CAST(:owner AS text) IS NULL OR owner = CAST(:owner AS text)
           GROUP BY status) AS per_status) AS counts,
    (SELECT count(*) FROM jobs WHERE status = 'queued') AS queue_depth,
    (SELECT count(*) FROM jobs, clock WHERE lease_expires_at < clock.now) AS expired_leases,  -- running only (a CHECK)
    (SELECT count(*) FROM workers AS w, clock
     WHERE w.heartbeat_at > clock.now - make_interval(secs => CAST(:stale_seconds AS float8))) AS live_workers,
    (SELECT avg(EXTRACT(EPOCH FROM r.finished_at - r.started_at))
     FROM (SELECT finished_at, started_at FROM jobs
           WHERE finished_at IS NOT NULL AND status = 'succeeded'
           ORDER BY finished_at DESC LIMIT 1000) AS r) AS avg_job_seconds;

-- name: prune_finished
-- Delete up to :limit finished jobs older than the TTL; returns their ids (their objects go next).
WITH clock AS (SELECT COALESCE(CAST(:now AS timestamptz), now()) AS now),
doomed AS (
    SELECT j.id
    FROM jobs AS j, clock
    WHERE j.finished_at IS NOT NULL
      AND j.finished_at < clock.now - make_interval(secs => CAST(:ttl_seconds AS float8))
      AND j.status IN ('succeeded', 'failed', 'canceled')
    ORDER BY j.finished_at
    LIMIT :limit
    FOR UPDATE OF j SKIP LOCKED
)
DELETE FROM jobs AS j USING doomed
WHERE j.id = doomed.id
RETURNING j.id;

-- name: upsert_worker
WITH clock AS (SELECT COALESCE(CAST(:now AS timestamptz), now()) AS now)
INSERT INTO workers (id, host, capacity, models, state, started_at, heartbeat_at)
SELECT :id, :host, :capacity, CAST(:models AS jsonb), :state, clock.now, clock.now FROM clock
ON CONFLICT (id) DO UPDATE
SET host = EXCLUDED.host, capacity = EXCLUDED.capacity, models = EXCLUDED.models,
    state = EXCLUDED.state, heartbeat_at = EXCLUDED.heartbeat_at
RETURNING id;

-- name: touch_worker
WITH clock AS (SELECT COALESCE(CAST(:now AS timestamptz), now()) AS now)
UPDATE workers AS w
SET heartbeat_at = clock.now, state = COALESCE(CAST(:state AS text), w.state)
FROM clock
WHERE w.id = :id
RETURNING w.id;

-- name: remove_worker
DELETE FROM workers WHERE id = :id RETURNING id;

-- name: list_workers
-- `alive`: heartbeat within :stale_seconds (a worker that died without deregistering is not).
WITH clock AS (SELECT COALESCE(CAST(:now AS timestamptz), now()) AS now)
SELECT id, host, capacity, models, state, started_at, heartbeat_at,
       heartbeat_at > clock.now - make_interval(secs => CAST(:stale_seconds AS float8)) AS alive
FROM workers, clock ORDER BY id;

-- name: list_jobs
-- One page of an owner's jobs, newest first (ties on created_at by id). :before_created_at and
-- :before_id are the last row seen (both NULL for the first page); the redundant `created_at <=`
-- lets the (owner, created_at) index bound the scan.
SELECT id, status, created_at, started_at, finished_at, error
FROM jobs
WHERE owner = :owner
  AND (CAST(:before_created_at AS timestamptz) IS NULL
       OR (created_at <= CAST(:before_created_at AS timestamptz)
           AND (created_at, id) < (CAST(:before_created_at AS timestamptz), CAST(:before_id AS uuid))))
ORDER BY created_at DESC, id DESC
LIMIT :limit;

-- name: insert_api_key
INSERT INTO api_keys (id, name, key_hash, max_queued) VALUES (:id, :name, :key_hash, :max_queued)
RETURNING id;

-- name: find_api_key
SELECT id, name, max_queued FROM api_keys WHERE key_hash = :key_hash AND revoked_at IS NULL;

-- name: revoke_api_key
-- The key stops working (API processes notice within their cache's few seconds); its jobs stay.
WITH clock AS (SELECT COALESCE(CAST(:now AS timestamptz), now()) AS now)
UPDATE api_keys SET revoked_at = COALESCE(revoked_at, clock.now)
FROM clock
WHERE id = :id
RETURNING id;

-- name: claim_webhooks
-- Take due deliveries; each claim pushes next_attempt_at out by the lease, so a dispatcher that dies
-- mid-POST leaves the delivery to be retried, and two dispatchers never send one at once.
WITH clock AS (SELECT COALESCE(CAST(:now AS timestamptz), now()) AS now),
due AS (
    SELECT w.id
    FROM webhook_outbox AS w, clock
    WHERE w.delivered_at IS NULL AND w.gave_up_at IS NULL AND w.next_attempt_at <= clock.now
    ORDER BY w.next_attempt_at
    LIMIT :limit
    FOR UPDATE OF w SKIP LOCKED
)
UPDATE webhook_outbox AS w
SET attempts = w.attempts + 1,
    next_attempt_at = clock.now + make_interval(secs => CAST(:lease_seconds AS float8))
FROM due, clock
WHERE w.id = due.id
RETURNING w.id, w.job_id, w.url, w.event, w.attempts;

-- name: webhook_delivered
WITH clock AS (SELECT COALESCE(CAST(:now AS timestamptz), now()) AS now)
UPDATE webhook_outbox AS w
SET delivered_at = clock.now, last_error = NULL
FROM clock
WHERE w.id = :id AND w.attempts = :attempts
RETURNING w.id;

-- name: webhook_failed
-- Retry after a doubling backoff, or give up after :max_attempts.
WITH clock AS (SELECT COALESCE(CAST(:now AS timestamptz), now()) AS now)
UPDATE webhook_outbox AS w
SET last_error = :error,
    next_attempt_at = clock.now + make_interval(secs => LEAST(
        CAST(:retry_base_seconds AS float8) * power(2, w.attempts - 1), CAST(:retry_max_seconds AS float8))),
    gave_up_at = CASE WHEN w.attempts >= :max_attempts THEN clock.now END
FROM clock
WHERE w.id = :id AND w.attempts = :attempts
RETURNING w.gave_up_at;

-- name: queue_checkpoints
-- A rank snapshot of the queue: the first job of each priority and every :step-th job, with its
-- rank and the priced seconds of work up to and including it (:costs and :default_costs as in
-- queue_ahead_total). One pass in claim order.
WITH costs AS MATERIALIZED (
    SELECT m.key AS model,
           ARRAY(SELECT CAST(e.v AS float8) FROM jsonb_array_elements_text(m.value) WITH ORDINALITY AS e(v, i)
                 ORDER BY e.i) AS k
    FROM jsonb_each(CAST(:costs AS jsonb)) AS m
),
ranked AS (
    SELECT q.priority, q.created_at, q.id,
           row_number() OVER claim_order AS rank,
           row_number() OVER (PARTITION BY q.priority ORDER BY q.created_at, q.id) AS rank_in_priority,
           sum(acestep_job_seconds(COALESCE(c.k, CAST(:default_costs AS float8[])), q.task_type, q.items,
                                   q.audio_seconds, q.dit_steps, q.lm_mode)) OVER claim_order AS seconds
    FROM jobs AS q LEFT JOIN costs AS c ON c.model = q.model
    WHERE q.status = 'queued' AND (CAST(:models AS text[]) IS NULL OR q.model = ANY(CAST(:models AS text[])))
    WINDOW claim_order AS (ORDER BY q.priority, q.created_at, q.id)
)
SELECT priority, created_at, id, rank, seconds
FROM ranked
WHERE rank % :step = 1 OR rank_in_priority = 1
ORDER BY priority, created_at, id;

-- name: queue_gap
-- Queued jobs of one priority after a checkpoint up to a job (both bounds in claim order): how many,
-- and their priced seconds.
WITH costs AS MATERIALIZED (
    SELECT m.key AS model,
           ARRAY(SELECT CAST(e.v AS float8) FROM jsonb_array_elements_text(m.value) WITH ORDINALITY AS e(v, i)
                 ORDER BY e.i) AS k
    FROM jsonb_each(CAST(:costs AS jsonb)) AS m
)
SELECT count(*) AS jobs,
       COALESCE(sum(acestep_job_seconds(COALESCE(c.k, CAST(:default_costs AS float8[])), q.task_type, q.items,
                                        q.audio_seconds, q.dit_steps, q.lm_mode)), 0) AS seconds
FROM jobs AS q LEFT JOIN costs AS c ON c.model = q.model
WHERE q.status = 'queued' AND q.priority = :priority
  AND (q.created_at, q.id) > (CAST(:after_created_at AS timestamptz), CAST(:after_id AS uuid))
  AND (q.created_at, q.id) <= (CAST(:upto_created_at AS timestamptz), CAST(:upto_id AS uuid))
  AND (CAST(:models AS text[]) IS NULL OR q.model = ANY(CAST(:models AS text[])));

-- name: count_api_keys
SELECT count(*) AS active FROM api_keys WHERE revoked_at IS NULL;

-- name: jobs_of_objects
-- What the orphan sweep needs of the jobs whose folders it found: status, result and inputs.
SELECT id, status, result, request->'inputs' AS inputs
FROM jobs
WHERE id = ANY(CAST(:ids AS uuid[]));

-- name: record_first_eta
-- The finish the first ETA given for a job promised (the submit answer's estimate), for the ETA
-- error in /metrics; later estimates leave it as it was.
UPDATE jobs
SET eta_predicted_at = COALESCE(CAST(:now AS timestamptz), now()) + make_interval(secs => CAST(:eta AS float8))
WHERE id = :id AND eta_predicted_at IS NULL;

-- name: eta_errors
-- How far the first ETAs of the jobs that succeeded in the last :window seconds were off, per model: the median and
-- p90 of |finished - predicted| in seconds and relative to the job's wait (submit to finish). On
-- ix_jobs_finished (a range of the last window's finishes).
SELECT model, count(*) AS jobs,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY error) AS p50_seconds,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY error) AS p90_seconds,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY error / wait) AS p50_ratio,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY error / wait) AS p90_ratio
FROM (
    SELECT model,
           abs(extract(epoch FROM finished_at - eta_predicted_at)) AS error,
           GREATEST(extract(epoch FROM finished_at - created_at), 0.001) AS wait
    FROM jobs
    WHERE finished_at IS NOT NULL
      AND finished_at >= COALESCE(CAST(:now AS timestamptz), now()) - make_interval(secs => CAST(:window AS float8))
      AND status = 'succeeded' AND eta_predicted_at IS NOT NULL
) AS finished
GROUP BY model;
