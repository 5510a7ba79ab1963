//! The service's named threads, started so that none dies in silence. A
//! loop that panics is logged with its thread's name and the panic's
//! message, and stops the whole service: a panic means an invariant broke,
//! so the process leaves (writing its last snapshot on the way) with exit
//! code 1, and its supervisor (supervisord, systemd) starts it afresh from
//! the snapshot and the database, rather than going on with one part
//! missing (a validator that never validates again) or restarting a loop
//! that may panic again at once.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use parking_lot::Mutex;

use crate::shutdown::Shutdown;

/// Starts named threads and remembers which of them panicked.
#[derive(Clone)]
pub struct Supervisor {
    shutdown: Shutdown,
    panicked: Arc<Mutex<Vec<String>>>,
}

impl Supervisor {
    pub fn new(shutdown: Shutdown) -> Supervisor {
        Supervisor {
            shutdown,
            panicked: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Runs `body` on a thread named `name`. Should it panic, the panic is
    /// logged and recorded, and shutdown is triggered.
    pub fn spawn(
        &self,
        name: impl Into<String>,
        body: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<JoinHandle<()>> {
        let name = name.into();
        let supervisor = self.clone();
        thread::Builder::new().name(name.clone()).spawn(move || {
            if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(body)) {
                supervisor.record_panic(&name, payload.as_ref());
            }
        })
    }

    fn record_panic(&self, name: &str, payload: &(dyn Any + Send)) {
        log::error!(
            "thread {name} panicked: {}; stopping the service (its supervisor starts it again from the snapshot)",
            panic_message(payload)
        );
        self.panicked.lock().push(name.to_string());
        self.shutdown.trigger();
    }

    /// The names of the threads that panicked, in order.
    pub fn panicked(&self) -> Vec<String> {
        self.panicked.lock().clone()
    }
}

/// The text a panic was raised with, when it was a string.
pub fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(text) = payload.downcast_ref::<&str>() {
        text
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text
    } else {
        "(no message)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicked_thread_is_recorded_and_stops_the_service() {
        let shutdown = Shutdown::new();
        let signal = shutdown.signal();
        let supervisor = Supervisor::new(shutdown);
        let calm = supervisor.spawn("calm", || {}).unwrap();
        calm.join().unwrap();
        assert!(!signal.is_triggered());
        assert!(supervisor.panicked().is_empty());

        let failing = supervisor
            .spawn("validate", || panic!("broken invariant"))
            .unwrap();
        // The panic is caught inside the thread: joining it succeeds.
        failing.join().unwrap();
        assert!(signal.is_triggered());
        assert_eq!(supervisor.panicked(), ["validate"]);
    }

    #[test]
    fn panic_messages_are_read_from_both_string_kinds() {
        let payload: Box<dyn Any + Send> = Box::new("static");
        assert_eq!(panic_message(payload.as_ref()), "static");
        let payload: Box<dyn Any + Send> = Box::new(format!("owned {}", 1));
        assert_eq!(panic_message(payload.as_ref()), "owned 1");
        let payload: Box<dyn Any + Send> = Box::new(7u8);
        assert_eq!(panic_message(payload.as_ref()), "(no message)");
    }
}
