//! Self-tests of the test harness (no daemon involved): redis-server lifecycle, the
//! binary-safe client helpers, AOF restarts, handler scripts.

mod common;

use std::process::Command;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_redis_roundtrip() {
    let redis = RedisServer::start();
    let pid = redis.pid().expect("running");
    let c = TestClient::connect(&redis.url()).await;

    let binary = all_byte_values(2);
    let id1 = c
        .xadd("s", &[("payload", &binary), ("name", b"plain text")])
        .await;
    let id2 = c
        .xadd_raw(
            "s",
            &[(vec![0xff, 0x00], vec![0x80]), (b"k".to_vec(), vec![])],
        )
        .await;
    assert_eq!(c.xlen("s").await, 2);
    assert_eq!(c.xlen("no-such-stream").await, 0);

    let entries = c.xrange_all("s").await;
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0].id, id1);
    assert_eq!(entries[0].get("payload"), Some(binary.as_slice()));
    assert_eq!(entries[0].get_str("name").as_deref(), Some("plain text"));
    assert_eq!(entries[1].id, id2);
    assert_eq!(
        entries[1].fields,
        vec![(vec![0xff, 0x00], vec![0x80]), (b"k".to_vec(), vec![])]
    );
    assert!(c.xrange_all("no-such-stream").await.is_empty());

    assert!(!c.group_exists("s", "g").await);
    assert!(!c.group_exists("no-such-stream", "g").await);
    c.create_group("s", "g", "0").await;
    assert!(c.group_exists("s", "g").await);
    assert_eq!(c.last_delivered_id("s", "g").await.as_deref(), Some("0-0"));
    assert_eq!(c.pending_count("s", "g").await, 0);
    assert!(!c.all_acked_through("s", "g", &id2).await);

    let read = c.xreadgroup("s", "g", "alice", 10, ">").await;
    assert_eq!(read.len(), 2);
    assert_eq!(read[0].get("payload"), Some(binary.as_slice()));
    assert_eq!(c.pending_count("s", "g").await, 2);
    // Reading the own PEL again bumps the delivery counter.
    let again = c.xreadgroup("s", "g", "alice", 10, "0").await;
    assert_eq!(again.len(), 2);
    let pel = c.pending_entries("s", "g").await;
    assert_eq!(pel.len(), 2);
    assert_eq!(pel[0].id, id1);
    assert_eq!(pel[0].consumer, "alice");
    assert_eq!(pel[0].deliveries, 2);

    c.cmd(
        "XACK",
        vec![
            "s".into(),
            "g".into(),
            id1.as_str().into(),
            id2.as_str().into(),
        ],
    )
    .await
    .expect("XACK");
    assert_eq!(c.pending_count("s", "g").await, 0);
    assert!(c.all_acked_through("s", "g", &id2).await);

    drop(c);
    drop(redis);
    // No leftover server.
    let gone = proc_stat(pid as i32).is_none_or(|st| st.state == 'Z');
    assert!(gone, "redis-server {pid} still alive after drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_parallel_servers_have_distinct_ports() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    assert_ne!(a.port(), b.port());
    let ca = TestClient::connect(&a.url()).await;
    let cb = TestClient::connect(&b.url()).await;
    ca.xadd("only-a", &[("x", b"1")]).await;
    assert_eq!(ca.xlen("only-a").await, 1);
    assert_eq!(cb.xlen("only-a").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_aof_restart_and_crash_keep_data() {
    let mut redis = RedisServer::start_persistent();
    let port = redis.port();
    {
        let c = TestClient::connect(&redis.url()).await;
        c.create_group("s", "g", "0").await;
        c.xadd("s", &[("payload", b"one")]).await;
        c.xreadgroup("s", "g", "bob", 10, ">").await;
    }
    redis.restart();
    assert_eq!(redis.port(), port);
    {
        let c = TestClient::connect(&redis.url()).await;
        assert_eq!(c.xlen("s").await, 1);
        assert_eq!(c.pending_count("s", "g").await, 1);
        c.xadd("s", &[("payload", b"two")]).await;
    }
    redis.kill9();
    assert!(!redis.is_running());
    redis.start_again();
    let c = TestClient::connect(&redis.url()).await;
    let entries = c.xrange_all("s").await;
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[1].get("payload"), Some(&b"two"[..]));
    let pel = c.pending_entries("s", "g").await;
    assert_eq!(pel.len(), 1);
    assert_eq!(pel[0].consumer, "bob");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_client_survives_redis_restart() {
    let mut redis = RedisServer::start_persistent();
    let c = TestClient::connect(&redis.url()).await;
    c.xadd("s", &[("payload", b"one")]).await;
    redis.restart();
    let cref = &c;
    wait_until(LONG, "client reconnects", None, || async move {
        cref.cmd("PING", vec![]).await.is_ok()
    })
    .await;
    assert_eq!(c.xlen("s").await, 1);
}

#[test]
fn harness_scripts_and_helpers() {
    let work = workdir();
    let script = write_script(
        work.path(),
        "h.sh",
        "cat > \"$D/in\"\necho \"$1\" > \"$D/arg\"\nexit 7",
    );
    let mut child = Command::new(&script)
        .arg("hello")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("run script");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&all_byte_values(1)).unwrap();
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(7));
    assert_eq!(read_or_empty(&work.path().join("in")), all_byte_values(1));
    assert_eq!(read_lines(&work.path().join("arg")), vec!["hello"]);
    assert_eq!(count_files(work.path(), ".sh"), 1);

    assert_eq!(strip_ansi("\u{1b}[31merror\u{1b}[0m: x"), "error: x");
    assert_eq!(line_of("a\nb = 1\nc", "b ="), 2);
    assert!(id_le("1-0", "1-1") && id_le("2-0", "10-0") && !id_le("10-0", "9-5"));
    assert_eq!(pseudo_random_bytes(1000, 7), pseudo_random_bytes(1000, 7));
    let cfg = config(
        "redis://127.0.0.1:1/0",
        &stream_table("s", "g", &script, "max_block_read = 2"),
    );
    assert!(cfg.contains("handler = [\""));
    assert!(cfg.contains("consumer = \"tester\""));
}
