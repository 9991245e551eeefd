//! Wake-ups from the database: one `LISTEN` connection per pod turns `NOTIFY`s into a wake
//! for the idle engine (a job was queued) and for the watchers a change concerns (their job's
//! events, or the queue while their job waits)//! changed). A wake-up lost while the listener reconnects costs one poll interval, no more.

use crate::serve::job::events::lock;
use sqlx::postgres::{PgListener, PgPool};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;

/// What changed, as a watcher hears it.
#[derive(Debug, Clone)]
pub enum Notice {
    /// A job entered or left the queue (queue positions may have moved).
    Queue,
    /// This job's event log grew.
    Events(Arc<str>),
}

/// Notices buffered per watcher; one that falls behind re-reads its job (as on a wake).
const NOTICES: usize = 256;

/// The pod's wake-ups.
pub struct Wake {
    queue: Mutex<u64>,
    queue_changed: Condvar,
    notices: broadcast::Sender<Notice>,
}

impl Wake {
    /// Starts listening on `pool`'s database.
    pub fn listen(pool: &PgPool) -> Arc<Wake> {
        let wake = Arc::new(Wake {
            queue: Mutex::new(0),
            queue_changed: Condvar::new(),
            notices: broadcast::channel(NOTICES).0,
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

    /// A receiver of every notice; [`Wake::until_relevant`] filters it for one job.
    pub fn notices(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    /// Waits for a notice that concerns job `id`: its own events, or (while it is `queued`)
    /// a queue change. A receiver that lagged returns at once, so nothing is missed.
    pub async fn until_relevant(rx: &mut broadcast::Receiver<Notice>, id: &str, queued: bool) {
        loop {
            match rx.recv().await {
                Ok(Notice::Events(job)) if &*job == id => return,
                Ok(Notice::Queue) if queued => return,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => return,
                // The listener is gone: only the poll wakes the watcher now.
                Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
            }
        }
    }

    fn queue_woke(&self) {
        *lock(&self.queue) += 1;
        self.queue_changed.notify_all();
    }

    fn notify(&self, notice: Notice) {
        // No watcher subscribed is fine.
        let _ = self.notices.send(notice);
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
                        wake.notify(Notice::Queue);
                    } else {
                        wake.notify(Notice::Events(n.payload().into()));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "job store LISTEN connection lost; reconnecting");
                    break;
                }
            }
        }
    }
}
