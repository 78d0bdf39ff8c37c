//! redis-streamd: one consume loop per Redis stream, one handler process per entry (or a
//! pool of long-lived workers).
//!
//! The binary (`main.rs`) only parses the command line and maps errors to exit codes;
//! everything it runs lives in these modules so the loops can be driven from tests.
//! README.md's "Architecture" section describes how one entry flows through them.
//!
//! - [`app`] and [`error`]: running the daemon as a process, and every reason it exits
//!   non-zero with its exit code.
//! - [`config`]: the TOML schema, defaults, validation and locating keys for errors.
//! - [`supervisor`]: connections, one loop per stream, reload, shutdown order.
//! - [`stream`]: the consume loop: reads, slots, settling (ack / retry / dead-letter),
//!   recovery of pending entries, ack batching, the DLQ and the payload.
//! - [`exec`]: handler processes: per-entry runs and the worker pool.
//! - [`redis`]: fred clients, stream commands and reply decoding.
//! - [`backoff`] and [`identity`]: the one retry backoff and the one (stream, group,
//!   consumer) type, shared by all of the above.
//! - [`ops`]: signals and shutdown, reaper, sd_notify, metrics and health, logging.
//! - [`admin`]: the operator commands `status` and `dlq ls|show|stats|replay|purge`.

pub mod admin;
pub mod app;
pub(crate) mod backoff;
pub mod config;
pub mod error;
pub mod exec;
pub(crate) mod identity;
pub mod ops;
pub(crate) mod redis;
pub(crate) mod stream;
pub(crate) mod supervisor;
#[cfg(test)]
mod test_support;
