//! The metronome's acceptance tests,
//! in real time: a metronome thread feeding a worker thread through the
//! bounded(1) channel `serve` uses. The two tests take about 20 s and 11 s and
//! run concurrently (the test harness runs them on separate threads).
//!
//! The worker's `thread::sleep` is the simulated work, not a wait for
//! something; every wait on the metronome is a channel receive.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use proxy_pool::scheduler::start_metronome;
use proxy_pool::shutdown::Shutdown;

/// How far a job's start may stray from where it is due.
const TOLERANCE: Duration = Duration::from_millis(50);

/// What a run recorded: when the metronome started, when each job started
/// and ended, and the longest the job channel ever got.
struct Run {
    t0: Instant,
    jobs: Vec<(Instant, Instant)>,
    max_waiting: usize,
}

/// Runs a metronome of `interval` whose worker takes `work` per job, until
/// `jobs` jobs have ended, sampling the channel's length every millisecond.
fn run(interval: Duration, work: Duration, jobs: usize) -> Run {
    let shutdown = Shutdown::new();
    let (sender, receiver) = crossbeam_channel::bounded::<Instant>(1);
    let t0 = Instant::now();
    let metronome = start_metronome(
        "test-metronome",
        interval,
        sender,
        shutdown.signal(),
        Instant::now,
    )
    .expect("start the metronome");

    let done = Arc::new(AtomicBool::new(false));
    let max_waiting = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let receiver = receiver.clone();
        let done = done.clone();
        let max_waiting = max_waiting.clone();
        thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                max_waiting.fetch_max(receiver.len(), Ordering::Relaxed);
                thread::sleep(Duration::from_millis(1));
            }
        })
    };

    let mut recorded = Vec::with_capacity(jobs);
    let deadline = Instant::now() + interval * (jobs as u32 + 2) + work * (jobs as u32 + 1);
    while recorded.len() < jobs {
        let _enqueued_at = receiver
            .recv_deadline(deadline)
            .expect("a job before the deadline");
        let started = Instant::now();
        thread::sleep(work);
        recorded.push((started, Instant::now()));
    }
    done.store(true, Ordering::Relaxed);
    shutdown.trigger();
    metronome.join().expect("metronome thread");
    sampler.join().expect("sampler thread");
    Run {
        t0,
        jobs: recorded,
        max_waiting: max_waiting.load(Ordering::Relaxed),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Guards the fixed rate: with work shorter than the interval, job k starts
/// at t0 + k·interval (within 50 ms) for 20 ticks, with no drift however
/// long each job takes.
#[test]
fn jobs_shorter_than_the_interval_start_on_the_grid() {
    let interval = Duration::from_secs(1);
    let run = run(interval, Duration::from_millis(600), 20);
    let mut late = Vec::new();
    for (k, (started, _)) in run.jobs.iter().enumerate() {
        let due = run.t0 + interval * (k as u32 + 1);
        let off = if *started >= due {
            *started - due
        } else {
            due - *started
        };
        if off > TOLERANCE {
            late.push(format!("job {}: {} off", k + 1, ms(off)));
        }
    }
    assert!(late.is_empty(), "{}", late.join(", "));
    assert!(run.max_waiting <= 1);
}

/// Guards the overrun rule: with work (2.5 s) longer than the interval (1 s),
/// the next job starts at once when one ends (within 50 ms), missed ticks
/// coalesce into that one job (never more than one waits), and none is lost
/// to the point of leaving the worker idle.
#[test]
fn jobs_longer_than_the_interval_run_back_to_back_with_one_waiting() {
    let interval = Duration::from_secs(1);
    let work = Duration::from_millis(2500);
    let run = run(interval, work, 4);
    let (first, _) = run.jobs[0];
    let off = if first >= run.t0 + interval {
        first - (run.t0 + interval)
    } else {
        run.t0 + interval - first
    };
    assert!(off <= TOLERANCE, "first job {} off its tick", ms(off));
    for pair in run.jobs.windows(2) {
        let (_, ended) = pair[0];
        let (started, _) = pair[1];
        let gap = started.saturating_duration_since(ended);
        assert!(
            gap <= TOLERANCE,
            "next job started {} after the previous ended",
            ms(gap)
        );
    }
    assert_eq!(run.max_waiting, 1, "exactly one job waits while one runs");
}
