//! The HTTP endpoint on `[daemon] metrics_listen`: `/metrics`, `/healthz`, `/readyz`.
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
//!
//! Clients that connect and then stall must not silence `/healthz`: an orchestrator
//! whose liveness probe goes unanswered kills a healthy daemon. So the listener never
//! stops accepting. Each connection is served by its own task and closed when its request
//! headers do not arrive within [`HEADER_READ_TIMEOUT`] (which is also how long a kept-alive
//! connection may sit idle between requests). At most a bounded number of connections
//! are open at once (each is a file descriptor, and the daemon needs its descriptors for
//! Redis and handler pipes); a new connection beyond the bound closes the oldest one.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ACCEPT, ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;

/// The most connections open at once, when the descriptor limit allows: scrapers and
/// probes are few, this is for clients that connect and stall. A connection over the
/// bound closes the oldest one, so the listener keeps answering.
const MAX_CONNECTIONS: usize = 1024;

/// The fewest connections allowed, however low the descriptor limit.
const MIN_CONNECTIONS: usize = 16;

/// A client must send its complete request headers within this long after it connects,
/// and after each response on a kept-alive connection (hyper restarts the timer for the
/// next request), or the connection is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Under a flood of connections, how often closing the oldest ones is logged.
const EVICTION_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// On stop, how long a request already being answered may take to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Content type of the Prometheus text format, served unless the scraper asks for
/// OpenMetrics. prometheus-client writes OpenMetrics text, which the Prometheus text
/// parser reads as well (its `# UNIT` and `# EOF` lines are comments there).
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

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

/// The listener's bounds; see the module documentation.
#[derive(Clone, Copy, Debug)]
struct Limits {
    max_connections: usize,
    header_read_timeout: Duration,
}

impl Limits {
    /// [`MAX_CONNECTIONS`], or a quarter of the soft RLIMIT_NOFILE when that is less
    /// (at least [`MIN_CONNECTIONS`]): idle clients must not take the descriptors that
    /// consuming needs. The limit is read when the listener starts.
    fn for_this_process() -> Limits {
        // Unreadable: assume the common default soft limit of 1024.
        let nofile = nofile_soft_limit().unwrap_or(1024);
        let quarter = usize::try_from(nofile / 4).unwrap_or(usize::MAX);
        Limits {
            max_connections: quarter.clamp(MIN_CONNECTIONS, MAX_CONNECTIONS),
            header_read_timeout: HEADER_READ_TIMEOUT,
        }
    }
}

/// The soft RLIMIT_NOFILE from `/proc/self/limits` (`u64::MAX` for "unlimited").
fn nofile_soft_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let soft = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?
        .split_whitespace()
        .next()?;
    match soft {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
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
    let limits = Limits::for_this_process();
    tracing::debug!(
        max_connections = limits.max_connections,
        header_read_timeout = ?limits.header_read_timeout,
        "metrics listener limits"
    );
    serve_with(listener, metrics, health, stop, limits).await
}

async fn serve_with(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    stop: CancellationToken,
    limits: Limits,
) -> std::io::Result<()> {
    let mut connections = JoinSet::new();
    // The connections' tasks in accept order, oldest first. Finished ones are only
    // dropped from it when it is full, so it holds at most `max_connections` handles.
    let mut open: VecDeque<AbortHandle> = VecDeque::new();
    let mut evicted = 0u64;
    let mut last_eviction_log: Option<Instant> = None;
    loop {
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
        // Collect finished connections so the set does not grow with every scrape.
        while connections.try_join_next().is_some() {}
        if open.len() >= limits.max_connections {
            open.retain(|task| !task.is_finished());
        }
        if open.len() >= limits.max_connections {
            // Full of clients that hold their connection: close the oldest (aborting its
            // task drops its socket) rather than stop accepting, so that a probe, which
            // is always the newest connection, gets its answer.
            if let Some(oldest) = open.pop_front() {
                oldest.abort();
                evicted += 1;
            }
            if last_eviction_log.is_none_or(|t| t.elapsed() >= EVICTION_LOG_INTERVAL) {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    closed = evicted,
                    "metrics listener: too many open connections; closing the oldest"
                );
                last_eviction_log = Some(Instant::now());
                evicted = 0;
            }
        }
        let metrics = metrics.clone();
        let health = health.clone();
        let stop = stop.clone();
        let task = connections.spawn(async move {
            let service = service_fn(move |req| {
                let response = respond(&req, &metrics, &health);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
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
        open.push_back(task);
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
    use crate::ops::metrics::tests::{samples, value};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

    /// Starts [`serve_with`] on a loopback port.
    async fn start(limits: Limits) -> (std::net::SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve_with(
            listener,
            Metrics::new(),
            Health::new(1),
            stop.clone(),
            limits,
        ));
        (addr, stop)
    }

    /// Reads until the server closes the connection (EOF or reset); false if it is still
    /// open after `within`.
    async fn closed_within(conn: &mut tokio::net::TcpStream, within: Duration) -> bool {
        let mut sink = Vec::new();
        tokio::time::timeout(within, conn.read_to_end(&mut sink))
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn full_listener_closes_the_oldest_connection_and_keeps_answering() {
        // A header timeout far beyond the test: any connection closed here was evicted.
        let (addr, stop) = start(Limits {
            max_connections: 4,
            header_read_timeout: Duration::from_secs(600),
        })
        .await;
        let mut idle = Vec::new();
        for _ in 0..10 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Accepted after the ten (one listen queue, first come first accepted): it closes
        // the oldest of the four open ones and is answered.
        assert_eq!(get(addr, "GET", "/healthz", "").await.0, 200);
        for (i, conn) in idle.iter_mut().enumerate().take(7) {
            assert!(
                closed_within(conn, Duration::from_secs(10)).await,
                "connection {i} still open"
            );
        }
        for (i, conn) in idle.iter_mut().enumerate().skip(7) {
            assert!(
                !closed_within(conn, Duration::from_millis(200)).await,
                "connection {i} closed"
            );
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn stalled_and_idle_connections_are_closed() {
        let (addr, stop) = start(Limits {
            max_connections: 16,
            header_read_timeout: Duration::from_millis(300),
        })
        .await;
        // Sends nothing.
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        // Sends half a request.
        let mut partial = tokio::net::TcpStream::connect(addr).await.unwrap();
        partial
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
            .await
            .unwrap();
        // One kept-alive request, then nothing.
        let mut kept = tokio::net::TcpStream::connect(addr).await.unwrap();
        kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        while !answer.ends_with(b"\r\n\r\nok\n") {
            let mut buf = [0u8; 512];
            let n = tokio::time::timeout(Duration::from_secs(10), kept.read(&mut buf))
                .await
                .expect("an answer")
                .unwrap();
            assert_ne!(n, 0, "closed before the answer: {answer:?}");
            answer.extend_from_slice(&buf[..n]);
        }
        assert!(answer.starts_with(b"HTTP/1.1 200 OK\r\n"), "{answer:?}");
        for (what, conn) in [
            ("silent", &mut silent),
            ("partial", &mut partial),
            ("kept-alive", &mut kept),
        ] {
            assert!(
                closed_within(conn, Duration::from_secs(10)).await,
                "{what} connection still open"
            );
        }
        stop.cancel();
    }

    #[test]
    fn limits_follow_the_descriptor_limit() {
        let limits = Limits::for_this_process();
        assert!(
            (MIN_CONNECTIONS..=MAX_CONNECTIONS).contains(&limits.max_connections),
            "{limits:?}"
        );
        if let Some(nofile) = nofile_soft_limit() {
            assert!(
                limits.max_connections as u64 <= nofile.max(4 * MIN_CONNECTIONS as u64) / 4,
                "{limits:?} with RLIMIT_NOFILE {nofile}"
            );
        }
        assert!(HEADER_READ_TIMEOUT <= Duration::from_secs(2));
    }
}
