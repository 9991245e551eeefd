//! The PostgreSQL store in-process against a throwaway cluster, the engine played by the test:
//! submit and idempotency, queue positions, cancel of queued and running jobs, claiming and
//! fencing, exactly one terminal event, lease expiry and the attempt limit, drain.

use super::*;
use crate::serve::engine::models::ModelSpec;
use crate::serve::job::events::{EncodedImage, JobState, JobTimings};
use crate::serve::job::store::JobEvent;
use jhakaas_model_manager::{ModelSource, Progress};
use jhakaas_proto::v1 as pb;
use jhakaas_tests::postgres::Postgres;

fn table() -> Arc<ModelTable> {
    let spec = ModelSpec {
        name: "m".into(),
        source: ModelSource::Local(jhakaas_tests::fixtures().join("models/sd1-tiny")),
        vae: None,
        defaults: Default::default(),
    };
    Arc::new(ModelTable::new(vec![spec], "m".into()))
}

fn limits() -> Limits {
    Limits {
        max_pixels: 1 << 20,
        max_steps: 50,
        max_images: 4,
        max_init_image_bytes: 1 << 20,
    }
}

/// A lease no test outlives: nothing expires unless a test expires it, however slow the
/// machine (a short lease let a live pod's renewal race the test's expiry, and hang).
const LONG_LEASE_MS: u64 = 60_000;

fn config() -> PgConfig {
    PgConfig {
        max_queue: 3,
        result_ttl: Duration::from_secs(600),
        max_retained_jobs: 100,
        max_retained_bytes: 1 << 30,
        lease: Duration::from_millis(LONG_LEASE_MS),
        max_attempts: 2,
        poll: Duration::from_millis(20),
    }
}

fn accepted(request_id: &str) -> Accepted {
    let wire = pb::GenerateRequest {
        request_id: request_id.into(),
        prompt: "p".into(),
        steps: 3,
        seed: Some(5),
        ..Default::default()
    };
    crate::serve::api::convert::accept(wire, &table(), &limits(), None).unwrap()
}

async fn store(pg: &Postgres) -> PgJobs {
    PgJobs::connect(&pg.url, config(), table(), limits())
        .await
        .unwrap()
}

/// Claims the next job on a blocking thread, as the engine does. Fails the test (and stops
/// the claiming thread) if no job comes within 30 s instead of waiting forever.
async fn claim(jobs: &PgJobs) -> Arc<crate::serve::job::store::Job> {
    let source = jobs.source();
    let claiming = tokio::task::spawn_blocking({
        let source = source.clone();
        move || source.next()
    });
    match tokio::time::timeout(Duration::from_secs(30), claiming).await {
        Ok(claimed) => claimed.unwrap().expect("a job"),
        Err(_) => {
            source.close();
            panic!("no job was claimed within 30 s");
        }
    }
}

/// Expires `id`'s lease now, as if its pod went silent, and runs one round of maintenance.
async fn lose_lease(pg: &Postgres, jobs: &PgJobs, id: &str) {
    pg.query(&format!(
        "UPDATE jhakaas_jobs SET lease_until = now() - interval '1 second' WHERE id = '{id}'"
    ));
    maintain_once(&jobs.pool, &jobs.config).await.unwrap();
}

async fn done(jobs: &PgJobs, job: &Arc<crate::serve::job::store::Job>) {
    let (source, job) = (jobs.source(), job.clone());
    tokio::task::spawn_blocking(move || source.done(&job))
        .await
        .unwrap();
}

fn state(job: &JobView) -> JobState {
    job.snapshot.state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_claim_run_cancel_and_expire() {
    let pg = Postgres::start();
    let jobs = store(&pg).await;

    // Submit, idempotency, queue positions and the fleet-wide queue bound.
    let a = jobs.submit(accepted("a")).await.unwrap();
    assert_eq!(
        (state(&a), a.snapshot.queue_position, a.seed),
        (JobState::Queued, 0, 5)
    );
    assert_eq!(jobs.submit(accepted("a")).await.unwrap().id, a.id);
    let b = jobs.submit(accepted("b")).await.unwrap();
    assert_eq!(b.snapshot.queue_position, 1);
    let c = jobs.submit(accepted("")).await.unwrap();
    let full = jobs.submit(accepted("d")).await.unwrap_err();
    assert!(matches!(full, JobError::QueueFull { .. }), "{full:?}");

    // Cancelling a queued job ends it at once with one terminal event; the queue renumbers.
    let cancelled = jobs.cancel(&b.id).await.unwrap();
    assert_eq!(state(&cancelled), JobState::Cancelled);
    assert_eq!(jobs.get(&c.id).await.unwrap().snapshot.queue_position, 1);
    assert_eq!(
        jobs.cancel("nope").await.unwrap_err(),
        JobError::NotFound("nope".into())
    );

    // The engine claims the oldest; its events reach the row and the log.
    let job = claim(&jobs).await;
    assert_eq!(job.id, a.id);
    assert_eq!(job.request.params.seed, Some(5));
    job.emit(JobEvent::Started);
    job.emit(JobEvent::Progress(Progress {
        step: 1,
        total_steps: 3,
        timestep: 999.0,
    }));
    let image = EncodedImage {
        data: vec![1, 2, 3],
        mime_type: "image/png",
        width: 64,
        height: 64,
        seed: 5,
    };
    job.emit(JobEvent::Completed {
        images: Arc::new(vec![image]),
        timings: JobTimings::default(),
    });
    done(&jobs, &job).await;
    let finished = jobs.get(&a.id).await.unwrap();
    assert_eq!(state(&finished), JobState::Succeeded);
    assert_eq!(finished.snapshot.images[0].data, vec![1, 2, 3]);
    assert_eq!(finished.snapshot.progress.unwrap().step, 1);
    // A second terminal event changes nothing.
    job.emit(JobEvent::Failed {
        reason: "late".into(),
        timings: JobTimings::default(),
    });
    let terminal = |id: &str| {
        pg.query(&format!(
            "SELECT count(*) FROM jhakaas_job_events WHERE job_id = '{id}' AND terminal"
        ))
    };
    assert_eq!(terminal(&a.id), "1");

    // A running job is cancelled through the row: the engine sees it with its next write.
    let running = claim(&jobs).await;
    assert_eq!(running.id, c.id);
    jobs.cancel(&c.id).await.unwrap();
    running.emit(JobEvent::Progress(Progress {
        step: 1,
        total_steps: 3,
        timestep: 999.0,
    }));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !running.cancel_requested() {
        assert!(Instant::now() < deadline, "cancel never reached the engine");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(running.cancel_reason(), "cancelled by client");
    running.emit(JobEvent::Cancelled {
        reason: running.cancel_reason(),
        timings: JobTimings::default(),
    });
    done(&jobs, &running).await;
    assert_eq!(state(&jobs.get(&c.id).await.unwrap()), JobState::Cancelled);
    assert_eq!(terminal(&c.id), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_requeues_then_fails_and_the_stale_claim_is_fenced() {
    let pg = Postgres::start();
    let jobs = store(&pg).await;
    let a = jobs.submit(accepted("lease")).await.unwrap();

    // A claim whose pod goes silent: its lease runs out, the job is queued again.
    let first = claim(&jobs).await;
    lose_lease(&pg, &jobs, &a.id).await;
    let second = claim(&jobs).await;
    assert_eq!(second.id, a.id);
    // The stale first claim cannot end the job now owned by the second.
    first.emit(JobEvent::Failed {
        reason: "stale".into(),
        timings: JobTimings::default(),
    });
    done(&jobs, &first).await;
    let now = jobs.get(&a.id).await.unwrap();
    assert_eq!(state(&now), JobState::Running, "{}", now.snapshot.error);

    // A second lost lease reaches max_attempts (2): the job fails with the reason.
    lose_lease(&pg, &jobs, &a.id).await;
    let failed = jobs.get(&a.id).await.unwrap();
    assert_eq!(state(&failed), JobState::Failed, "{failed:?}");
    assert!(
        failed
            .snapshot
            .error
            .contains("lost with its worker 2 times"),
        "{}",
        failed.snapshot.error
    );
    // The second claim's own end is fenced off too; still exactly one terminal event.
    second.emit(JobEvent::Cancelled {
        reason: "late".into(),
        timings: JobTimings::default(),
    });
    done(&jobs, &second).await;
    assert_eq!(
        pg.query(&format!(
            "SELECT count(*) FROM jhakaas_job_events WHERE job_id = '{}' AND terminal",
            a.id
        )),
        "1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_hands_the_running_job_back_and_leaves_the_queue() {
    let pg = Postgres::start();
    let jobs = Arc::new(store(&pg).await);
    let a = jobs.submit(accepted("run")).await.unwrap();
    let b = jobs.submit(accepted("wait")).await.unwrap();
    let running = claim(&jobs).await;
    running.emit(JobEvent::Started);
    // The engine: stops at the next step once asked, as the real loop does.
    let engine = {
        let (jobs, running) = (jobs.clone(), running.clone());
        tokio::spawn(async move {
            while !running.cancel_requested() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            running.emit(JobEvent::Cancelled {
                reason: running.cancel_reason(),
                timings: JobTimings::default(),
            });
            done(&jobs, &running).await;
        })
    };
    jobs.drain(Duration::from_millis(200)).await;
    engine.await.unwrap();
    let refused = jobs.submit(accepted("late")).await.unwrap_err();
    assert_eq!(refused, JobError::Draining);
    for id in [&a.id, &b.id] {
        let job = jobs.get(id).await.unwrap();
        assert_eq!(state(&job), JobState::Queued, "{job:?}");
    }
    assert_eq!(
        pg.query(&format!(
            "SELECT failures FROM jhakaas_jobs WHERE id = '{}'",
            a.id
        )),
        "0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_go_after_their_ttl_or_when_the_caps_are_reached() {
    let pg = Postgres::start();
    let jobs = store(&pg).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let a = jobs.submit(accepted(&format!("keep-{i}"))).await.unwrap();
        let job = claim(&jobs).await;
        job.emit(JobEvent::Completed {
            images: Arc::new(vec![EncodedImage {
                data: vec![7; 1000],
                mime_type: "image/png",
                width: 64,
                height: 64,
                seed: 5,
            }]),
            timings: JobTimings::default(),
        });
        done(&jobs, &job).await;
        ids.push(a.id);
    }
    let count = || pg.query("SELECT count(*) FROM jhakaas_jobs");
    // Under every cap: nothing goes.
    sql::sweep(&jobs.pool, Duration::from_secs(600), 10, 1 << 20)
        .await
        .unwrap();
    assert_eq!(count(), "3");
    // Room for two jobs' events: the oldest goes.
    sql::sweep(&jobs.pool, Duration::from_secs(600), 10, 2500)
        .await
        .unwrap();
    assert_eq!(count(), "2");
    assert!(jobs.get(&ids[0]).await.is_err(), "the oldest was kept");
    // One finished job at most.
    sql::sweep(&jobs.pool, Duration::from_secs(600), 1, 1 << 20)
        .await
        .unwrap();
    assert_eq!(count(), "1");
    assert!(jobs.get(&ids[2]).await.is_ok(), "the newest went");
    // Past the TTL: gone, with its events.
    sql::sweep(&jobs.pool, Duration::ZERO, 10, 1 << 20)
        .await
        .unwrap();
    assert_eq!(count(), "0");
    assert_eq!(pg.query("SELECT count(*) FROM jhakaas_job_events"), "0");
}
