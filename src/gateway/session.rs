//! Sticky sessions: (source, session ID) pinned to one pool proxy's URL,
//! in memory only, forgotten `session_ttl` after their last use.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Sessions kept at once; past this, a new session is not pinned (its
/// connections rotate) until old ones expire.
pub const MAX_SESSIONS: usize = 100_000;

pub struct Sessions {
    ttl: Duration,
    pinned: Mutex<HashMap<(String, String), Pin>>,
}

struct Pin {
    url: String,
    last_used: Instant,
}

impl Sessions {
    pub fn new(ttl: Duration) -> Sessions {
        Sessions {
            ttl,
            pinned: Mutex::new(HashMap::new()),
        }
    }

    /// The proxy URL the session is pinned to, unless it expired (then it is
    /// forgotten). A lookup is a use.
    pub fn get(&self, source: &str, id: &str, now: Instant) -> Option<String> {
        let mut pinned = self.pinned.lock();
        let key = (source.to_string(), id.to_string());
        let pin = pinned.get_mut(&key)?;
        if now.saturating_duration_since(pin.last_used) > self.ttl {
            pinned.remove(&key);
            return None;
        }
        pin.last_used = now;
        Some(pin.url.clone())
    }

    /// Pins the session to `url` (replacing what it held).
    pub fn pin(&self, source: &str, id: &str, url: &str, now: Instant) {
        let mut pinned = self.pinned.lock();
        if pinned.len() >= MAX_SESSIONS {
            let ttl = self.ttl;
            pinned.retain(|_, pin| now.saturating_duration_since(pin.last_used) <= ttl);
            if pinned.len() >= MAX_SESSIONS {
                return;
            }
        }
        pinned.insert(
            (source.to_string(), id.to_string()),
            Pin {
                url: url.to_string(),
                last_used: now,
            },
        );
    }

    /// Forgets the session if it still holds `url` (its proxy failed).
    pub fn unpin(&self, source: &str, id: &str, url: &str) {
        let mut pinned = self.pinned.lock();
        let key = (source.to_string(), id.to_string());
        if pinned.get(&key).is_some_and(|pin| pin.url == url) {
            pinned.remove(&key);
        }
    }

    pub fn len(&self) -> usize {
        self.pinned.lock().len()
    }

    /// Drops expired sessions and returns how many are left.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut pinned = self.pinned.lock();
        let ttl = self.ttl;
        pinned.retain(|_, pin| now.saturating_duration_since(pin.last_used) <= ttl);
        pinned.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_holds_its_proxy_until_it_expires() {
        let sessions = Sessions::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(sessions.get("app", "s1", t0), None);
        sessions.pin("app", "s1", "http://1.2.3.4:80", t0);
        assert_eq!(
            sessions
                .get("app", "s1", t0 + Duration::from_secs(9))
                .as_deref(),
            Some("http://1.2.3.4:80")
        );
        // The lookup at 9 s was a use: 18 s is 9 s after it.
        assert!(sessions
            .get("app", "s1", t0 + Duration::from_secs(18))
            .is_some());
        assert_eq!(
            sessions.get("app", "s1", t0 + Duration::from_secs(29)),
            None
        );
        assert_eq!(sessions.sweep(t0), 0);
    }

    #[test]
    fn sessions_are_per_source_and_unpinned_only_for_their_proxy() {
        let sessions = Sessions::new(Duration::from_secs(10));
        let t0 = Instant::now();
        sessions.pin("a", "s", "http://1.1.1.1:1", t0);
        sessions.pin("b", "s", "http://2.2.2.2:2", t0);
        assert_eq!(
            sessions.get("a", "s", t0).as_deref(),
            Some("http://1.1.1.1:1")
        );
        sessions.unpin("a", "s", "http://2.2.2.2:2");
        assert!(sessions.get("a", "s", t0).is_some());
        sessions.unpin("a", "s", "http://1.1.1.1:1");
        assert_eq!(sessions.get("a", "s", t0), None);
        assert_eq!(sessions.sweep(t0), 1);
        assert_eq!(sessions.sweep(t0 + Duration::from_secs(11)), 0);
    }
}
