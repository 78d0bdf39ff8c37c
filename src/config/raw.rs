//! The file as written: every key optional, so that a missing key is reported by
//! validation with a line number instead of by serde without one. The `expecting` texts
//! appear in type errors ("expected a [[streams]] table"), so they use the operator's words.

use std::collections::BTreeMap;

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a config file")]
pub(super) struct RawConfig {
    pub(super) redis: Option<RawRedis>,
    pub(super) daemon: Option<RawDaemon>,
    pub(super) streams: Option<Vec<RawStream>>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [redis] table")]
pub(super) struct RawRedis {
    pub(super) url: Option<String>,
    pub(super) connect_timeout: Option<String>,
    pub(super) tls_ca_file: Option<String>,
    pub(super) tls_cert_file: Option<String>,
    pub(super) tls_key_file: Option<String>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [daemon] table")]
pub(super) struct RawDaemon {
    pub(super) consumer: Option<String>,
    pub(super) shutdown_timeout: Option<String>,
    pub(super) metrics_listen: Option<String>,
}

/// Integers are read as `i64` so that 0 and negative values get our own message.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[streams]] table")]
pub(super) struct RawStream {
    pub(super) name: Option<String>,
    pub(super) group: Option<String>,
    pub(super) handler: Option<Vec<String>>,
    pub(super) mode: Option<String>,
    pub(super) max_block_read: Option<i64>,
    pub(super) worker_prefetch: Option<i64>,
    pub(super) block: Option<String>,
    pub(super) start_id: Option<String>,
    pub(super) payload: Option<String>,
    pub(super) payload_field: Option<String>,
    pub(super) handler_timeout: Option<String>,
    pub(super) max_attempts: Option<i64>,
    pub(super) retry_backoff: Option<String>,
    pub(super) retry_backoff_max: Option<String>,
    pub(super) dlq: Option<String>,
    pub(super) dlq_exit_codes: Option<Vec<i64>>,
    pub(super) env: Option<BTreeMap<String, String>>,
    pub(super) claim_interval: Option<String>,
    pub(super) claim_idle: Option<String>,
    pub(super) reap_idle: Option<String>,
    pub(super) order_by: Option<String>,
    pub(super) order_by_json: Option<String>,
    pub(super) order_scope: Option<String>,
    pub(super) order_waiting_max: Option<i64>,
}
