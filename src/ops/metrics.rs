//! Prometheus metrics and the health endpoints, served on `[daemon] metrics_listen`.
//!
//! The registry and the text encoding come from `prometheus-client`, the Prometheus
//! project's own Rust client. Every per-stream metric carries the labels `stream` and
//! `group`; a loop resolves its label set once ([`Metrics::stream`]) and then only touches
//! atomics (counters, gauges) or one short mutex (the histogram).
//!
//! The HTTP side is hyper 1 (http1 server only) with hyper-util's tokio adapters: three
//! fixed GET routes need no router, and hyper is the small, well-kept base that the
//! frameworks (axum, warp) are built on, without their extra dependencies.
//!
//! | path | answer |
//! |---|---|
//! | `/metrics` | 200, the text exposition |
//! | `/healthz` | 200 `ok` while the process serves requests at all |
//! | `/readyz` | 200 `ready` when Redis is connected and every consume loop runs, else 503 `not ready` |
//! | anything else | 404 (405 for a known path with a method other than GET or HEAD) |

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ACCEPT, ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Upper bounds (seconds) of the handler duration buckets: from quick scripts to the
/// default 30 s `handler_timeout` and beyond.
const DURATION_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Scrapers are few; this caps what a misbehaving client can hold open.
const MAX_CONNECTIONS: usize = 32;

/// A client that connects but does not send its request headers is dropped after this.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// On stop, how long a request already being answered may take to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Content type of the Prometheus text format, served unless the scraper asks for
/// OpenMetrics. prometheus-client writes OpenMetrics text, which the Prometheus text
/// parser reads as well (its `# UNIT` and `# EOF` lines are comments there).
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    stream: String,
    group: String,
}

type DurationFamily = Family<StreamLabels, Histogram, fn() -> Histogram>;

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
    totals: Arc<Totals>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("redis_streamd");
        let entries_read = Family::default();
        let entries_acked = Family::default();
        let failed_attempts = Family::default();
        let retries = Family::default();
        let dead_lettered = Family::default();
        let entries_deleted = Family::default();
        let resource_waits = Family::default();
        let order_waiting = Family::default();
        let order_keys = Family::default();
        let order_unkeyed = Family::default();
        let order_handovers = Family::default();
        let order_takeovers = Family::default();
        let order_wait: DurationFamily =
            Family::new_with_constructor(duration_histogram as fn() -> Histogram);
        let handler_duration: DurationFamily =
            Family::new_with_constructor(duration_histogram as fn() -> Histogram);
        let in_flight = Family::default();
        let group_lag = Family::default();
        let group_pending = Family::default();
        let redis_reconnects = Counter::default();

        // Counters get their `_total` suffix from the encoder.
        registry.register(
            "entries_read",
            "Entries delivered to this consumer by XREADGROUP, XAUTOCLAIM or a retry claim",
            entries_read.clone(),
        );
        registry.register(
            "entries_acked",
            "Entries acknowledged (XACK) after their handler exited 0",
            entries_acked.clone(),
        );
        registry.register(
            "failed_attempts",
            "Handler runs that failed: non-zero exit, signal, timeout or spawn failure",
            failed_attempts.clone(),
        );
        registry.register(
            "retries",
            "Failed entries scheduled for another attempt",
            retries.clone(),
        );
        registry.register(
            "dead_lettered",
            "Entries moved to the dead-letter stream",
            dead_lettered.clone(),
        );
        registry.register(
            "entries_deleted",
            "Entries found deleted from the stream while this consumer held them (pending, waiting for a retry, or claimed); acked away or dropped from the pending list",
            entries_deleted.clone(),
        );
        registry.register(
            "resource_waits",
            "Handler starts that failed for want of daemon resources (file descriptors, processes, memory); the entry waits and runs again without using up an attempt",
            resource_waits.clone(),
        );
        registry.register(
            "order_waiting",
            "Entries waiting behind an earlier entry with the same ordering key (order_by)",
            order_waiting.clone(),
        );
        registry.register(
            "order_keys_active",
            "Ordering keys with an entry in hand (running, waiting for a retry, or being dead-lettered)",
            order_keys.clone(),
        );
        registry.register(
            "order_unkeyed",
            "Entries of an ordered stream without an ordering key (run unordered)",
            order_unkeyed.clone(),
        );
        registry.register(
            "order_handovers",
            "Entries this consumer read and handed over to the consumer holding their key (order_scope = \"group\")",
            order_handovers.clone(),
        );
        registry.register(
            "order_takeovers",
            "Keys this consumer took over, with their pending entries, from a consumer whose hold was not renewed within claim_idle (order_scope = \"group\")",
            order_takeovers.clone(),
        );
        registry.register_with_unit(
            "order_wait",
            "Time entries waited behind an earlier entry with the same ordering key",
            Unit::Seconds,
            order_wait.clone(),
        );
        registry.register_with_unit(
            "handler_duration",
            "Wall time of handler runs, from spawn to exit",
            Unit::Seconds,
            handler_duration.clone(),
        );
        registry.register(
            "handlers_in_flight",
            "Entries being handled now (worker mode: handed to workers, prefetched included)",
            in_flight.clone(),
        );
        registry.register(
            "group_lag",
            "Entries in the stream not yet delivered to the consumer group (XINFO GROUPS lag)",
            group_lag.clone(),
        );
        registry.register(
            "group_pending",
            "Entries delivered to the group but not yet acknowledged (XPENDING count)",
            group_pending.clone(),
        );
        registry.register(
            "redis_reconnects",
            "Times a Redis connection was re-established",
            redis_reconnects.clone(),
        );

        Arc::new(Metrics {
            registry,
            entries_read,
            entries_acked,
            failed_attempts,
            retries,
            dead_lettered,
            entries_deleted,
            resource_waits,
            order_waiting,
            order_keys,
            order_unkeyed,
            order_handovers,
            order_takeovers,
            order_wait,
            handler_duration,
            in_flight,
            group_lag,
            group_pending,
            redis_reconnects,
            totals: Arc::default(),
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

/// What `/readyz` answers from: the Redis connection and the consume loops.
#[derive(Debug)]
pub struct Health {
    redis_connected: AtomicBool,
    loops_expected: AtomicUsize,
    loops_running: AtomicUsize,
}

impl Health {
    /// `loops`: how many consume loops must run for the daemon to be ready.
    pub fn new(loops: usize) -> Arc<Health> {
        Arc::new(Health {
            redis_connected: AtomicBool::new(false),
            loops_expected: AtomicUsize::new(loops),
            loops_running: AtomicUsize::new(0),
        })
    }

    pub fn set_redis_connected(&self, connected: bool) {
        self.redis_connected.store(connected, Ordering::Relaxed);
    }

    /// Changes how many loops are expected (a reload that adds or removes streams).
    pub fn set_loops_expected(&self, loops: usize) {
        self.loops_expected.store(loops, Ordering::Relaxed);
    }

    pub fn loop_started(&self) {
        self.loops_running.fetch_add(1, Ordering::Relaxed);
    }

    pub fn loop_stopped(&self) {
        // Saturating: an unmatched call must not wrap around to "very many loops running".
        let _ = self
            .loops_running
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Connected to Redis and at least the expected number of loops running.
    pub fn ready(&self) -> bool {
        self.redis_connected.load(Ordering::Relaxed)
            && self.loops_running.load(Ordering::Relaxed)
                >= self.loops_expected.load(Ordering::Relaxed)
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `stop` is cancelled.
/// Accept errors (e.g. out of file descriptors) are logged and retried, never fatal: the
/// endpoint is secondary to consuming.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let health = health.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| {
                let response = respond(&req, &metrics, &health);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await {
                        Ok(result) => result,
                        Err(_) => Ok(()),
                    }
                }
            };
            if let Err(error) = result {
                tracing::debug!(%error, "metrics connection ended with an error");
            }
        });
        // Collect finished connections so the set does not grow with every scrape.
        while connections.try_join_next().is_some() {}
    }
    // Each connection reacts to `stop` by itself; wait for them a little longer than
    // their own grace, then drop (abort) whatever is left.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_millis(500), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

fn respond(req: &Request<Incoming>, metrics: &Metrics, health: &Health) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match path {
        "/metrics" => {
            let content_type = if wants_openmetrics(req) {
                OPENMETRICS_TEXT
            } else {
                PROMETHEUS_TEXT
            };
            let mut response = Response::new(Full::new(Bytes::from(metrics.encode())));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        _ if health.ready() => text(StatusCode::OK, "ready\n"),
        _ => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
    }
}

/// Prometheus asks for OpenMetrics first in its Accept header; so may other scrapers.
fn wants_openmetrics(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A sample line's name+labels (as written) -> value.
    fn samples(text: &str) -> HashMap<String, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').unwrap();
                (series.to_owned(), value.parse().unwrap())
            })
            .collect()
    }

    fn value(samples: &HashMap<String, f64>, series: &str) -> f64 {
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

    #[test]
    fn readiness_needs_redis_and_every_loop() {
        let health = Health::new(2);
        assert!(!health.ready());
        health.set_redis_connected(true);
        assert!(!health.ready());
        health.loop_started();
        assert!(!health.ready());
        health.loop_started();
        assert!(health.ready());
        health.set_redis_connected(false);
        assert!(!health.ready());
        health.set_redis_connected(true);
        health.loop_stopped();
        assert!(!health.ready());
        health.loop_stopped();
        health.loop_stopped(); // unmatched: stays at 0
        health.loop_started();
        health.set_loops_expected(1);
        assert!(health.ready());
    }

    /// A minimal HTTP/1.1 client: one request per connection, `Connection: close`.
    async fn get(
        addr: std::net::SocketAddr,
        method: &str,
        path: &str,
        accept: &str,
    ) -> (u16, String, String) {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accept = if accept.is_empty() {
            String::new()
        } else {
            format!("Accept: {accept}\r\n")
        };
        let request =
            format!("{method} {path} HTTP/1.1\r\nHost: test\r\n{accept}Connection: close\r\n\r\n");
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut raw))
            .await
            .expect("response in time")
            .unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let content_type = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-type: ")
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        (status, content_type, body.to_owned())
    }

    #[tokio::test]
    async fn serves_metrics_and_health_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Metrics::new();
        let health = Health::new(1);
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            metrics.clone(),
            health.clone(),
            stop.clone(),
        ));

        let orders = metrics.stream("orders", "g");
        orders.read(3);
        orders.acked(2);
        orders.failed_attempt();
        orders.handler_duration(Duration::from_millis(300));

        let (status, content_type, body) = get(addr, "GET", "/metrics", "").await;
        assert_eq!(status, 200);
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
        let s = samples(&body);
        let l = r#"{stream="orders",group="g"}"#;
        assert_eq!(
            value(&s, &format!("redis_streamd_entries_read_total{l}")),
            3.0
        );
        assert_eq!(
            value(&s, &format!("redis_streamd_entries_acked_total{l}")),
            2.0
        );
        assert_eq!(
            value(&s, &format!("redis_streamd_failed_attempts_total{l}")),
            1.0
        );
        assert_eq!(
            value(
                &s,
                &format!("redis_streamd_handler_duration_seconds_count{l}")
            ),
            1.0
        );

        // Numbers move between scrapes.
        orders.acked(1);
        let (_, _, body) = get(addr, "GET", "/metrics", "").await;
        assert_eq!(
            value(
                &samples(&body),
                &format!("redis_streamd_entries_acked_total{l}")
            ),
            3.0
        );

        let accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
        let (status, content_type, _) = get(addr, "GET", "/metrics", accept).await;
        assert_eq!(status, 200);
        assert!(
            content_type.starts_with("application/openmetrics-text"),
            "{content_type}"
        );

        assert_eq!(
            get(addr, "GET", "/healthz", "").await,
            (200, "text/plain; charset=utf-8".into(), "ok\n".into())
        );
        assert_eq!(get(addr, "GET", "/readyz", "").await.0, 503);
        health.set_redis_connected(true);
        health.loop_started();
        let (status, _, body) = get(addr, "GET", "/readyz", "").await;
        assert_eq!((status, body.as_str()), (200, "ready\n"));
        health.set_redis_connected(false);
        let (status, _, body) = get(addr, "GET", "/readyz", "").await;
        assert_eq!((status, body.as_str()), (503, "not ready\n"));

        assert_eq!(get(addr, "GET", "/nope", "").await.0, 404);
        assert_eq!(get(addr, "POST", "/metrics", "").await.0, 405);
        let (status, _, body) = get(addr, "HEAD", "/healthz", "").await;
        assert_eq!((status, body.as_str()), (200, ""));

        // A connection that stays open does not keep the server from stopping.
        let idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
        drop(idle);
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
