//! Redis connections and the stream commands the daemon speaks.
//!
//! - [`connect`](mod@connect): building and connecting fred clients, watching their
//!   connections.
//! - [`commands`](mod@commands): [`StreamCommands`], every command of a consume loop.
//! - [`reply`](mod@reply): decoding replies into [`Entry`], [`PendingEntry`] and friends.
//! - [`error`](mod@error): [`RedisError`].

pub(crate) mod commands;
pub(crate) mod connect;
pub(crate) mod error;
pub(crate) mod reply;

pub use commands::StreamCommands;
pub use connect::{connect, watch_connection};
pub use error::RedisError;
pub use reply::{AutoClaim, ConsumerInfo, Entry, PendingEntry};
