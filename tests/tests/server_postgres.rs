//! Many replicas on one PostgreSQL job store: real `serve` processes on the tiny fixture and a
//! throwaway PostgreSQL cluster. Any pod answers any job, one job per `request_id` across pods,
//! a `kill -9`ed pod's job finishes elsewhere with the same pixels, SIGTERM hands work to the
//! other replicas, and a soak with random kills loses and duplicates nothing.

use jhakaas_proto::v1 as pb;
use jhakaas_tests::postgres::Postgres;
use jhakaas_tests::server::{fixture_model, TestServer};
use pb::job_event::Event;
use pb::worker_client::WorkerClient;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// The terminal states.
const ENDED: &[pb::JobState] = &[
    pb::JobState::Succeeded,
    pb::JobState::Failed,
    pb::JobState::Cancelled,
];

/// Waits for `id` to end and asserts it succeeded.
async fn succeeded(client: &mut WorkerClient<Channel>, id: &str, within: Duration) -> pb::Job {
    let job = wait_state(client, id, ENDED, within).await;
    assert_eq!(
        job.state,
        pb::JobState::Succeeded as i32,
        "{id}: {}",
        job.error
    );
    job
}

/// A lease short enough that a killed pod's job reruns within seconds.
const LEASE: &str = "2s";

/// One test of this file at a time: each runs several replicas whose engines fill the CPU,
/// and two at once on a 2-core machine starve the lease renewals (every 0.67 s for the 2 s
/// lease) past the lease, so healthy pods would lose jobs they are running.
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

fn replica(pg: &Postgres, extra: &[&str]) -> TestServer {
    let model = fixture_model("tiny", "sd1-tiny");
    let mut args = vec![
        "--model",
        model.as_str(),
        "--job-store",
        pg.url.as_str(),
        "--job-lease",
        LEASE,
    ];
    args.extend_from_slice(extra);
    TestServer::start(&args)
}

async fn ready(pg: &Postgres, extra: &[&str]) -> TestServer {
    let s = replica(pg, extra);
    s.wait_ready().await;
    s
}

fn request(prompt: &str, steps: u32, side: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: prompt.into(),
        steps,
        width: side,
        height: side,
        seed: Some(7),
        ..Default::default()
    }
}

/// A job that runs for a few seconds on the tiny fixture (about 40 ms a step at 128²).
fn slow(prompt: &str) -> pb::GenerateRequest {
    request(prompt, 100, 128)
}

async fn get(client: &mut WorkerClient<Channel>, id: &str) -> pb::Job {
    client
        .get_job(pb::GetJobRequest { job_id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

async fn wait_state(
    client: &mut WorkerClient<Channel>,
    id: &str,
    want: &[pb::JobState],
    within: Duration,
) -> pb::Job {
    let deadline = Instant::now() + within;
    loop {
        let job = get(client, id).await;
        if want.iter().any(|w| job.state == *w as i32) {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} still {:?}, wanted {want:?}",
            job.state
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn png(job: &pb::Job) -> image::RgbImage {
    image::load_from_memory(&job.images[0].data)
        .unwrap()
        .to_rgb8()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_replica_answers_any_job_and_cancels_it() {
    let _serial = one_at_a_time().await;
    let pg = Postgres::start();
    let a = ready(&pg, &[]).await;
    let b = ready(&pg, &[]).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);

    // Submitted on A: B reports it, streams it and gets its images.
    let job = ca
        .submit_job(request("on a", 4, 64))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.seed, 7);
    let mut stream = cb
        .watch_job(pb::WatchJobRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut terminal = Vec::new();
    while let Some(e) = stream.next().await {
        let e = e.unwrap();
        if matches!(
            e.event,
            Some(Event::Completed(_) | Event::Failed(_) | Event::Cancelled(_))
        ) {
            terminal.push(e);
        }
    }
    assert_eq!(terminal.len(), 1, "exactly one terminal event");
    assert!(matches!(terminal[0].event, Some(Event::Completed(_))));
    let done = get(&mut cb, &job.job_id).await;
    assert_eq!(done.state, pb::JobState::Succeeded as i32);
    assert_eq!(done.images.len(), 1);
    assert!(done.timings.is_some());

    // A running job submitted on A is cancelled from B within a step or so.
    let long = ca.submit_job(slow("cancel me")).await.unwrap().into_inner();
    wait_state(
        &mut cb,
        &long.job_id,
        &[pb::JobState::Running],
        Duration::from_secs(30),
    )
    .await;
    cb.cancel_job(pb::CancelJobRequest {
        job_id: long.job_id.clone(),
    })
    .await
    .unwrap();
    let ended = wait_state(
        &mut ca,
        &long.job_id,
        &[pb::JobState::Cancelled],
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(ended.error, "cancelled by client");

    // Generate on B streams queued → started → every step → completed, whoever runs it.
    let mut events = cb
        .generate(request("streamed", 3, 64))
        .await
        .unwrap()
        .into_inner();
    let mut kinds = Vec::new();
    while let Some(e) = events.next().await {
        kinds.push(match e.unwrap().event.unwrap() {
            Event::Queued(_) => "queued",
            Event::ModelLoading(_) => "loading",
            Event::Started(_) => "started",
            Event::Progress(_) => "progress",
            Event::Completed(_) => "completed",
            Event::Failed(_) => "failed",
            Event::Cancelled(_) => "cancelled",
        });
    }
    let progress = kinds.iter().filter(|k| **k == "progress").count();
    assert_eq!(progress, 3, "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"completed"), "{kinds:?}");
    assert!(kinds.contains(&"started"), "{kinds:?}");

    // Unknown ids are NOT_FOUND on every replica.
    let missing = cb
        .get_job(pb::GetJobRequest {
            job_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_id_is_one_job_across_replicas() {
    let _serial = one_at_a_time().await;
    let pg = Postgres::start();
    let a = ready(&pg, &[]).await;
    let b = ready(&pg, &[]).await;
    let mut calls = Vec::new();
    for i in 0..16 {
        let server = if i % 2 == 0 { &a } else { &b };
        let mut client = server.client().await;
        calls.push(tokio::spawn(async move {
            let mut r = request("same id", 2, 64);
            r.request_id = "one-job".into();
            client.submit_job(r).await.unwrap().into_inner().job_id
        }));
    }
    let mut ids = Vec::new();
    for c in calls {
        ids.push(c.await.unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(
        pg.query("SELECT count(*) FROM jhakaas_jobs WHERE request_id = 'one-job'"),
        "1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_job_finishes_elsewhere_with_the_same_pixels() {
    let _serial = one_at_a_time().await;
    let pg = Postgres::start();
    let mut a = ready(&pg, &[]).await;
    let mut ca = a.client().await;

    // The reference: the same request (same seed), run to the end.
    let reference = ca
        .submit_job(request("identical", 60, 128))
        .await
        .unwrap()
        .into_inner();
    let reference = wait_state(
        &mut ca,
        &reference.job_id,
        &[pb::JobState::Succeeded],
        Duration::from_secs(120),
    )
    .await;

    // Only A runs, so A claims the job; kill -9 it mid-job, then B picks it up.
    let mut r = request("identical", 60, 128);
    r.request_id = "killed-mid-job".into();
    let job = ca.submit_job(r).await.unwrap().into_inner();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = get(&mut ca, &job.job_id).await;
        if j.progress.as_ref().is_some_and(|p| p.step >= 2) {
            break;
        }
        assert!(Instant::now() < deadline, "never progressed: {j:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.kill();
    let b = ready(&pg, &[]).await;
    let mut cb = b.client().await;
    let finished = succeeded(&mut cb, &job.job_id, Duration::from_secs(120)).await;
    assert_eq!(png(&finished), png(&reference), "the rerun's pixels differ");
    assert_eq!(
        pg.query(&format!(
            "SELECT attempt, failures FROM jhakaas_jobs WHERE id = '{}'",
            job.job_id
        )),
        "2|1",
        "one lost lease, one rerun"
    );
    assert_eq!(
        pg.query(&format!(
            "SELECT count(*) FROM jhakaas_job_events WHERE job_id = '{}' AND terminal",
            job.job_id
        )),
        "1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_queued_and_running_jobs_to_the_other_replicas() {
    let _serial = one_at_a_time().await;
    let pg = Postgres::start();
    let mut a = ready(&pg, &["--drain-timeout", "1s"]).await;
    let mut ca = a.client().await;
    let mut ids = Vec::new();
    for i in 0..4 {
        let r = slow(&format!("handed over {i}"));
        ids.push(ca.submit_job(r).await.unwrap().into_inner().job_id);
    }
    wait_state(
        &mut ca,
        &ids[0],
        &[pb::JobState::Running],
        Duration::from_secs(30),
    )
    .await;
    a.terminate();
    assert_eq!(a.wait_exit(Duration::from_secs(60)), Some(0));
    let b = ready(&pg, &[]).await;
    let mut cb = b.client().await;
    for id in &ids {
        succeeded(&mut cb, id, Duration::from_secs(300)).await;
    }
    // The running job went back to the queue rather than failing or being cancelled.
    assert_eq!(
        pg.query(&format!(
            "SELECT failures FROM jhakaas_jobs WHERE id = '{}'",
            ids[0]
        )),
        "0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_of_200_jobs_over_3_replicas_with_random_kills_loses_and_duplicates_nothing() {
    let _serial = one_at_a_time().await;
    let pg = Postgres::start();
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Some(ready(&pg, &["--max-queue", "1000"]).await));
    }
    const JOBS: usize = 200;
    let mut rng = jhakaas_tests::hostile::Rng(0x5eed);
    let mut ids = Vec::new();
    let mut kills = 0;
    for i in 0..JOBS {
        let k = i % 3;
        let server = match replicas[k].as_ref() {
            Some(s) => s,
            None => replicas.iter().flatten().next().expect("a live replica"),
        };
        let mut r = request(&format!("soak {i}"), 2, 64);
        r.request_id = format!("soak-{i}");
        r.seed = Some(i as u64);
        let mut client = server.client().await;
        let id = client
            .submit_job(r.clone())
            .await
            .unwrap()
            .into_inner()
            .job_id;
        // A retry of the same request id (as a client would after a timeout) is the same job.
        let again = client.submit_job(r).await.unwrap().into_inner().job_id;
        assert_eq!(id, again);
        ids.push(id);
        // Every 25 jobs, kill -9 one replica at random and start a fresh one in its place.
        if i % 25 == 24 {
            let victim = rng.below(3) as usize;
            if let Some(mut s) = replicas[victim].take() {
                s.kill();
                kills += 1;
            }
            replicas[victim] = Some(ready(&pg, &["--max-queue", "1000"]).await);
        }
    }
    let mut client = replicas[0].as_ref().unwrap().client().await;
    let mut done = 0;
    for id in &ids {
        succeeded(&mut client, id, Duration::from_secs(300)).await;
        done += 1;
    }
    let jobs = pg.query("SELECT count(*) FROM jhakaas_jobs");
    let duplicated_terminals = pg.query(
        "SELECT count(*) FROM (SELECT job_id FROM jhakaas_job_events WHERE terminal \
         GROUP BY job_id HAVING count(*) > 1) d",
    );
    let reruns = pg.query("SELECT count(*) FROM jhakaas_jobs WHERE attempt > 1");
    println!(
        "soak: {JOBS} jobs, {kills} kills, {done} succeeded, {jobs} rows, \
         {duplicated_terminals} with more than one terminal event, {reruns} rerun"
    );
    assert_eq!(done, JOBS, "lost jobs");
    assert_eq!(jobs, JOBS.to_string(), "duplicated or lost rows");
    assert_eq!(duplicated_terminals, "0");
}
