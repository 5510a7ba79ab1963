//! One broadcast that stops every loop: each background thread waits on a
//! [`ShutdownSignal`] (a receiver of a channel nobody ever sends on), and
//! dropping the single sender wakes them all at once. SIGTERM and SIGINT are
//! turned into that drop by a small signal thread.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Owns the sender; [`Shutdown::trigger`] drops it.
#[derive(Clone)]
pub struct Shutdown {
    sender: Arc<Mutex<Option<Sender<()>>>>,
    receiver: Receiver<()>,
}

/// What loops hold: cheap to clone, and waits that end early on shutdown.
#[derive(Clone)]
pub struct ShutdownSignal {
    receiver: Receiver<()>,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        let (sender, receiver) = crossbeam_channel::bounded(0);
        Shutdown {
            sender: Arc::new(Mutex::new(Some(sender))),
            receiver,
        }
    }

    pub fn signal(&self) -> ShutdownSignal {
        ShutdownSignal {
            receiver: self.receiver.clone(),
        }
    }

    pub fn trigger(&self) {
        self.sender.lock().take();
    }

    /// Triggers on the first SIGTERM or SIGINT; a second one exits the
    /// process at once (exit code 128 + the signal's number, as a shell
    /// reports a process killed by it), for an operator who will not wait
    /// for the checks in flight and the last snapshot.
    pub fn on_signals(&self) -> std::io::Result<()> {
        let mut signals = Signals::new([SIGTERM, SIGINT])?;
        let shutdown = self.clone();
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut received = 0;
                for signal in signals.forever() {
                    let name = if signal == SIGTERM {
                        "SIGTERM"
                    } else {
                        "SIGINT"
                    };
                    received += 1;
                    if received == 1 {
                        log::info!(
                            "{name} received: shutting down (send it again to exit at once)"
                        );
                        shutdown.trigger();
                    } else {
                        log::warn!(
                            "second {name} received: exiting now, without the last snapshot"
                        );
                        // The log writer's queue goes out first (bounded wait).
                        log::logger().flush();
                        std::process::exit(128 + signal);
                    }
                }
            })?;
        Ok(())
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl ShutdownSignal {
    /// A signal that never fires, for one-shot commands.
    pub fn never() -> ShutdownSignal {
        let (sender, receiver) = crossbeam_channel::bounded(0);
        std::mem::forget(sender);
        ShutdownSignal { receiver }
    }

    pub fn is_triggered(&self) -> bool {
        matches!(
            self.receiver.try_recv(),
            Err(crossbeam_channel::TryRecvError::Disconnected)
        )
    }

    /// Sleeps until `deadline`; returns true when shutdown came first.
    pub fn wait_until(&self, deadline: Instant) -> bool {
        matches!(
            self.receiver.recv_deadline(deadline),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected)
        )
    }

    /// Sleeps for `duration`; returns true when shutdown came first.
    pub fn wait(&self, duration: Duration) -> bool {
        matches!(
            self.receiver.recv_timeout(duration),
            Err(RecvTimeoutError::Disconnected)
        )
    }

    /// For `crossbeam_channel::select!` alongside other channels.
    pub fn receiver(&self) -> &Receiver<()> {
        &self.receiver
    }
}
