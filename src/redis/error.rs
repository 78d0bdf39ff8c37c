//! Errors from talking to Redis, and the reply prefixes the daemon reacts to.

use std::time::Duration;

use fred::prelude::Error as FredError;

/// Errors from talking to Redis.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("invalid redis url: {0}")]
    Url(String),
    #[error("redis unreachable for {waited:?} (connect_timeout): {last}")]
    ConnectTimeout { waited: Duration, last: String },
    #[error("stopped while connecting to redis")]
    Stopped,
    #[error(transparent)]
    Command(#[from] FredError),
    #[error("unexpected reply to {command}: {reply}")]
    Reply {
        command: &'static str,
        reply: String,
    },
}

impl RedisError {
    /// The group (or its stream) was deleted under us: recreate it.
    pub fn is_nogroup(&self) -> bool {
        matches!(self, RedisError::Command(e) if e.details().starts_with("NOGROUP"))
    }

    /// The key holds something other than a stream: a configuration mistake that no
    /// retry can fix.
    pub fn is_wrongtype(&self) -> bool {
        matches!(self, RedisError::Command(e) if e.details().starts_with("WRONGTYPE"))
    }
}
