//! The executor seen by the consume loop: how an entry's payload reaches the handler
//! program, either a fresh process per attempt (`per_entry`) or a pool of long-lived
//! workers (`worker`).
//!
//! The loop hands the [`Executor`] a [`Job`] (an entry attempt holding one of the
//! executor's read slots) with [`Executor::submit`], which never blocks. Exactly one
//! [`Done`] comes back per job on the channel returned by [`Executor::new`]: the
//! executor reports outcomes and never calls back into the loop, which settles the entry
//! (ack, retry, dead-letter) when the `Done` arrives. A job's slot is released by the
//! executor when the run ends, before its `Done` is sent.
//!
//! Capacity is owned here: [`Executor::slots`] is the semaphore the loop takes a permit
//! from for each entry it reads. Per-entry mode has `max_block_read` slots; the worker
//! pool resizes its slots to `max_block_read` times its current prefetch depth.
//!
//! Both modes share the process lifecycle (`process`: spawn in an own process group,
//! environment, terminate with grace) and the output handling (`output`: line splitting,
//! stderr tail, logging of output lines).

pub(crate) mod output;
mod per_entry;
pub(crate) mod process;
mod worker;

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::{HandlerMode, StreamConfig};
use crate::identity::Consumer;
use per_entry::PerEntry;
use process::HandlerCommand;
use worker::WorkerPool;

/// Time between SIGTERM and SIGKILL for a handler's process group.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// One entry attempt for the executor.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) id: String,
    /// 1 for the first attempt.
    pub(crate) attempt: u64,
    /// What the handler gets: the payload field's bytes or the entry as JSON.
    pub(crate) payload: Bytes,
    /// Held while the run goes on; released (dropped) by exec when the run ends, BEFORE
    /// the [`Done`] is sent.
    pub(crate) slot: OwnedSemaphorePermit,
}

/// The end of one submitted job.
#[derive(Debug)]
pub(crate) struct Done {
    pub(crate) id: String,
    pub(crate) attempt: u64,
    pub(crate) report: Report,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Exit status 0, or a worker's `ok`.
    Success,
    /// Exit status other than 0.
    Exited(i32),
    /// Died from a signal it did not get from us.
    Signaled(i32),
    /// Ran past `handler_timeout`; its process group was killed.
    TimedOut(Duration),
    /// The program could not be started (missing, not executable, ...).
    SpawnFailed(String),
    /// The daemon lacked the resources to start the program (`EMFILE`, `ENFILE`,
    /// `EAGAIN`, `ENOMEM`): the daemon's trouble, not the entry's, so not a failed
    /// attempt.
    NoResources(String),
    /// Stopped by the daemon's shutdown (`abort` token), or never started because of it:
    /// neither success nor a failed attempt.
    Aborted,
    /// A worker replied `fail <reason>`: a failed attempt.
    Failed(String),
    /// A worker replied `dlq <reason>`: straight to the DLQ.
    Rejected(String),
    /// A worker died, or broke the protocol, while handling the entry.
    WorkerLost(String),
}

impl Outcome {
    /// The DLQ reason text: `exit code 3`, `killed by signal 9`, `timeout after 30s`,
    /// `spawn failed: ...`, or a worker's own reason.
    pub(crate) fn reason(&self) -> String {
        match self {
            Outcome::Success => "success".to_owned(),
            Outcome::Exited(code) => format!("exit code {code}"),
            Outcome::Signaled(sig) => format!("killed by signal {sig}"),
            Outcome::TimedOut(after) => {
                format!("timeout after {}", humantime::format_duration(*after))
            }
            Outcome::SpawnFailed(err) | Outcome::NoResources(err) => {
                format!("spawn failed: {err}")
            }
            Outcome::Aborted => "aborted".to_owned(),
            Outcome::Failed(reason) | Outcome::Rejected(reason) | Outcome::WorkerLost(reason) => {
                reason.clone()
            }
        }
    }

    /// The outcome of a process that exited with `status` on its own.
    pub(crate) fn of_exit(status: ExitStatus) -> Outcome {
        match (status.code(), status.signal()) {
            (Some(0), _) => Outcome::Success,
            (Some(code), _) => Outcome::Exited(code),
            (None, Some(sig)) => Outcome::Signaled(sig),
            // Neither an exit code nor a signal cannot happen for a reaped child on Linux.
            (None, None) => Outcome::Exited(-1),
        }
    }

    /// The outcome of a failed spawn: [`Outcome::NoResources`] when the system lacked
    /// descriptors, processes or memory, [`Outcome::SpawnFailed`] otherwise.
    pub(crate) fn of_spawn_error(err: &std::io::Error) -> Outcome {
        if process::is_resource_shortage(err) {
            Outcome::NoResources(err.to_string())
        } else {
            Outcome::SpawnFailed(err.to_string())
        }
    }
}

/// The result of one run.
#[derive(Debug, Clone)]
pub(crate) struct Report {
    pub(crate) outcome: Outcome,
    /// The last 4 KiB (at most) of what the handler wrote to stderr during the run.
    pub(crate) stderr_tail: Vec<u8>,
    /// From spawn (per-entry) or from the entry's turn (worker) to the end of the run.
    pub(crate) elapsed: Duration,
}

impl Report {
    pub(crate) fn new(outcome: Outcome, stderr_tail: Vec<u8>, elapsed: Duration) -> Report {
        Report {
            outcome,
            stderr_tail,
            elapsed,
        }
    }

    /// A run that did not happen: `outcome`, no output, no time.
    pub(crate) fn without_run(outcome: Outcome) -> Report {
        Report::new(outcome, Vec::new(), Duration::ZERO)
    }
}

/// A submitted job on its way to its [`Done`], without its payload. Finishing it releases
/// the slot, then sends the `Done`. Dropped unfinished (a task that panicked, a runtime
/// shutting down), it reports [`Outcome::Aborted`]: exactly one `Done` per job, always.
#[derive(Debug)]
pub(crate) struct Ticket {
    id: String,
    attempt: u64,
    slot: Option<OwnedSemaphorePermit>,
    done: Option<mpsc::UnboundedSender<Done>>,
}

impl Ticket {
    fn new(job: Job, done: mpsc::UnboundedSender<Done>) -> (Ticket, Bytes) {
        let Job {
            id,
            attempt,
            payload,
            slot,
        } = job;
        let ticket = Ticket {
            id,
            attempt,
            slot: Some(slot),
            done: Some(done),
        };
        (ticket, payload)
    }

    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn attempt(&self) -> u64 {
        self.attempt
    }

    /// Releases the slot and reports the run.
    pub(crate) fn finish(mut self, report: Report) {
        self.send(report);
    }

    fn send(&mut self, report: Report) {
        drop(self.slot.take());
        if let Some(done) = self.done.take() {
            // The loop gone (receiver dropped) means nobody waits for the outcome.
            let _ = done.send(Done {
                id: std::mem::take(&mut self.id),
                attempt: self.attempt,
                report,
            });
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.done.is_some() {
            self.send(Report::without_run(Outcome::Aborted));
        }
    }
}

/// The executor of one stream: per-entry processes or the worker pool.
pub(crate) struct Executor {
    kind: Kind,
    slots: Arc<Semaphore>,
    done: mpsc::UnboundedSender<Done>,
}

enum Kind {
    /// A process per attempt, at most `slots` at once.
    PerEntry {
        runner: PerEntry,
        slots: usize,
    },
    Workers(WorkerPool),
}

impl Executor {
    /// Builds the executor of one stream from its config. `abort` is the shutdown's abort
    /// token. Must be called inside the runtime (the worker pool starts its tasks).
    pub(crate) fn new(
        cfg: &StreamConfig,
        who: &Consumer,
        abort: CancellationToken,
    ) -> (Executor, mpsc::UnboundedReceiver<Done>) {
        let (done, done_rx) = mpsc::unbounded_channel();
        let cmd = HandlerCommand::new(cfg, KILL_GRACE);
        let (kind, slots) = match cfg.mode {
            HandlerMode::Exec => (
                Kind::PerEntry {
                    runner: PerEntry::new(cmd, who.clone(), abort),
                    slots: cfg.max_block_read,
                },
                Arc::new(Semaphore::new(cfg.max_block_read)),
            ),
            HandlerMode::Worker => {
                let pool = WorkerPool::new(
                    cmd,
                    who.clone(),
                    cfg.max_block_read,
                    cfg.worker_prefetch,
                    abort,
                );
                let slots = pool.slots();
                (Kind::Workers(pool), slots)
            }
        };
        (Executor { kind, slots, done }, done_rx)
    }

    /// The read slots: one permit per entry the stream may hold (`max_block_read` in
    /// exec mode; workers x prefetch depth in worker mode, resized by the pool).
    pub(crate) fn slots(&self) -> Arc<Semaphore> {
        self.slots.clone()
    }

    /// Permits [`Executor::slots`] has in all, free or held.
    pub(crate) fn slot_count(&self) -> usize {
        match &self.kind {
            Kind::PerEntry { slots, .. } => *slots,
            Kind::Workers(pool) => pool.slot_count(),
        }
    }

    /// Worker mode reads in batches: a worker answers in microseconds, so reading as soon
    /// as one slot frees means one XREADGROUP (and one XACK) per entry or two, and Redis
    /// round trips become the limit. Per-entry processes take a millisecond to spawn;
    /// there, reading at once is better.
    pub(crate) fn batches_reads(&self) -> bool {
        matches!(self.kind, Kind::Workers(_))
    }

    /// Starts the job; never blocks. Exactly one [`Done`] comes back per submitted job
    /// ([`Outcome::Aborted`] when shutdown aborts it).
    pub(crate) fn submit(&self, job: Job) {
        let (ticket, payload) = Ticket::new(job, self.done.clone());
        match &self.kind {
            Kind::PerEntry { runner, .. } => runner.submit(ticket, payload),
            Kind::Workers(pool) => pool.submit(ticket, payload),
        }
    }

    /// Graceful stop: per-entry mode waits for running processes (the abort token stops
    /// them); the pool runs what it has queued and stops its workers. Every [`Done`] is
    /// sent before it returns. Call after the last [`Executor::submit`].
    pub(crate) async fn shutdown(&self) {
        match &self.kind {
            Kind::PerEntry { runner, .. } => runner.shutdown().await,
            Kind::Workers(pool) => pool.shutdown().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons() {
        assert_eq!(Outcome::Exited(3).reason(), "exit code 3");
        assert_eq!(Outcome::Signaled(9).reason(), "killed by signal 9");
        assert_eq!(
            Outcome::TimedOut(Duration::from_secs(30)).reason(),
            "timeout after 30s"
        );
        assert_eq!(
            Outcome::TimedOut(Duration::from_millis(1500)).reason(),
            "timeout after 1s 500ms"
        );
        assert_eq!(
            Outcome::SpawnFailed("No such file or directory (os error 2)".into()).reason(),
            "spawn failed: No such file or directory (os error 2)"
        );
        assert_eq!(Outcome::Aborted.reason(), "aborted");
        assert_eq!(Outcome::Success.reason(), "success");
        assert_eq!(Outcome::Failed("disk full".into()).reason(), "disk full");
        assert_eq!(
            Outcome::NoResources("Too many open files (os error 24)".into()).reason(),
            "spawn failed: Too many open files (os error 24)"
        );
    }

    #[test]
    fn resource_shortages_are_not_spawn_failures() {
        use nix::errno::Errno;
        for errno in [Errno::EMFILE, Errno::ENFILE, Errno::EAGAIN, Errno::ENOMEM] {
            let err = std::io::Error::from_raw_os_error(errno as i32);
            let outcome = Outcome::of_spawn_error(&err);
            assert_eq!(outcome, Outcome::NoResources(err.to_string()), "{errno}");
        }
        let missing = std::io::Error::from_raw_os_error(Errno::ENOENT as i32);
        assert!(matches!(
            Outcome::of_spawn_error(&missing),
            Outcome::SpawnFailed(_)
        ));
        let other = std::io::Error::other("empty handler argv");
        assert_eq!(
            Outcome::of_spawn_error(&other),
            Outcome::SpawnFailed("empty handler argv".into())
        );
    }

    fn job(id: &str, slots: &Arc<Semaphore>) -> Job {
        Job {
            id: id.to_owned(),
            attempt: 2,
            payload: Bytes::new(),
            slot: slots.clone().try_acquire_owned().expect("a free slot"),
        }
    }

    #[tokio::test]
    async fn ticket_releases_the_slot_before_done_and_reports_once() {
        let slots = Arc::new(Semaphore::new(1));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (ticket, _) = Ticket::new(job("1-0", &slots), tx);
        assert_eq!(slots.available_permits(), 0);
        ticket.finish(Report::without_run(Outcome::Success));
        let done = rx.try_recv().expect("a Done");
        assert_eq!(slots.available_permits(), 1);
        assert_eq!((done.id.as_str(), done.attempt), ("1-0", 2));
        assert_eq!(done.report.outcome, Outcome::Success);
        assert!(rx.try_recv().is_err(), "reported twice");
    }

    #[tokio::test]
    async fn ticket_dropped_unfinished_reports_aborted() {
        let slots = Arc::new(Semaphore::new(1));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (ticket, _) = Ticket::new(job("1-0", &slots), tx);
        drop(ticket);
        let done = rx.try_recv().expect("a Done");
        assert_eq!(done.report.outcome, Outcome::Aborted);
        assert_eq!(slots.available_permits(), 1);
        assert!(rx.try_recv().is_err(), "reported twice");
    }
    /// A stream of `mode` running `handler`, with `max_block_read` processes.
    fn stream(mode: HandlerMode, handler: &str, max_block_read: usize) -> StreamConfig {
        StreamConfig {
            mode,
            max_block_read,
            worker_prefetch: if mode == HandlerMode::Worker { 8 } else { 1 },
            handler_timeout: Duration::from_secs(60),
            ..StreamConfig::for_tests(&["sh", "-c", handler])
        }
    }

    /// Generous: the machine may be busy.
    const DEADLINE: Duration = Duration::from_secs(120);

    /// Exits 3 on the payload `fail`, 0 otherwise.
    const EXEC_HANDLER: &str = "read -r p; [ \"$p\" != fail ] || exit 3";
    /// Replies `fail` to the payload `fail`, `ok` otherwise.
    const WORKER_HANDLER: &str = "while IFS=' ' read -r id attempt len; do \
        p=$(dd bs=1 count=$((len + 1)) 2>/dev/null); \
        if [ \"$p\" = fail ]; then echo 'fail no'; else echo ok; fi; done";
    const EXEC_STUCK: &str = "sleep 1000";
    const WORKER_STUCK: &str = "while read -r id attempt len; do sleep 1000; done";

    async fn next_done(rx: &mut mpsc::UnboundedReceiver<Done>) -> Done {
        tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .expect("a Done in time")
            .expect("the executor is alive")
    }

    fn submit(executor: &Executor, slots: &Arc<Semaphore>, id: &str, payload: &'static [u8]) {
        executor.submit(Job {
            id: id.to_owned(),
            attempt: 1,
            payload: Bytes::from_static(payload),
            slot: slots.clone().try_acquire_owned().expect("a free slot"),
        });
    }

    /// One Done per job, after the job's slot was released, in both modes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_job_gets_one_done_after_its_slot_is_released() {
        for (mode, handler) in [
            (HandlerMode::Exec, EXEC_HANDLER),
            (HandlerMode::Worker, WORKER_HANDLER),
        ] {
            let who = Consumer::new("s", "g", "c");
            let abort = CancellationToken::new();
            let (executor, mut rx) = Executor::new(&stream(mode, handler, 1), &who, abort);
            assert_eq!(executor.batches_reads(), mode == HandlerMode::Worker);
            assert_eq!(executor.slot_count(), 1);
            let slots = executor.slots();
            for (i, payload) in [&b"x"[..], b"fail", b"y"].into_iter().enumerate() {
                let id = format!("{i}-0");
                submit(&executor, &slots, &id, payload);
                let done = next_done(&mut rx).await;
                // Released before the Done was sent.
                assert_eq!(slots.available_permits(), executor.slot_count());
                assert_eq!((done.id.as_str(), done.attempt), (id.as_str(), 1));
                let want = match (payload, mode) {
                    (b"fail", HandlerMode::Exec) => Outcome::Exited(3),
                    (b"fail", HandlerMode::Worker) => Outcome::Failed("no".into()),
                    _ => Outcome::Success,
                };
                assert_eq!(done.report.outcome, want, "{mode:?}");
            }
            tokio::time::timeout(DEADLINE, executor.shutdown())
                .await
                .expect("shutdown in time");
            assert!(rx.try_recv().is_err(), "{mode:?}: a job was reported twice");
        }
    }

    /// The abort ends every job, running or queued, with exactly one `Aborted` Done, and a
    /// graceful shutdown sends every Done before it returns.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn abort_reports_every_job_aborted_once() {
        for (mode, handler) in [
            (HandlerMode::Exec, EXEC_STUCK),
            (HandlerMode::Worker, WORKER_STUCK),
        ] {
            let who = Consumer::new("s", "g", "c");
            let abort = CancellationToken::new();
            let (executor, mut rx) = Executor::new(&stream(mode, handler, 2), &who, abort.clone());
            // More jobs than workers: some wait in the pool's queue.
            let slots = Arc::new(Semaphore::new(5));
            for i in 0..5 {
                submit(&executor, &slots, &format!("{i}-0"), b"x");
            }
            // Not needed for correctness: lets the handlers start before the abort.
            tokio::time::sleep(Duration::from_millis(300)).await;
            abort.cancel();
            tokio::time::timeout(DEADLINE, executor.shutdown())
                .await
                .expect("shutdown in time");
            let mut ids = Vec::new();
            while let Ok(done) = rx.try_recv() {
                assert_eq!(done.report.outcome, Outcome::Aborted, "{mode:?}");
                ids.push(done.id);
            }
            ids.sort();
            assert_eq!(ids, ["0-0", "1-0", "2-0", "3-0", "4-0"], "{mode:?}");
            assert_eq!(slots.available_permits(), 5);
        }
    }

    /// Runs `child_spawn_without_descriptors` alone: it lowers the process's limit of
    /// open files.
    #[tokio::test]
    async fn spawn_without_descriptors_is_no_resources_in_both_modes() {
        let name = "exec::tests::child_spawn_without_descriptors";
        per_entry::tests::run_test_in_child(name, &[]).await;
    }

    /// Does its work only inside `spawn_without_descriptors_is_no_resources_in_both_modes`'s
    /// child.
    #[tokio::test]
    async fn child_spawn_without_descriptors() {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        if !per_entry::tests::in_child() {
            return;
        }
        for (mode, handler) in [
            (HandlerMode::Exec, EXEC_HANDLER),
            (HandlerMode::Worker, WORKER_HANDLER),
        ] {
            let who = Consumer::new("s", "g", "c");
            let (executor, mut rx) =
                Executor::new(&stream(mode, handler, 1), &who, CancellationToken::new());
            let slots = executor.slots();
            let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
            // Room for what is open now, not for a handler's three pipes.
            let open = std::fs::read_dir("/proc/self/fd").expect("fds").count() as u64;
            setrlimit(Resource::RLIMIT_NOFILE, open + 1, hard).expect("lower the limit");
            submit(&executor, &slots, "1-0", b"x");
            let done = next_done(&mut rx).await;
            setrlimit(Resource::RLIMIT_NOFILE, soft, hard).expect("restore the limit");
            let Outcome::NoResources(error) = &done.report.outcome else {
                panic!("{mode:?}: {:?}", done.report.outcome);
            };
            assert!(error.starts_with("Too many open files"), "{error}");
            assert!(
                done.report
                    .outcome
                    .reason()
                    .starts_with("spawn failed: Too many open files"),
                "{mode:?}"
            );
            tokio::time::timeout(DEADLINE, executor.shutdown())
                .await
                .expect("shutdown in time");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn graceful_shutdown_waits_for_running_handlers() {
        let who = Consumer::new("s", "g", "c");
        let cfg = stream(HandlerMode::Exec, "sleep 0.3", 1);
        let (executor, mut rx) = Executor::new(&cfg, &who, CancellationToken::new());
        submit(&executor, &executor.slots(), "1-0", b"x");
        tokio::time::timeout(DEADLINE, executor.shutdown())
            .await
            .expect("shutdown in time");
        let done = rx.try_recv().expect("Done sent before shutdown returned");
        assert_eq!(done.report.outcome, Outcome::Success);
    }
}
