//! Self-tests of the topology harness (tests/topology/), no daemon involved: a Cluster
//! forms, fails over (manually and after kill -9) and moves a slot; a Sentinel set forms
//! and fails over; a TLS server accepts a client certificate; a redis-server listens on a
//! unix socket. A failure here is the harness's (or the machine's), not the daemon's.

mod common;
mod topology;

use std::os::unix::net::UnixStream;

use common::*;
use topology::cluster::Cluster;
use topology::sentinel::SentinelSet;
use topology::tls::Certs;
use topology::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_cluster_forms_fails_over_and_moves_slots() {
    let mut cluster = blocking(Cluster::start);
    assert_eq!(cluster.primaries().len(), 3);
    let c = TestClient::connect(&cluster.url()).await;
    // One key per primary, through the cluster-aware test client.
    let keys = ["{b}", "{c}", "{a}"];
    for k in keys {
        xadd_retry(&c, k, "x").await;
    }
    let owners: Vec<u16> = keys.iter().map(|k| cluster.owner_of(k)).collect();
    assert_eq!(
        owners,
        cluster.primaries(),
        "tags b, c, a cover the three primaries"
    );

    let replica = cluster.replica_of(owners[0]);
    let old = blocking(|| cluster.manual_failover(replica));
    assert_eq!(old, owners[0]);
    assert_eq!(cluster.owner_of("{b}"), replica);

    let slot = fred::util::redis_keyslot(b"{c}");
    blocking(|| cluster.migrate_slot(slot, owners[2]));
    assert_eq!(cluster.owner_of("{c}"), owners[2]);
    assert_eq!(stream_ids(&c, "{c}").await.map(|v| v.len()), Some(1));

    blocking(|| cluster.wait_in_sync());
    let promoted = blocking(|| cluster.kill_primary(owners[2]));
    assert_eq!(cluster.owner_of("{a}"), promoted);
    assert_eq!(cluster.owner_of("{c}"), promoted);
    assert!(!cluster.url().contains(&format!(":{}", owners[2])));
    let cr = &c;
    wait_until(
        LONG,
        "{a} readable after the failover",
        None,
        || async move { stream_ids(cr, "{a}").await.map(|v| v.len()) == Some(1) },
    )
    .await;
}

#[test]
fn topology_sentinel_forms_and_fails_over() {
    let set = SentinelSet::start();
    let first = set.primary();
    assert_eq!(first, set.servers[0].port());
    let (old, new) = set.failover();
    assert_eq!((old, new), (first, set.servers[1].port()));
    assert!(set.url().starts_with("redis-sentinel://127.0.0.1:"));
}

#[test]
fn topology_tls_server_and_unix_socket() {
    let certs = Certs::make();
    let work = workdir();
    let node = certs.server(work.path(), "tls", true);
    let out = std::process::Command::new("redis-cli")
        .args(["--tls", "--cacert"])
        .arg(&certs.ca)
        .arg("--cert")
        .arg(&certs.client_cert)
        .arg("--key")
        .arg(&certs.client_key)
        .args([
            "-h",
            "localhost",
            "-p",
            &node.spare_port().to_string(),
            "PING",
        ])
        .output()
        .expect("redis-cli");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "PONG",
        "{out:?}"
    );

    let sock = work.path().join("r.sock");
    let s = sock.to_str().unwrap().to_owned();
    let _unix = Node::start(work.path(), "unix", &|p, _, d| {
        let mut a = server_args(p, d);
        a.extend([
            "--unixsocket".into(),
            s.clone(),
            "--unixsocketperm".into(),
            "700".into(),
        ]);
        a
    });
    assert!(UnixStream::connect(&sock).is_ok());
}
