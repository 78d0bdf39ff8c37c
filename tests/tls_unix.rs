//! TLS and unix sockets end to end (issue 11). The core flow (entries handled and acked,
//! poison entries dead-lettered, nothing pending) over `unix://` and over `redis+unix://`
//! with `?db=2`; over TLS with a private CA (`tls_ca_file`), and with
//! `tls-auth-clients yes` and a client certificate (`tls_cert_file`, `tls_key_file`). A
//! wrong CA and a missing client certificate are refused: the daemon exits 69 after
//! `connect_timeout` with an error that says TLS.
//!
//! Each server also has a plain TCP port on loopback for the test client; the daemon only
//! gets the socket path or the TLS port, which speak nothing else.

mod common;
mod topology;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use topology::resp;
use topology::tls::Certs;
use topology::*;

const GROUP: &str = "g";
/// EX_UNAVAILABLE: Redis stayed unreachable past `connect_timeout`.
const EX_UNAVAILABLE: i32 = 69;

/// Runs the daemon with `url` (and `redis_extra` lines), pushes 30 entries (every 10th
/// poison) to `stream` through `client_url`, and checks that each ran exactly once or was
/// dead-lettered. Returns the daemon, still running.
async fn core_flow(url: &str, redis_extra: &str, client_url: &str, stream: &str) -> Daemon {
    let work = workdir();
    let (done, script) = recording_handler(work.path(), "");
    let cfg = daemon_config(
        url,
        redis_extra,
        "d1",
        "",
        &topo_stream(stream, GROUP, &script, "max_block_read = 4"),
    );
    let mut d = Daemon::start(&cfg);
    wait_ready(&d).await;
    let c = TestClient::connect(client_url).await;
    let cr = &c;
    d.wait_until(LONG, "group created", || async move {
        group_state(cr, stream, GROUP).await.is_some()
    })
    .await;
    let ids = push_range(&c, stream, 0, 30, 10).await;
    let pushed = HashMap::from([(stream.to_owned(), ids)]);
    let watched = [Watched::new(stream)];
    wait_complete(&c, &watched, GROUP, &done, &pushed, &[&d]).await;
    let p = problems(&c, &watched, GROUP, &done, &pushed, true).await;
    assert!(p.is_empty(), "{p:#?}\n{}", d.log_tail());
    let dead = dlq_sources(&c, &watched[0].dlq).await.expect("dlq");
    assert_eq!(dead.len(), 3, "every 10th entry dead-lettered");
    d.assert_running();
    d
}

/// A redis-server with a plain port and a unix socket `dir/r.sock`.
fn unix_server(dir: &Path) -> (Node, String) {
    let sock = dir.join("r.sock");
    let s = sock.to_str().expect("utf-8 path").to_owned();
    let node = Node::start(dir, "unix", &|p, _, d| {
        let mut a = server_args(p, d);
        a.extend(["--unixsocket", &s, "--unixsocketperm", "700"].map(str::to_owned));
        a
    });
    (node, sock.to_str().expect("utf-8 path").to_owned())
}

/// Clients connected over the unix socket (CLIENT LIST `addr=/path...`).
fn unix_clients(port: u16) -> usize {
    let list = resp::must(port, &["CLIENT", "LIST"])
        .text()
        .unwrap_or_default();
    list.lines().filter(|l| l.contains(" addr=/")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_core_flow() {
    let dir = workdir();
    let (node, sock) = unix_server(dir.path());
    let d = core_flow(&format!("unix://{sock}"), "", &node.url(), "jobs").await;
    assert!(unix_clients(node.port()) >= 1, "the daemon uses the socket");
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_plus_unix_socket_with_db_2() {
    let dir = workdir();
    let (node, sock) = unix_server(dir.path());
    let db2 = format!("redis://127.0.0.1:{}/2", node.port());
    let d = core_flow(&format!("redis+unix://{sock}?db=2"), "", &db2, "jobs").await;
    assert!(unix_clients(node.port()) >= 1, "the daemon uses the socket");
    let db0 = TestClient::connect(&node.url()).await;
    assert_eq!(db0.xlen("jobs").await, 0, "nothing in db 0");
    assert_eq!(db0.xlen("jobs:dlq").await, 0, "nothing in db 0");
    drop(d);
}

/// `[redis]` lines naming certificate files.
fn tls_keys(ca: &Path, client: Option<(&Path, &Path)>) -> String {
    let p = |f: &Path| toml_str(f.to_str().expect("utf-8 path"));
    let mut s = format!("tls_ca_file = {}\n", p(ca));
    if let Some((cert, key)) = client {
        s.push_str(&format!(
            "tls_cert_file = {}\ntls_key_file = {}\n",
            p(cert),
            p(key)
        ));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_private_ca_core_flow() {
    let certs = Certs::make();
    let node = certs.server(certs.dir(), "tls", false);
    let url = format!("rediss://127.0.0.1:{}/0", node.spare_port());
    core_flow(&url, &tls_keys(&certs.ca, None), &node.url(), "jobs").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_certificate_core_flow() {
    let certs = Certs::make();
    let node = certs.server(certs.dir(), "tls", true);
    let url = format!("rediss://127.0.0.1:{}/0", node.spare_port());
    let keys = tls_keys(&certs.ca, Some((&certs.client_cert, &certs.client_key)));
    core_flow(&url, &keys, &node.url(), "jobs").await;
}

/// The daemon with `redis_extra` against a TLS port: exits 69 after `connect_timeout`, and
/// its log says TLS.
fn assert_refused(port: u16, redis_extra: &str, why: &str) {
    let work = workdir();
    let script = write_script(work.path(), "ok.sh", "cat > /dev/null");
    let cfg = daemon_config(
        &format!("rediss://127.0.0.1:{port}/0"),
        &format!("{redis_extra}connect_timeout = \"3s\"\n"),
        "d1",
        "",
        &topo_stream("jobs", GROUP, &script, ""),
    );
    let mut d = Daemon::start(&cfg);
    let status = d.wait_exit(MEDIUM);
    assert_eq!(
        status.code(),
        Some(EX_UNAVAILABLE),
        "{why}\n{}",
        d.log_tail()
    );
    assert!(
        d.log().contains("TLS"),
        "{why}: the error says TLS\n{}",
        d.log_tail()
    );
}

#[test]
fn tls_refused_with_wrong_ca() {
    let certs = Certs::make();
    let node = certs.server(certs.dir(), "tls", false);
    assert_refused(
        node.spare_port(),
        &tls_keys(&certs.other_ca, None),
        "server certificate from another CA",
    );
}

#[test]
fn tls_refused_without_client_certificate() {
    let certs = Certs::make();
    let node = certs.server(certs.dir(), "tls", true);
    assert_refused(
        node.spare_port(),
        &tls_keys(&certs.ca, None),
        "tls-auth-clients yes, no client certificate",
    );
}
