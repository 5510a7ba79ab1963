//! What the rotating gateway asks of the state beyond get-proxy and
//! feedback: whether the proxy a sticky session is pinned to may still be
//! used, as get-proxy would judge it.

use chrono::{DateTime, Utc};

use super::{compile_filter, millis, Pick, PickQuery, State};
use crate::proxy::ProxyKey;

impl State {
    /// The proxy at `url` as get-proxy shows it, when it is active, matches
    /// `query`'s filters and is not banned for `source`; `None` otherwise.
    /// Counted as one request of the source, as a get-proxy answer is.
    pub fn pick_if_eligible(
        &self,
        source: &str,
        url: &str,
        query: &PickQuery,
        now: DateTime<Utc>,
    ) -> Option<Pick> {
        let now_ms = millis(now);
        let registry = self.registry.read();
        let slot = registry.slot_of_url(url)?;
        if !compile_filter(query).matches(registry.meta(slot)?) {
            return None;
        }
        let entry = registry.entry(slot)?;
        let proxy = &entry.active.as_ref()?.proxy;
        let handle = self.sources.read().get(source).cloned()?;
        let mut source_state = handle.lock();
        source_state.lift_expired_bans(now_ms, &self.rules);
        let score = match source_state.entries.get_mut(&slot) {
            Some(stats) if stats.banned_until.is_some() => return None,
            Some(stats) => {
                stats.last_used = now_ms;
                stats.score
            }
            None => self.rules.initial_score,
        };
        source_state.requests += 1;
        source_state.last_request = now_ms;
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(Pick::of(&entry.url, proxy, score))
    }
}

/// The proxy a URL of get-proxy's names, credentials included.
pub fn proxy_key_of_url(url: &str) -> Option<ProxyKey> {
    super::url::parse_proxy_url(url)
}
