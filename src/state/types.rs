//! What the state manager's callers hand in and get back: the get-proxy
//! query and its answer, the reasons for no answer, feedback outcomes, and
//! the figures of the introspection views. Plain data, no behaviour beyond
//! naming.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::proxy::{ActiveProxy, Anonymity, Protocol, ProxyKey};

/// What a get-proxy asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PickQuery {
    pub protocol: Option<Protocol>,
    /// Only proxies whose last https check succeeded (`supports_https`).
    pub https_only: bool,
    /// ISO 3166 alpha-2, any case.
    pub country: Option<String>,
    /// `Anonymous` also accepts elite proxies.
    pub anonymity: Option<Anonymity>,
    pub max_latency_ms: Option<u32>,
    /// Distinct proxies wanted, 1 to [`MAX_COUNT`](super::MAX_COUNT) (clamped).
    pub count: usize,
}

impl Default for PickQuery {
    fn default() -> PickQuery {
        PickQuery {
            protocol: None,
            https_only: false,
            country: None,
            anonymity: None,
            max_latency_ms: None,
            count: 1,
        }
    }
}

/// One proxy handed to a client, with what the get-proxy JSON shows.
#[derive(Clone, Debug, PartialEq)]
pub struct Pick {
    pub id: i64,
    /// The URL the client uses, credentials included.
    pub url: String,
    pub protocol: Protocol,
    pub ip: IpAddr,
    pub port: u16,
    pub latency_ms: Option<u32>,
    pub anonymity: Option<Anonymity>,
    pub country: Option<String>,
    /// This source's score for the proxy.
    pub score: i32,
    pub last_validated_at: Option<DateTime<Utc>>,
    /// What gave the proxy away (see [`ActiveProxy::anonymity_evidence`]).
    pub anonymity_evidence: Option<Arc<str>>,
    /// An http proxy that also tunnels CONNECT; `None` when not checked.
    pub supports_https: Option<bool>,
}

impl Pick {
    /// `proxy`, served under `url` with this source's `score`.
    pub(crate) fn of(url: &str, proxy: &ActiveProxy, score: i32) -> Pick {
        Pick {
            id: proxy.id,
            url: url.to_string(),
            protocol: proxy.key.protocol,
            ip: proxy.key.ip,
            port: proxy.key.port,
            latency_ms: proxy.latency_ms,
            anonymity: proxy.anonymity,
            country: proxy.country.clone(),
            score,
            last_validated_at: proxy.last_validated_at,
            anonymity_evidence: proxy.anonymity_evidence.clone(),
            supports_https: proxy.supports_https,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoProxyReason {
    /// No proxy is active at all.
    NoActive,
    /// Active proxies exist, but none matches the filters.
    NoMatch,
    /// Every matching proxy is banned for this source.
    AllBanned,
    /// The source is new and `max_sources` exist already.
    TooManySources(TooManySources),
}

impl NoProxyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            NoProxyReason::NoActive => "no_active",
            NoProxyReason::NoMatch => "no_match",
            NoProxyReason::AllBanned => "all_banned",
            NoProxyReason::TooManySources(_) => "too_many_sources",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no proxy available ({})", reason.as_str())]
pub struct NoProxy {
    pub reason: NoProxyReason,
    /// For `AllBanned`: until the earliest ban among the matching proxies ends.
    pub retry_after: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FeedbackError {
    /// The message leaves the URL out: it may hold credentials.
    #[error("unknown proxy: expected a proxy URL as get-proxy returned it")]
    UnknownProxy,
    #[error(transparent)]
    TooManySources(#[from] TooManySources),
}

/// A new source was refused: `max_sources` exist already.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("too many sources: at most {max_sources} are kept (one idle for a week with no stats is dropped); reuse a source name")]
pub struct TooManySources {
    pub max_sources: usize,
}

/// A source's stats for one proxy after a feedback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedbackOutcome {
    pub score: i32,
    pub success_count: u64,
    pub failure_count: u64,
    pub is_banned: bool,
    pub banned_until: Option<DateTime<Utc>>,
}

/// Pool figures for /stats and /metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub active: usize,
    /// Every proxy known to this process (active or not).
    pub known: usize,
    pub by_protocol: Vec<(Protocol, usize)>,
    /// `None`: anonymity not determined.
    pub by_anonymity: Vec<(Option<Anonymity>, usize)>,
    /// Largest first; proxies of unknown country are left out.
    pub by_country: Vec<(String, usize)>,
    /// By name.
    pub sources: Vec<SourceSummary>,
    pub requests: u64,
    pub feedbacks: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceSummary {
    pub name: String,
    /// Active proxies this source may be given, ignoring filters.
    pub pool_size: usize,
    /// Proxies banned for this source now (active or not).
    pub banned: usize,
    /// Proxies this source has stats for.
    pub entries: usize,
    pub requests: u64,
    pub feedbacks: u64,
    /// Feedbacks that reported a success, and a failure.
    pub successes: u64,
    pub failures: u64,
}

/// One source's stats, best estimate first, for /sources/NAME.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceView {
    pub name: String,
    pub requests: u64,
    pub feedbacks: u64,
    /// How many entries exist in all (the list may be cut at `limit`).
    pub total_entries: usize,
    pub entries: Vec<SourceEntry>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SourceEntry {
    /// Redact with [`ProxyKey::redacted`] where credentials must not show.
    pub key: ProxyKey,
    pub active: bool,
    pub score: i32,
    /// The estimated chance that the proxy works for this source: the
    /// mean of the posterior the choice draws from.
    pub estimate: f64,
    /// The recency-discounted counts behind the estimate.
    pub discounted_successes: f64,
    pub discounted_failures: f64,
    pub success_count: u64,
    pub failure_count: u64,
    pub is_banned: bool,
    pub banned_until: Option<DateTime<Utc>>,
    pub last_used: DateTime<Utc>,
    /// What gave the proxy away, while it is active.
    pub anonymity_evidence: Option<Arc<str>>,
}

/// What [`State::restore`] kept and dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// When the snapshot was taken.
    pub taken_at: DateTime<Utc>,
    pub sources: usize,
    pub entries: usize,
    /// Idle for longer than [`STATS_MAX_IDLE`].
    pub aged_out: usize,
    /// Naming a URL that is not a proxy URL, or no URL at all.
    pub invalid: usize,
    /// Proxies of the snapshot's active set made active.
    pub active: usize,
    /// Active proxies left out: checked longer ago than the bound (see
    /// [`active_snapshot_max_age`]), or with a URL that is not a proxy URL.
    pub active_stale: usize,
    /// Active proxies left out because the database's active set was
    /// loaded already: a snapshot never overrides it.
    pub active_superseded: usize,
}
