//! The executor seen by the consume loop: how an entry's payload reaches the handler
//! program, either a fresh process per attempt or a pool of long-lived workers.

pub(crate) mod handler;
pub(crate) mod worker;

use std::time::Duration;

/// Time between SIGTERM and SIGKILL for a handler's process group.
pub const KILL_GRACE: Duration = Duration::from_secs(5);
