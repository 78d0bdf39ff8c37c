//! redis-streamd: one consume loop per Redis stream, one handler process per entry.
//!
//! The binary (`main.rs`) only parses the command line and maps errors to exit codes;
//! everything it runs lives in these modules so the loops can be driven from tests.
//!
//! - [`config`]: the TOML schema, defaults and validation.
//! - [`daemon`]: connections, one loop per stream, shutdown order.
//! - [`consumer`]: the consume loop: backpressure, entry tasks, retries.
//! - [`handler`]: handler processes: spawn, stdin, output, timeouts, process groups.
//! - [`payload`]: what a handler reads on stdin.
//! - [`ack`] and [`dlq`]: settling entries in Redis.
//! - [`redis`]: fred clients and stream command replies.
//! - [`shutdown`] and [`signals`]: the two-stage stop.
//! - [`worker`]: long-lived handler processes (`mode = "worker"`).
//! - [`metrics`]: Prometheus metrics and the health endpoints.
//! - [`notify`]: systemd readiness, status and watchdog.
//! - [`reaper`]: reaping orphaned grandchildren (child subreaper, PID 1 in containers).
//! - [`logging`]: text or JSON log lines.

pub mod ack;
pub mod config;
pub mod consumer;
pub mod daemon;
pub mod dlq;
pub mod handler;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod payload;
pub mod reaper;
pub mod redis;
pub mod shutdown;
pub mod signals;
#[cfg(test)]
mod test_support;
pub mod worker;
