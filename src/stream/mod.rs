//! The consume loop: one per stream, with backpressure, retries, recovery and settling.
//!
//! Backpressure is a semaphore of read slots owned by the executor (`exec`):
//! `max_block_read` in exec mode; in worker mode `max_block_read` times the pool's
//! current prefetch depth. A read asks for exactly as many entries as there are free
//! slots (`max_block_read - in_flight` in exec mode) and each entry holds its slot until
//! its handler has finished with it, so no more than `max_block_read` handler processes
//! of a stream ever run at once. With no free slot the loop does not read; it waits.
//!
//! The loop owns every decision about an entry ([`settle`]): the executor only reports
//! how a run ended. A failed attempt does not hold a slot while it waits ([`retry`]).
//! On start the loop first re-reads its own pending list (id `0`), so a restarted daemon
//! with the same consumer name finishes what it had before it reads new entries; lost
//! deliveries, idle entries of dead consumers and due retries come back through
//! [`recovery`].
//!
//! - [`consume`]: the loop's state and its event dispatch; `read`: the read round and the
//!   blocking read; `upkeep`: refreshing what it holds, sampling, the drain.
//! - [`settle`]: pure decisions: admit an entry, settle a run.
//! - [`retry`]: the timer heap of waiting retries.
//! - [`order`]: per-key ordering (`order_by`): entries waiting behind their key.
//! - [`lease`]: keys held across the group (`order_scope = "group"`): the Lua steps.
//!   [`group`]: the loop's side of it.
//! - [`recovery`]: lost deliveries, XAUTOCLAIM, retry claims, idle consumers.
//! - [`ack`]: batched, retried XACKs. [`dlq`]: the dead-letter write.
//! - [`payload`]: what the handler reads on stdin.

pub(crate) mod ack;
pub(crate) mod consume;
pub(crate) mod dlq;
pub(crate) mod group;
pub(crate) mod lease;
pub(crate) mod order;
pub(crate) mod payload;
mod read;
pub(crate) mod recovery;
pub(crate) mod retry;
pub(crate) mod settle;
pub(crate) mod upkeep;

pub use consume::{LoopHooks, StreamLoop};
