//! Jobs in domain types: the validated request, the job, its events and snapshot, the
//! in-memory store (a bounded queue with idempotency, cancellation and expiry) and the seam the
//! engine takes jobs from.

pub mod backend;
pub mod error;
pub mod events;
pub mod memory;
pub mod source;
pub mod store;
