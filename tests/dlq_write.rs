//! The dead-letter write acks an entry only once it is in the dead-letter stream
//! (issue #14, item 1): a DLQ key of the wrong type makes the write fail, and the entry
//! must stay pending until the write can succeed, then be dead-lettered exactly once.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_dead_letter_write_leaves_the_entry_pending() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(work.path(), "fail.sh", "cat > /dev/null\nexit 3");
    let cfg = config(
        &redis.url(),
        &stream_table(
            "s",
            "g",
            &script,
            "block = \"200ms\"\nstart_id = \"0\"\nmax_attempts = 1",
        ),
    );
    let c = TestClient::connect(&redis.url()).await;
    c.cmd("SET", vec!["s:dlq".into(), "x".into()])
        .await
        .expect("SET s:dlq x");
    let id = c.xadd("s", &[("payload", b"doomed")]).await;
    let d = Daemon::start(&cfg);

    // The write is retried with backoff; two failures prove the entry sat through one.
    d.wait_until(LONG, "two failed dead-letter writes", || async {
        d.log().matches("dead-letter write failed").count() >= 2
    })
    .await;
    assert!(d.log().contains("WRONGTYPE"), "{}", d.log_tail());
    assert_eq!(c.pending_count("s", "g").await, 1, "{}", d.log_tail());

    c.cmd("DEL", vec!["s:dlq".into()]).await.expect("DEL s:dlq");
    let (cr, idr) = (&c, id.as_str());
    d.wait_until(LONG, "entry dead-lettered and acked", || async move {
        cr.xlen("s:dlq").await == 1 && cr.pending_count("s", "g").await == 0
    })
    .await;
    let dlq = c.xrange_all("s:dlq").await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].get_str("dlq_source_id").as_deref(), Some(idr));
    assert_eq!(dlq[0].get_str("dlq_reason").as_deref(), Some("exit code 3"));
    assert_eq!(dlq[0].get("payload"), Some(&b"doomed"[..]));
}
