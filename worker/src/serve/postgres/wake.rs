//! Wake-ups from the database: one `LISTEN` connection per pod turns `NOTIFY`s into a wake
//! for the idle engine (a job was queued) and for watchers (a job's events or the queue
//! changed). A wake-up lost while the listener reconnects costs one poll interval, no more.

use crate::serve::events::lock;
use sqlx::postgres::{PgListener, PgPool};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// The pod's wake-ups.
pub struct Wake {
    queue: Mutex<u64>,
    queue_changed: Condvar,
    events: watch::Sender<u64>,
}

impl Wake {
    /// Starts listening on `pool`'s database.
    pub fn listen(pool: &PgPool) -> Arc<Wake> {
        let wake = Arc::new(Wake {
            queue: Mutex::new(0),
            queue_changed: Condvar::new(),
            events: watch::channel(0).0,
        });
        tokio::spawn(listen(pool.clone(), wake.clone()));
        wake
    }

    /// How many queue changes were seen so far.
    pub fn queue_generation(&self) -> u64 {
        *lock(&self.queue)
    }

    /// Blocks (on the engine thread) until the queue changes after `seen`, or `timeout`.
    pub fn wait_queue(&self, seen: u64, timeout: Duration) {
        let guard = lock(&self.queue);
        let _ = self
            .queue_changed
            .wait_timeout_while(guard, timeout, |g| *g == seen);
    }

    /// A receiver that changes whenever any job's events or the queue change.
    pub fn events(&self) -> watch::Receiver<u64> {
        self.events.subscribe()
    }

    fn queue_woke(&self) {
        *lock(&self.queue) += 1;
        self.queue_changed.notify_all();
    }

    fn events_woke(&self) {
        self.events.send_modify(|g| *g += 1);
    }
}

async fn listen(pool: PgPool, wake: Arc<Wake>) {
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "job store LISTEN connection failed; polling meanwhile");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = listener
            .listen_all(["jhakaas_jobs", "jhakaas_events"])
            .await
        {
            tracing::warn!(error = %e, "job store LISTEN failed; polling meanwhile");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        loop {
            match listener.recv().await {
                Ok(n) => {
                    if n.channel() == "jhakaas_jobs" {
                        wake.queue_woke();
                    }
                    wake.events_woke();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "job store LISTEN connection lost; reconnecting");
                    break;
                }
            }
        }
    }
}
