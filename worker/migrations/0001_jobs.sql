-- The shared job queue of every replica (`serve --job-store postgres://…`).
-- A job row is the job: its request (the wire GenerateRequest, seed fixed at acceptance), its
-- state, the lease of the pod running it, and its progress. Its events are an append-only log
-- any pod streams from; the terminal event (images, timings, reason) is written in the same
-- transaction as the terminal state, fenced by the attempt that holds the lease.

CREATE TABLE jhakaas_jobs (
    id                text PRIMARY KEY,
    seq               bigserial NOT NULL UNIQUE,
    request_id        text UNIQUE,
    model             text NOT NULL,
    request           bytea NOT NULL,
    seed              bigint NOT NULL,
    state             text NOT NULL DEFAULT 'queued'
                      CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    -- Incremented by every claim; every write of a running job is fenced by it.
    attempt           integer NOT NULL DEFAULT 0,
    -- Leases that expired (the pod died or lost the database); at the limit the job fails.
    failures          integer NOT NULL DEFAULT 0,
    lease_owner       text,
    lease_until       timestamptz,
    cancel_reason     text,
    progress_step     integer,
    progress_total    integer,
    progress_timestep double precision,
    error             text NOT NULL DEFAULT '',
    deadline_at       timestamptz,
    submitted_at      timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz
);

CREATE INDEX jhakaas_jobs_queued ON jhakaas_jobs (seq) WHERE state = 'queued';
CREATE INDEX jhakaas_jobs_leases ON jhakaas_jobs (lease_until) WHERE state = 'running';
CREATE INDEX jhakaas_jobs_finished ON jhakaas_jobs (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE jhakaas_job_events (
    n        bigserial PRIMARY KEY,
    job_id   text NOT NULL REFERENCES jhakaas_jobs (id) ON DELETE CASCADE,
    terminal boolean NOT NULL DEFAULT false,
    -- A jhakaas.worker.v1.JobEvent, protobuf-encoded.
    event    bytea NOT NULL
);

CREATE INDEX jhakaas_job_events_by_job ON jhakaas_job_events (job_id, n);

-- Wake-ups, so nobody waits for a poll: a job entering or leaving the queue notifies idle
-- engines and queued watchers (`jhakaas_jobs`), an appended event its watchers
-- (`jhakaas_events`, payload the job id). Polling stays as the fallback.
CREATE FUNCTION jhakaas_notify_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('jhakaas_jobs', NEW.id);
    RETURN NULL;
END $$;

CREATE TRIGGER jhakaas_jobs_queue_changed
    AFTER INSERT OR UPDATE OF state ON jhakaas_jobs
    FOR EACH ROW EXECUTE FUNCTION jhakaas_notify_jobs();

CREATE FUNCTION jhakaas_notify_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('jhakaas_events', NEW.job_id);
    RETURN NULL;
END $$;

CREATE TRIGGER jhakaas_job_events_appended
    AFTER INSERT ON jhakaas_job_events
    FOR EACH ROW EXECUTE FUNCTION jhakaas_notify_events();
