//! Redis connections and the stream commands the daemon speaks.
//!
//! - [`url`](mod@url): the URL forms (standalone, Cluster, Sentinel, unix socket), parsed
//!   in full, and redaction of their secrets.
//! - [`tls`](mod@tls): the CA and client certificate of `rediss*://` connections.
//! - [`connect`](mod@connect): building and connecting fred clients, watching their
//!   connections.
//! - [`failover`](mod@failover): Sentinel's `+switch-master`, the primary in use, cluster
//!   primary changes.
//! - [`commands`](mod@commands): [`StreamCommands`], every command of a consume loop.
//! - [`dead_letter`](mod@dead_letter): the dead-letter write (a script: XADD, then XACK
//!   only if it worked).
//! - [`reply`](mod@reply): decoding replies into [`Entry`], [`PendingEntry`] and friends.
//! - [`error`](mod@error): [`RedisError`].

pub(crate) mod commands;
pub(crate) mod connect;
pub(crate) mod dead_letter;
pub(crate) mod error;
pub(crate) mod failover;
pub(crate) mod reply;
pub mod tls;
pub mod url;

pub use commands::StreamCommands;
pub use connect::{Connector, Role, connect, watch_connection};
pub use dead_letter::{DeadLetter, DlqWrite};
pub use error::RedisError;
pub use reply::{ConsumerInfo, Entry, parse_consumers_reply, parse_entries};
