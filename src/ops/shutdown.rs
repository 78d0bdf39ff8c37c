//! Shutdown state shared by every loop and handler task.
//!
//! Two stages, each a cancellation token passed explicitly to whoever must react:
//! `stop` (stop reading new entries, let running handlers finish) and `abort` (stop
//! waiting: terminate the handlers still running, leaving their entries pending).

use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    stop: CancellationToken,
    abort: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// A shutdown of its own for one part (a stream's loop, stopped on reload) that also
    /// follows every stage of `self`.
    pub fn child(&self) -> Shutdown {
        Shutdown {
            stop: self.stop.child_token(),
            abort: self.abort.child_token(),
        }
    }

    /// Stage one: no more reads. Idempotent.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Stage two: terminate running handlers now. Implies stage one.
    pub fn abort(&self) {
        self.stop.cancel();
        self.abort.cancel();
    }

    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Resolves once stage one has begun.
    pub async fn stopping(&self) {
        self.stop.cancelled().await
    }

    /// Cancelled on stage one.
    pub fn stop_token(&self) -> &CancellationToken {
        &self.stop
    }

    /// Cancelled on stage two.
    pub fn abort_token(&self) -> &CancellationToken {
        &self.abort
    }
}
