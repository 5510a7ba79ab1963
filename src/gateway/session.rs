//! Sticky sessions: (source, session ID) pinned to one pool proxy's URL,
//! in memory only, forgotten `session_ttl` after their last use. A session
//! whose proxy failed remembers it, so that it moves to another one.

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

/// What a session holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pin {
    /// The proxy of its last successful attempt, while it has not failed.
    pub url: Option<String>,
    /// The proxy that failed it last: the next choice avoids it.
    pub failed: Option<String>,
    last_used: Option<Instant>,
}

impl Sessions {
    pub fn new(ttl: Duration) -> Sessions {
        Sessions {
            ttl,
            pinned: Mutex::new(HashMap::new()),
        }
    }

    fn expired(&self, pin: &Pin, now: Instant) -> bool {
        pin.last_used
            .is_none_or(|used| now.saturating_duration_since(used) > self.ttl)
    }

    /// What the session holds, unless it expired (then it is forgotten). A
    /// lookup is a use.
    pub fn get(&self, source: &str, id: &str, now: Instant) -> Option<Pin> {
        let mut pinned = self.pinned.lock();
        let key = (source.to_string(), id.to_string());
        let pin = pinned.get(&key)?;
        if self.expired(pin, now) {
            pinned.remove(&key);
            return None;
        }
        let pin = pinned.get_mut(&key)?;
        pin.last_used = Some(now);
        Some(pin.clone())
    }

    fn upsert(&self, source: &str, id: &str, now: Instant, change: impl FnOnce(&mut Pin)) {
        let mut pinned = self.pinned.lock();
        let key = (source.to_string(), id.to_string());
        if !pinned.contains_key(&key) && pinned.len() >= MAX_SESSIONS {
            pinned.retain(|_, pin| !self.expired(pin, now));
            if pinned.len() >= MAX_SESSIONS {
                return;
            }
        }
        let pin = pinned.entry(key).or_default();
        change(pin);
        pin.last_used = Some(now);
    }

    /// Pins the session to `url`.
    pub fn pin(&self, source: &str, id: &str, url: &str, now: Instant) {
        self.upsert(source, id, now, |pin| {
            pin.url = Some(url.to_string());
            pin.failed = None;
        });
    }

    /// Records that `url` failed the session: it is no longer pinned to it.
    pub fn fail(&self, source: &str, id: &str, url: &str, now: Instant) {
        self.upsert(source, id, now, |pin| {
            if pin.url.as_deref().is_none_or(|pinned| pinned == url) {
                pin.url = None;
                pin.failed = Some(url.to_string());
            }
        });
    }

    pub fn len(&self) -> usize {
        self.pinned.lock().len()
    }

    /// Drops expired sessions and returns how many are left.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut pinned = self.pinned.lock();
        pinned.retain(|_, pin| !self.expired(pin, now));
        pinned.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(pin: Option<Pin>) -> Option<String> {
        pin.and_then(|pin| pin.url)
    }

    #[test]
    fn a_session_holds_its_proxy_until_it_expires() {
        let sessions = Sessions::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(sessions.get("app", "s1", t0), None);
        sessions.pin("app", "s1", "http://1.2.3.4:80", t0);
        assert_eq!(
            url(sessions.get("app", "s1", t0 + Duration::from_secs(9))).as_deref(),
            Some("http://1.2.3.4:80")
        );
        // The lookup at 9 s was a use: 18 s is 9 s after it.
        assert!(url(sessions.get("app", "s1", t0 + Duration::from_secs(18))).is_some());
        assert_eq!(
            sessions.get("app", "s1", t0 + Duration::from_secs(29)),
            None
        );
        assert_eq!(sessions.sweep(t0 + Duration::from_secs(29)), 0);
    }

    #[test]
    fn a_failed_proxy_is_unpinned_and_remembered() {
        let sessions = Sessions::new(Duration::from_secs(10));
        let t0 = Instant::now();
        sessions.pin("a", "s", "http://1.1.1.1:1", t0);
        sessions.pin("b", "s", "http://2.2.2.2:2", t0);
        // Another proxy's failure leaves the pin alone.
        sessions.fail("a", "s", "http://2.2.2.2:2", t0);
        assert_eq!(
            url(sessions.get("a", "s", t0)).as_deref(),
            Some("http://1.1.1.1:1")
        );
        sessions.fail("a", "s", "http://1.1.1.1:1", t0);
        let pin = sessions.get("a", "s", t0).unwrap();
        assert_eq!(pin.url, None);
        assert_eq!(pin.failed.as_deref(), Some("http://1.1.1.1:1"));
        sessions.pin("a", "s", "http://3.3.3.3:3", t0);
        let pin = sessions.get("a", "s", t0).unwrap();
        assert_eq!(
            (pin.url.as_deref(), pin.failed),
            (Some("http://3.3.3.3:3"), None)
        );
        assert_eq!(sessions.len(), 2);
        assert_eq!(sessions.sweep(t0 + Duration::from_secs(11)), 0);
    }
}
