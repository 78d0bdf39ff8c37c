//! The daemon reaps orphans: a handler's descendant that left its process group (setsid)
//! and outlives the handler is re-parented to the daemon (a child subreaper, as PID 1 in a
//! container would be) and must not stay a zombie.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_grandchild_is_reaped_by_the_daemon() {
    let redis = RedisServer::start();
    let work = workdir();
    // The grandchild escapes the handler's group, so the group kill at handler exit does
    // not touch it; it exits when the test releases it, as an orphan.
    let script = write_script(
        work.path(),
        "fork.sh",
        "cat >/dev/null\n\
         setsid sh -c 'echo $$ > \"$0/grandchild\"; i=0; while [ ! -e \"$0/release\" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done' \"$D\" </dev/null >/dev/null 2>&1 &\n\
         i=0; while [ ! -s \"$D/grandchild\" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done\n\
         exit 0",
    );
    let cfg = config(
        &redis.url(),
        &stream_table("jobs", "g", &script, "block = \"200ms\"\nstart_id = \"0\""),
    );
    let c = TestClient::connect(&redis.url()).await;
    let id = c.xadd("jobs", &[("payload", b"x")]).await;
    let d = Daemon::start(&cfg);
    let (cr, idr) = (&c, id.as_str());
    d.wait_until(LONG, "the entry is acked", || async move {
        cr.all_acked_through("jobs", "g", idr).await
    })
    .await;
    let grandchild: i32 = String::from_utf8_lossy(&read_or_empty(&work.path().join("grandchild")))
        .trim()
        .parse()
        .expect("grandchild pid");
    let daemon = d.pid();
    // Held alive by the test: the daemon must have adopted it (not init) ...
    d.wait_until(
        LONG,
        "the orphan was adopted by the daemon",
        || async move { proc_stat(grandchild).is_some_and(|s| s.ppid == daemon as i32) },
    )
    .await;
    // ... and must reap it once it exits.
    std::fs::write(work.path().join("release"), b"").expect("release the grandchild");
    d.wait_until(
        LONG,
        "the orphan is reaped (no zombie left)",
        || async move { proc_stat(grandchild).is_none() && zombie_children(daemon).is_empty() },
    )
    .await;
}
