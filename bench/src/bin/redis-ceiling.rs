//! The Redis ceiling: a minimal consumer with no handler at all. `XREADGROUP COUNT 100`
//! on one connection, each batch's ids `XACK`ed in one command on a second connection
//! (the daemon's layout: a reader connection per stream plus a shared command connection),
//! without waiting for the ack before the next read. Stops once `--count` entries are read
//! and every ack is confirmed.
//!
//! The stream must be preloaded and the group created (at `0`) beforehand.
//!
//! Prints one line: `entries=N secs=S per_s=R cpu_s=C` (C: its own CPU time).
//!
//! ```text
//! redis-ceiling --url redis://127.0.0.1:6379 --stream s --group g --count 200000
//! ```

use std::time::{Duration, Instant};

use bench::{Args, Result, connect, read_reply_ids};
use fred::prelude::*;

fn main() -> Result<()> {
    let args = Args::parse(&["--url", "--stream", "--group", "--consumer", "--count", "--batch"])?;
    let url = args.value("--url").ok_or("--url is required")?.to_owned();
    let stream = args.value("--stream").unwrap_or("bench").to_owned();
    let group = args.value("--group").unwrap_or("g").to_owned();
    let consumer = args.value("--consumer").unwrap_or("ceiling").to_owned();
    let count: usize = args.parsed("--count", 100_000)?;
    let batch: u64 = args.parsed("--batch", 100)?;

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (read, secs) = runtime.block_on(async move {
        let reader = connect(&url).await?;
        let commands = connect(&url).await?;
        let mut acks = tokio::task::JoinSet::new();
        let mut read = 0usize;
        let started = Instant::now();
        while read < count {
            let reply: Value = reader
                .xreadgroup(&group, &consumer, Some(batch), Some(1000), false, &stream, ">")
                .await?;
            let ids = read_reply_ids(reply);
            if ids.is_empty() {
                if started.elapsed() > Duration::from_secs(600) {
                    return Err::<_, bench::Error>("no entries for too long".into());
                }
                continue;
            }
            read += ids.len();
            let commands = commands.clone();
            let (stream, group) = (stream.clone(), group.clone());
            acks.spawn(async move {
                let acked: u64 = commands.xack(stream, group, ids).await?;
                Ok::<u64, fred::error::Error>(acked)
            });
            while let Some(done) = acks.try_join_next() {
                done??;
            }
        }
        while let Some(done) = acks.join_next().await {
            done??;
        }
        let secs = started.elapsed().as_secs_f64();
        let _ = reader.quit().await;
        let _ = commands.quit().await;
        Ok((read, secs))
    })?;
    println!(
        "entries={read} secs={secs:.3} per_s={:.1} cpu_s={:.3}",
        read as f64 / secs,
        bench::self_cpu_secs()
    );
    Ok(())
}
