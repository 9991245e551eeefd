//! The seam between the engine and where its jobs come from: the in-memory store of one
//! process, or the PostgreSQL queue shared by every replica. The engine takes a job, publishes
//! its events on the job's [`EventBus`](super::events::EventBus) and says when it is done; the
//! source decides what publishing means (watchers in this process, rows in a database).

use super::store::Job;
use std::sync::Arc;

/// Where the engine takes its jobs from.
pub trait JobSource: Send + Sync {
    /// Blocks until a job is this engine's to run; `None` once the source is closed (or, for
    /// a shared queue, draining) and nothing is left for this engine.
    fn next(&self) -> Option<Arc<Job>>;
    /// The engine ended `job` (its terminal event is published); returns once the source has
    /// recorded that end.
    fn done(&self, job: &Arc<Job>);
    /// No more jobs will be taken; the engine exits after its current one.
    fn close(&self);
}
