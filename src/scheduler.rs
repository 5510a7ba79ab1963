//! The metronome: a thread that enqueues a job at a fixed rate. Tick k is due
//! at t0 + k·interval however long the work takes (no drift). The job channel
//! holds at most one job, so when a cycle overruns, the next starts as soon as
//! it ends and further ticks coalesce into that one waiting job.

use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};

use crate::shutdown::ShutdownSignal;

/// The first tick strictly after `now` on the grid t0 + k·interval (k ≥ 1).
/// A metronome that woke late skips the ticks it missed instead of firing a
/// burst of them.
pub fn next_tick(t0: Instant, interval: Duration, now: Instant) -> Instant {
    if interval.is_zero() {
        return now;
    }
    let elapsed = now.saturating_duration_since(t0);
    let k = elapsed.as_nanos() / interval.as_nanos() + 1;
    let k = u32::try_from(k).unwrap_or(u32::MAX);
    t0 + interval * k
}

/// What a tick did with its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// The job now waits for the worker.
    Queued,
    /// A job was already waiting: this tick coalesced into it.
    Coalesced,
    /// The worker is gone.
    Closed,
}

/// Puts `job` on a bounded(1) channel without blocking.
pub fn enqueue<T>(sender: &Sender<T>, job: T) -> Enqueued {
    match sender.try_send(job) {
        Ok(()) => Enqueued::Queued,
        Err(TrySendError::Full(_)) => Enqueued::Coalesced,
        Err(TrySendError::Disconnected(_)) => Enqueued::Closed,
    }
}

/// Starts the metronome thread (see [`run_metronome`]).
pub fn start_metronome<T: Send + 'static>(
    name: &str,
    interval: Duration,
    sender: Sender<T>,
    shutdown: ShutdownSignal,
    make_job: impl Fn() -> T + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    let name = name.to_string();
    thread::Builder::new()
        .name(name.clone())
        .spawn(move || run_metronome(&name, interval, sender, shutdown, make_job))
}

/// The metronome: `make_job()` is enqueued at every tick until shutdown or
/// until the receiving side is dropped. The first tick is at t0 + interval
/// (callers that want a run at start enqueue one themselves).
pub fn run_metronome<T>(
    name: &str,
    interval: Duration,
    sender: Sender<T>,
    shutdown: ShutdownSignal,
    make_job: impl Fn() -> T,
) {
    let t0 = Instant::now();
    let mut due = t0 + interval;
    loop {
        if shutdown.wait_until(due) {
            return;
        }
        match enqueue(&sender, make_job()) {
            Enqueued::Queued => {}
            Enqueued::Coalesced => {
                log::debug!("{name}: previous job still waiting, tick coalesced")
            }
            Enqueued::Closed => return,
        }
        due = next_tick(t0, interval, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_stay_on_the_grid_whatever_the_work_takes() {
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        // Woken 600 ms into the interval: the next tick is t0 + 1 s.
        assert_eq!(
            next_tick(t0, second, t0 + Duration::from_millis(600)),
            t0 + second
        );
        // Woken exactly on tick 3: the next one is tick 4.
        assert_eq!(next_tick(t0, second, t0 + second * 3), t0 + second * 4);
        // Woken 2.5 intervals late: missed ticks are skipped, not replayed.
        assert_eq!(
            next_tick(t0, second, t0 + Duration::from_millis(3500)),
            t0 + second * 4
        );
    }

    #[test]
    fn at_most_one_job_waits() {
        let (sender, receiver) = crossbeam_channel::bounded(1);
        assert_eq!(enqueue(&sender, 1), Enqueued::Queued);
        assert_eq!(enqueue(&sender, 2), Enqueued::Coalesced);
        assert_eq!(enqueue(&sender, 3), Enqueued::Coalesced);
        assert_eq!(receiver.len(), 1);
        assert_eq!(receiver.recv().unwrap(), 1);
        drop(receiver);
        assert_eq!(enqueue(&sender, 4), Enqueued::Closed);
    }
}
