//! Running as a service: signals and the two-stage shutdown, reaping orphans, systemd
//! notifications, metrics and health endpoints, and log output.

pub(crate) mod http;
pub mod logging;
pub(crate) mod metrics;
pub(crate) mod notify;
pub(crate) mod reaper;
pub(crate) mod shutdown;
pub(crate) mod signals;
