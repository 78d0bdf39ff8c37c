//! Prometheus metrics: the registry, its encoding, and each stream's handles.
//!
//! The registry and the text encoding come from `prometheus-client`, the Prometheus
//! project's own Rust client. Every per-stream metric carries the labels `stream` and
//! `group`; a loop resolves its label set once ([`Metrics::stream`]) and then only touches
//! atomics (counters, gauges) or one short mutex (the histogram). They are served, with
//! the health endpoints, by [`super::http`].

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Upper bounds (seconds) of the handler duration buckets: from quick scripts to the
/// default 30 s `handler_timeout` and beyond.
const DURATION_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    stream: String,
    group: String,
}

type DurationFamily = Family<StreamLabels, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PrimaryLabels {
    address: String,
}

// Help texts, as Prometheus shows them.
const HELP_ENTRIES_READ: &str =
    "Entries delivered to this consumer by XREADGROUP, XAUTOCLAIM or a retry claim";
const HELP_ENTRIES_ACKED: &str = "Entries acknowledged (XACK) after their handler exited 0";
const HELP_FAILED_ATTEMPTS: &str =
    "Handler runs that failed: non-zero exit, signal, timeout or spawn failure";
const HELP_RETRIES: &str = "Failed entries scheduled for another attempt";
const HELP_DEAD_LETTERED: &str = "Entries moved to the dead-letter stream";
const HELP_ENTRIES_DELETED: &str = "Entries found deleted from the stream while this consumer held them (pending, waiting for a retry, or claimed); acked away or dropped from the pending list";
const HELP_RESOURCE_WAITS: &str = "Handler starts that failed for want of daemon resources (file descriptors, processes, memory); the entry waits and runs again without using up an attempt";
const HELP_ORDER_WAITING: &str =
    "Entries waiting behind an earlier entry with the same ordering key (order_by)";
const HELP_ORDER_KEYS_ACTIVE: &str =
    "Ordering keys with an entry in hand (running, waiting for a retry, or being dead-lettered)";
const HELP_ORDER_UNKEYED: &str =
    "Entries of an ordered stream without an ordering key (run unordered)";
const HELP_ORDER_HANDOVERS: &str = "Entries this consumer read and handed over to the consumer holding their key (order_scope = \"group\")";
const HELP_ORDER_TAKEOVERS: &str = "Keys this consumer took over, with their pending entries, from a consumer whose hold was not renewed within claim_idle (order_scope = \"group\")";
const HELP_ORDER_WAIT: &str =
    "Time entries waited behind an earlier entry with the same ordering key";
const HELP_HANDLER_DURATION: &str = "Wall time of handler runs, from spawn to exit";
const HELP_HANDLERS_IN_FLIGHT: &str =
    "Entries being handled now (worker mode: handed to workers, prefetched included)";
const HELP_GROUP_LAG: &str =
    "Entries in the stream not yet delivered to the consumer group (XINFO GROUPS lag)";
const HELP_GROUP_PENDING: &str =
    "Entries delivered to the group but not yet acknowledged (XPENDING count)";
const HELP_REDIS_RECONNECTS: &str = "Times a Redis connection was re-established";
const HELP_REDIS_FAILOVERS: &str = "Primary changes followed: a Sentinel +switch-master of the monitored primary, or a Redis Cluster primary added or removed";
const HELP_REDIS_PRIMARY: &str = "1 for the primary in use behind Sentinel, by address (host:port)";

/// Registers `metric` as `redis_streamd_<name>` and returns it.
fn register<M>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M
where
    M: prometheus_client::registry::Metric + Clone,
{
    registry.register(name, help, metric.clone());
    metric
}

/// Registers a per-stream histogram of seconds as `redis_streamd_<name>_seconds`.
fn seconds(registry: &mut Registry, name: &str, help: &str) -> DurationFamily {
    let family: DurationFamily =
        Family::new_with_constructor(duration_histogram as fn() -> Histogram);
    registry.register_with_unit(name, help, Unit::Seconds, family.clone());
    family
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// Every metric the daemon exports. Share it as `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    entries_read: Family<StreamLabels, Counter>,
    entries_acked: Family<StreamLabels, Counter>,
    failed_attempts: Family<StreamLabels, Counter>,
    retries: Family<StreamLabels, Counter>,
    dead_lettered: Family<StreamLabels, Counter>,
    entries_deleted: Family<StreamLabels, Counter>,
    resource_waits: Family<StreamLabels, Counter>,
    order_waiting: Family<StreamLabels, Gauge>,
    order_keys: Family<StreamLabels, Gauge>,
        order_unkeyed: Family<StreamLabels, Counter>,
    order_handovers: Family<StreamLabels, Counter>,
    order_takeovers: Family<StreamLabels, Counter>,
    order_wait: DurationFamily,
    handler_duration: DurationFamily,
    in_flight: Family<StreamLabels, Gauge>,
    group_lag: Family<StreamLabels, Gauge>,
    group_pending: Family<StreamLabels, Gauge>,
    redis_reconnects: Counter,
    redis_failovers: Counter,
    redis_primary: Family<PrimaryLabels, Gauge>,
    totals: Arc<Totals>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("redis_streamd");
        let r = &mut registry;
        // Counters get their `_total` suffix from the encoder.
        let metrics = Metrics {
            entries_read: register(r, "entries_read", HELP_ENTRIES_READ, Family::default()),
            entries_acked: register(r, "entries_acked", HELP_ENTRIES_ACKED, Family::default()),
            failed_attempts: register(
                r,
                "failed_attempts",
                HELP_FAILED_ATTEMPTS,
                Family::default(),
            ),
            retries: register(r, "retries", HELP_RETRIES, Family::default()),
            dead_lettered: register(r, "dead_lettered", HELP_DEAD_LETTERED, Family::default()),
            entries_deleted: register(
                r,
                "entries_deleted",
                HELP_ENTRIES_DELETED,
                Family::default(),
            ),
            resource_waits: register(r, "resource_waits", HELP_RESOURCE_WAITS, Family::default()),
            order_waiting: register(r, "order_waiting", HELP_ORDER_WAITING, Family::default()),
            order_keys: register(
                r,
                "order_keys_active",
                HELP_ORDER_KEYS_ACTIVE,
                Family::default(),
            ),
            order_unkeyed: register(r, "order_unkeyed", HELP_ORDER_UNKEYED, Family::default()),
            order_handovers: register(r, "order_handovers", HELP_ORDER_HANDOVERS, Family::default()),
            order_takeovers: register(r, "order_takeovers", HELP_ORDER_TAKEOVERS, Family::default()),
            order_wait: seconds(r, "order_wait", HELP_ORDER_WAIT),
            handler_duration: seconds(r, "handler_duration", HELP_HANDLER_DURATION),
            in_flight: register(
                r,
                "handlers_in_flight",
                HELP_HANDLERS_IN_FLIGHT,
                Family::default(),
            ),
            group_lag: register(r, "group_lag", HELP_GROUP_LAG, Family::default()),
            group_pending: register(r, "group_pending", HELP_GROUP_PENDING, Family::default()),
            redis_reconnects: register(
                r,
                "redis_reconnects",
                HELP_REDIS_RECONNECTS,
                Counter::default(),
            ),
            redis_failovers: register(
                r,
                "redis_failovers",
                HELP_REDIS_FAILOVERS,
                Counter::default(),
            ),
            redis_primary: register(r, "redis_primary", HELP_REDIS_PRIMARY, Family::default()),
            registry: Registry::default(),
            totals: Arc::default(),
        };
        Arc::new(Metrics {
            registry,
            ..metrics
        })
    }

    /// The handles for one (stream, group). The series exist (at 0) from this call on, so
    /// a dashboard sees every configured stream before its first entry.
    pub fn stream(&self, stream: &str, group: &str) -> StreamMetrics {
        let labels = StreamLabels {
            stream: stream.to_owned(),
            group: group.to_owned(),
        };
        StreamMetrics {
            totals: self.totals.clone(),
            read: self.entries_read.get_or_create_owned(&labels),
            acked: self.entries_acked.get_or_create_owned(&labels),
            failed_attempts: self.failed_attempts.get_or_create_owned(&labels),
            retries: self.retries.get_or_create_owned(&labels),
            dead_lettered: self.dead_lettered.get_or_create_owned(&labels),
            deleted: self.entries_deleted.get_or_create_owned(&labels),
            resource_waits: self.resource_waits.get_or_create_owned(&labels),
            order_waiting: self.order_waiting.get_or_create_owned(&labels),
            order_keys: self.order_keys.get_or_create_owned(&labels),
                        order_unkeyed: self.order_unkeyed.get_or_create_owned(&labels),
            order_handovers: self.order_handovers.get_or_create_owned(&labels),
            order_takeovers: self.order_takeovers.get_or_create_owned(&labels),
            order_wait: self.order_wait.get_or_create_owned(&labels),
            handler_duration: self.handler_duration.get_or_create_owned(&labels),
            in_flight: self.in_flight.get_or_create_owned(&labels),
            lag: self.group_lag.get_or_create_owned(&labels),
            pending: self.group_pending.get_or_create_owned(&labels),
        }
    }

    /// A one-line summary over every stream, for systemd's STATUS=.
    pub fn status_line(&self, streams: usize) -> String {
        let t = &self.totals;
        format!(
            "{streams} streams; {} handlers running; {} acked, {} dead-lettered since start",
            t.in_flight.load(Ordering::Relaxed),
            t.acked.load(Ordering::Relaxed),
            t.dead_lettered.load(Ordering::Relaxed),
        )
    }

    /// `redis_streamd_redis_reconnects_total` + 1.
    pub fn redis_reconnect(&self) {
        self.redis_reconnects.inc();
    }

    /// `redis_streamd_redis_failovers_total` + 1.
    pub fn redis_failover(&self) {
        self.redis_failovers.inc();
    }

    /// `redis_streamd_redis_primary{address}`: 1 for `address`, no other series.
    pub fn set_redis_primary(&self, address: &str) {
        self.redis_primary.clear();
        self.redis_primary
            .get_or_create(&PrimaryLabels {
                address: address.to_owned(),
            })
            .set(1);
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail; an error here could only come from a metric's
        // own encoder, and a partial scrape is better than none.
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(%error, "encoding metrics failed");
        }
        text
    }
}

/// Sums over every stream, for the status line (the registry has no cheap way to add up
/// a family's series).
#[derive(Debug, Default)]
struct Totals {
    in_flight: AtomicI64,
    acked: AtomicU64,
    dead_lettered: AtomicU64,
}

/// One (stream, group)'s metric handles; cheap to clone (each is an `Arc`).
#[derive(Clone, Debug)]
pub struct StreamMetrics {
    totals: Arc<Totals>,
    read: Counter,
    acked: Counter,
    failed_attempts: Counter,
    retries: Counter,
    dead_lettered: Counter,
    deleted: Counter,
    resource_waits: Counter,
    order_waiting: Gauge,
    order_keys: Gauge,
        order_unkeyed: Counter,
    order_handovers: Counter,
    order_takeovers: Counter,
    order_wait: Histogram,
    handler_duration: Histogram,
    in_flight: Gauge,
    lag: Gauge,
    pending: Gauge,
}

impl StreamMetrics {
    /// `redis_streamd_entries_read_total` + n.
    pub fn read(&self, n: u64) {
        self.read.inc_by(n);
    }

    /// `redis_streamd_entries_acked_total` + n.
    pub fn acked(&self, n: u64) {
        self.acked.inc_by(n);
        self.totals.acked.fetch_add(n, Ordering::Relaxed);
    }

    /// `redis_streamd_failed_attempts_total` + 1.
    pub fn failed_attempt(&self) {
        self.failed_attempts.inc();
    }

    /// `redis_streamd_retries_total` + 1.
    pub fn retry(&self) {
        self.retries.inc();
    }

    /// `redis_streamd_dead_lettered_total` + 1.
    pub fn dead_lettered(&self) {
        self.dead_lettered.inc();
        self.totals.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }

    /// `redis_streamd_entries_deleted_total` + 1.
    pub fn deleted_entry(&self) {
        self.deleted.inc();
    }

    /// `redis_streamd_resource_waits_total` + 1.
    pub fn resource_wait(&self) {
        self.resource_waits.inc();
    }

    /// `redis_streamd_order_waiting` and `redis_streamd_order_keys_active`.
    pub fn set_order(&self, waiting: usize, keys: usize) {
        self.order_waiting
            .set(i64::try_from(waiting).unwrap_or(i64::MAX));
        self.order_keys.set(i64::try_from(keys).unwrap_or(i64::MAX));
    }

    /// `redis_streamd_order_unkeyed_total` + 1.
    pub fn order_unkeyed(&self) {
        self.order_unkeyed.inc();
    }

        /// `redis_streamd_order_handovers_total` + 1.
    pub fn order_handed_over(&self) {
        self.order_handovers.inc();
    }

    /// `redis_streamd_order_takeovers_total` + n.
    pub fn order_taken_over(&self, n: u64) {
        self.order_takeovers.inc_by(n);
    }

    /// One observation of `redis_streamd_order_wait_seconds`.
    pub fn order_waited(&self, d: Duration) {
        self.order_wait.observe(d.as_secs_f64());
    }

    /// One observation of `redis_streamd_handler_duration_seconds`.
    pub fn handler_duration(&self, d: Duration) {
        self.handler_duration.observe(d.as_secs_f64());
    }

    /// `redis_streamd_handlers_in_flight` + 1.
    pub fn in_flight_inc(&self) {
        self.in_flight.inc();
        self.totals.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// `redis_streamd_handlers_in_flight` - 1.
    pub fn in_flight_dec(&self) {
        self.in_flight.dec();
        self.totals.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// `redis_streamd_group_lag`.
    pub fn set_lag(&self, v: i64) {
        self.lag.set(v);
    }

    /// `redis_streamd_group_pending`.
    pub fn set_pending(&self, v: i64) {
        self.pending.set(v);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A sample line's name+labels (as written) -> value.
    pub(crate) fn samples(text: &str) -> HashMap<String, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').unwrap();
                (series.to_owned(), value.parse().unwrap())
            })
            .collect()
    }

    pub(crate) fn value(samples: &HashMap<String, f64>, series: &str) -> f64 {
        *samples
            .get(series)
            .unwrap_or_else(|| panic!("no {series} in {samples:#?}"))
    }

    #[test]
    fn encodes_every_metric_with_labels() {
        let metrics = Metrics::new();
        let orders = metrics.stream("orders", "workers");
        let _mail = metrics.stream("mail", "senders");
        orders.read(5);
        orders.acked(3);
        orders.failed_attempt();
        orders.failed_attempt();
        orders.retry();
        orders.dead_lettered();
        orders.handler_duration(Duration::from_millis(20));
        orders.handler_duration(Duration::from_secs(2));
        orders.in_flight_inc();
        orders.in_flight_inc();
        orders.in_flight_dec();
        orders.set_lag(42);
        orders.set_pending(7);
        // A second handle on the same labels is the same series.
        metrics.stream("orders", "workers").acked(1);
        metrics.redis_reconnect();

        let text = metrics.encode();
        let s = samples(&text);
        let o = r#"{stream="orders",group="workers"}"#;
        let m = r#"{stream="mail",group="senders"}"#;
        for (name, want) in [
            ("redis_streamd_entries_read_total", 5.0),
            ("redis_streamd_entries_acked_total", 4.0),
            ("redis_streamd_failed_attempts_total", 2.0),
            ("redis_streamd_retries_total", 1.0),
            ("redis_streamd_dead_lettered_total", 1.0),
            ("redis_streamd_handlers_in_flight", 1.0),
            ("redis_streamd_group_lag", 42.0),
            ("redis_streamd_group_pending", 7.0),
            ("redis_streamd_handler_duration_seconds_count", 2.0),
        ] {
            assert_eq!(value(&s, &format!("{name}{o}")), want, "{name}\n{text}");
            // Unused streams are exported at zero.
            assert_eq!(value(&s, &format!("{name}{m}")), 0.0, "{name}\n{text}");
        }
        let sum = value(
            &s,
            &format!("redis_streamd_handler_duration_seconds_sum{o}"),
        );
        assert!((sum - 2.02).abs() < 1e-9, "{sum}");
        let bucket = |le: &str| {
            value(
                &s,
                &format!(
                    r#"redis_streamd_handler_duration_seconds_bucket{{le="{le}",stream="orders",group="workers"}}"#
                ),
            )
        };
        assert_eq!(bucket("0.01"), 0.0);
        assert_eq!(bucket("0.025"), 1.0);
        assert_eq!(bucket("2.5"), 2.0);
        assert_eq!(bucket("+Inf"), 2.0);
        assert_eq!(value(&s, "redis_streamd_redis_reconnects_total"), 1.0);
        assert!(
            text.contains("# TYPE redis_streamd_entries_read counter"),
            "{text}"
        );
        assert!(text.contains("# TYPE redis_streamd_handler_duration_seconds histogram"));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn status_line_adds_up_every_stream() {
        let metrics = Metrics::new();
        let (a, b) = (metrics.stream("a", "g"), metrics.stream("b", "g"));
        a.in_flight_inc();
        b.in_flight_inc();
        b.in_flight_inc();
        b.in_flight_dec();
        a.acked(3);
        b.acked(4);
        b.dead_lettered();
        assert_eq!(
            metrics.status_line(2),
            "2 streams; 2 handlers running; 7 acked, 1 dead-lettered since start"
        );
    }
}
