//! systemd service notifications (`Type=notify`) and the watchdog.
//!
//! [`ready`], [`stopping`] and [`status`] send `READY=1`, `STOPPING=1` and `STATUS=...` to
//! the socket named by `NOTIFY_SOCKET`; [`spawn_watchdog`] answers `WatchdogSec=` with
//! `WATCHDOG=1`, but only while every consume loop shows it is alive (see [`Liveness`]):
//! a daemon whose loops are wedged stops pinging and systemd restarts it. Everything here
//! is a no-op when `NOTIFY_SOCKET` is unset (not started by systemd, or in Docker).
//!
//! The functions are async because sending is a blocking `send` on a unix datagram socket
//! (it blocks while systemd's receive queue is full): it runs on tokio's blocking pool, and
//! awaiting it keeps the messages in order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Whether the service manager listens for notifications at all.
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// One notification.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Message {
    Ready,
    Stopping,
    Watchdog,
    Status(String),
}

impl Message {
    fn state(&self) -> NotifyState<'_> {
        match self {
            Message::Ready => NotifyState::Ready,
            Message::Stopping => NotifyState::Stopping,
            Message::Watchdog => NotifyState::Watchdog,
            Message::Status(line) => NotifyState::Status(line),
        }
    }
}

/// Sends `message`. Failures are logged, not returned: systemd not hearing us is no reason
/// to stop consuming (systemd itself acts on a missing READY or ping).
async fn send(message: Message) {
    if !enabled() {
        return;
    }
    let sent = tokio::task::spawn_blocking(move || {
        let result = sd_notify::notify(&[message.state()]);
        (message, result)
    })
    .await;
    match sent {
        Ok((message, Ok(()))) => tracing::trace!(?message, "sent service notification"),
        Ok((message, Err(error))) => {
            tracing::warn!(%error, ?message, "cannot notify the service manager")
        }
        Err(error) => tracing::warn!(%error, "service notification task failed"),
    }
}

/// `READY=1`: every group is set up and the consume loops run.
pub async fn ready() {
    send(Message::Ready).await;
}

/// `STOPPING=1`: shutdown has begun. systemd shows the unit as deactivating and from
/// then on applies `TimeoutStopSec=` to the exit.
pub async fn stopping() {
    send(Message::Stopping).await;
}

/// `STATUS=...`: a free-form line shown by `systemctl status`, e.g. in-flight counts.
pub async fn status(line: &str) {
    // A newline would end the STATUS= assignment and start a bogus one.
    send(Message::Status(line.replace('\n', " "))).await;
}

/// Heartbeats of the consume loops, read by the watchdog.
///
/// Each loop holds a [`Heartbeat`] and calls [`Heartbeat::beat`] every time it goes
/// around, and at least every second while it waits (a loop waiting for a free slot
/// behind long handlers should have a 1 s interval arm in its `select!` that beats): a
/// beat proves that the loop task is polled and the runtime is not wedged. Dropping the
/// heartbeat (the loop ended) removes it.
#[derive(Debug)]
pub struct Liveness {
    epoch: Instant,
    beats: Mutex<Vec<Arc<Beat>>>,
}

#[derive(Debug)]
struct Beat {
    name: String,
    /// Milliseconds since `Liveness::epoch` of the last beat.
    last_ms: AtomicU64,
}

/// One loop's handle on [`Liveness`].
#[derive(Debug)]
pub struct Heartbeat {
    beat: Arc<Beat>,
    liveness: Arc<Liveness>,
}

impl Liveness {
    pub fn new() -> Arc<Self> {
        Arc::new(Liveness {
            epoch: Instant::now(),
            beats: Mutex::new(Vec::new()),
        })
    }

    /// Registers a loop (e.g. by stream name). It counts as having just beaten.
    pub fn register(self: &Arc<Self>, name: impl Into<String>) -> Heartbeat {
        let beat = Arc::new(Beat {
            name: name.into(),
            last_ms: AtomicU64::new(self.now_ms()),
        });
        self.lock().push(beat.clone());
        Heartbeat {
            beat,
            liveness: self.clone(),
        }
    }

    /// The name of a registered loop that has not beaten within `max_age`, if any.
    /// With no loop registered there is nothing that can be stuck: `None`.
    pub fn stale(&self, max_age: Duration) -> Option<String> {
        let now = self.now_ms();
        let max_ms = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
        self.lock()
            .iter()
            .find(|b| now.saturating_sub(b.last_ms.load(Ordering::Relaxed)) > max_ms)
            .map(|b| b.name.clone())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Arc<Beat>>> {
        self.beats.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Heartbeat {
    pub fn beat(&self) {
        self.beat
            .last_ms
            .store(self.liveness.now_ms(), Ordering::Relaxed);
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.liveness.lock().retain(|b| !Arc::ptr_eq(b, &self.beat));
    }
}

/// Starts the watchdog task when systemd asked for one (`WatchdogSec=` sets
/// `WATCHDOG_USEC`) and is listening (`NOTIFY_SOCKET`); `None` otherwise.
///
/// It pings every half period, and only while no loop in `liveness` has been silent for a
/// whole period. Ends when `stop` is cancelled: cancel it at exit, not at the start of
/// shutdown. Drop each loop's [`Heartbeat`] as soon as the loop stops reading (before it
/// drains its handlers): a loop that is no longer going around is then not waited for,
/// so a long drain is not mistaken for a hang.
pub fn spawn_watchdog(liveness: Arc<Liveness>, stop: CancellationToken) -> Option<JoinHandle<()>> {
    if !enabled() {
        return None;
    }
    let period = sd_notify::watchdog_enabled().filter(|p| !p.is_zero())?;
    tracing::debug!(period = ?period, "systemd watchdog enabled");
    Some(tokio::spawn(watchdog(period, liveness, stop)))
}

async fn watchdog(period: Duration, liveness: Arc<Liveness>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(period / 2);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut withheld = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match liveness.stale(period) {
            None => {
                if withheld {
                    tracing::info!("all consume loops alive again; resuming watchdog pings");
                    withheld = false;
                }
                send(Message::Watchdog).await;
            }
            Some(name) => {
                if !withheld {
                    tracing::error!(stream = %name, period = ?period, "a consume loop has shown no progress for a watchdog period; withholding watchdog pings so systemd restarts the daemon");
                    withheld = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support;
    use std::os::unix::net::UnixDatagram;

    /// Moves `hb`'s last beat to `ago` before now.
    fn beaten_ago(liveness: &Liveness, hb: &Heartbeat, ago: Duration) {
        let ago = u64::try_from(ago.as_millis()).unwrap();
        hb.beat
            .last_ms
            .store(liveness.now_ms().saturating_sub(ago), Ordering::Relaxed);
    }

    #[tokio::test]
    async fn liveness_reports_silent_loops() {
        let liveness = Liveness::new();
        let second = Duration::from_secs(1);
        // Let the clock run past the ages used below.
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert_eq!(liveness.stale(second), None);
        let a = liveness.register("a");
        let b = liveness.register("b");
        assert_eq!(liveness.stale(second), None);
        beaten_ago(&liveness, &b, Duration::from_millis(1200));
        assert_eq!(liveness.stale(second), Some("b".to_owned()));
        b.beat();
        assert_eq!(liveness.stale(second), None);
        beaten_ago(&liveness, &a, Duration::from_millis(1200));
        beaten_ago(&liveness, &b, Duration::from_millis(600));
        assert_eq!(liveness.stale(second), Some("a".to_owned()));
        // A loop that ended is no longer waited for.
        drop(a);
        assert_eq!(liveness.stale(second), None);
        beaten_ago(&liveness, &b, Duration::from_millis(1200));
        drop(b);
        assert_eq!(liveness.stale(second), None);
    }

    /// Runs test `name` alone in a child process (this test binary) with `envs` set. The
    /// notify functions read NOTIFY_SOCKET and WATCHDOG_USEC from the process environment,
    /// which a multi-threaded test must not change in its own process.
    fn run_child(name: &'static str, envs: &[(&str, &str)]) -> (&'static str, std::process::Child) {
        let mut cmd = test_support::child_test(name, "1", &[]);
        cmd.env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .envs(envs.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        (name, cmd.spawn().unwrap())
    }

    fn check_child((name, child): (&str, std::process::Child)) {
        test_support::assert_child_passed(name, &child.wait_with_output().unwrap());
    }

    fn in_child() -> bool {
        test_support::child_marker().is_some()
    }

    /// A real notify socket: READY, STATUS, watchdog pings only while the loop beats, and
    /// STOPPING, in that order.
    #[test]
    fn notifications_reach_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        // 300 ms watchdog: pings every 150 ms.
        let child = run_child(
            "ops::notify::tests::notify_child",
            &[
                ("NOTIFY_SOCKET", path.to_str().unwrap()),
                ("WATCHDOG_USEC", "300000"),
            ],
        );
        let mut messages = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 4096];
        while std::time::Instant::now() < deadline {
            match socket.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).trim_end().to_owned();
                    let last = msg == "STOPPING=1";
                    messages.push(msg);
                    if last {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("recv: {e}"),
            }
        }
        check_child(child);

        let pos = |m: &str| {
            messages
                .iter()
                .position(|x| x == m)
                .unwrap_or_else(|| panic!("no {m:?} in {messages:?}"))
        };
        let pings_between = |from: usize, to: usize| {
            messages[from..to]
                .iter()
                .filter(|m| *m == "WATCHDOG=1")
                .count()
        };
        let ready = pos("READY=1");
        let beating = pos("STATUS=phase beating");
        let silent = pos("STATUS=phase silent");
        let quiet = pos("STATUS=phase must be quiet");
        let resumed = pos("STATUS=phase resumed");
        let end = pos("STATUS=phase end");
        let stopping = pos("STOPPING=1");
        assert!(
            ready < beating && beating < silent && silent < quiet && quiet < resumed,
            "{messages:?}"
        );
        assert!(resumed < end && end < stopping, "{messages:?}");
        // About 1 s of beating at a 150 ms ping interval.
        assert!(pings_between(beating, silent) >= 3, "{messages:?}");
        // Silent for over a period (300 ms) plus a ping interval: no ping at all.
        assert_eq!(pings_between(quiet, resumed), 0, "{messages:?}");
        assert!(pings_between(resumed, end) >= 2, "{messages:?}");
        assert_eq!(pings_between(end, messages.len()), 0, "{messages:?}");
    }

    /// Does its work only inside [`notifications_reach_the_socket`]'s child process.
    #[tokio::test]
    async fn notify_child() {
        if !in_child() {
            return;
        }
        let liveness = Liveness::new();
        let stop = CancellationToken::new();
        let heartbeat = liveness.register("orders");
        let watchdog = spawn_watchdog(liveness.clone(), stop.clone()).expect("watchdog on");
        ready().await;

        let beat_for = |d: Duration| {
            let heartbeat = &heartbeat;
            async move {
                let until = Instant::now() + d;
                while Instant::now() < until {
                    heartbeat.beat();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        status("phase beating").await;
        beat_for(Duration::from_secs(1)).await;
        status("phase silent").await;
        // Staleness shows after one period (300 ms) and the last ping may go out up to a
        // ping interval (150 ms) later: quiet from 450 ms on; plenty of slack for a busy
        // machine, where a ping decided just in time may be sent a little later.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        status("phase must be quiet").await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        status("phase resumed").await;
        beat_for(Duration::from_secs(1)).await;
        stop.cancel();
        watchdog.await.unwrap();
        status("phase end").await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        stopping().await;
    }

    /// Without NOTIFY_SOCKET everything is a no-op and no watchdog starts, even when
    /// WATCHDOG_USEC is set.
    #[test]
    fn no_socket_means_no_op() {
        check_child(run_child(
            "ops::notify::tests::no_socket_child",
            &[("WATCHDOG_USEC", "300000")],
        ));
    }

    #[tokio::test]
    async fn no_socket_child() {
        if !in_child() {
            return;
        }
        assert!(!enabled());
        ready().await;
        status("x").await;
        stopping().await;
        assert!(spawn_watchdog(Liveness::new(), CancellationToken::new()).is_none());
    }
}
