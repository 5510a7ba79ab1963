//! JSON shapes of the API's answers, built from the state manager's, the
//! fetcher's and the validator's figures. Credentials never appear here
//! except in a pick, whose URL is what the client needs to use the proxy.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Map, Value};

use crate::config::redact_url;
use crate::state::{FeedbackOutcome, Pick, SourceView};
use crate::validator::cycle::CycleSummary;

use super::ApiContext;

pub fn time(at: Option<DateTime<Utc>>) -> Value {
    match at {
        Some(at) => Value::String(at.to_rfc3339_opts(SecondsFormat::Secs, true)),
        None => Value::Null,
    }
}

pub fn pick(pick: &Pick, source: Option<&str>) -> Value {
    let mut object = Map::with_capacity(13);
    if let Some(source) = source {
        object.insert("source".into(), Value::String(source.to_string()));
    }
    object.insert("proxy".into(), Value::String(pick.url.clone()));
    object.insert(
        "protocol".into(),
        Value::String(pick.protocol.as_str().into()),
    );
    object.insert("ip".into(), Value::String(pick.ip.to_string()));
    object.insert("port".into(), json!(pick.port));
    object.insert("latency_ms".into(), json!(pick.latency_ms));
    object.insert(
        "anonymity".into(),
        json!(pick.anonymity.map(|a| a.as_str())),
    );
    object.insert("country".into(), json!(pick.country));
    object.insert("score".into(), json!(pick.score));
    object.insert("last_validated_at".into(), time(pick.last_validated_at));
    object.insert(
        "anonymity_evidence".into(),
        json!(pick.anonymity_evidence.as_deref()),
    );
    object.insert("supports_https".into(), json!(pick.supports_https));
    Value::Object(object)
}

pub fn feedback(source: &str, proxy: &str, outcome: &FeedbackOutcome) -> Value {
    json!({
        "source": source,
        "proxy": proxy,
        "score": outcome.score,
        "success_count": outcome.success_count,
        "failure_count": outcome.failure_count,
        "is_banned": outcome.is_banned,
        "banned_until": time(outcome.banned_until),
    })
}

pub fn health(context: &ApiContext) -> Value {
    let database_up = context.health.database_up();
    json!({
        "status": if database_up { "ok" } else { "degraded" },
        "database": if database_up { "up" } else { "down" },
        "active_proxies": context.state.active_count(),
        "snapshot_age_seconds": context.health.snapshot_age_seconds(),
    })
}

pub fn cycle(summary: &CycleSummary) -> Value {
    json!({
        "started_at": time(summary.started_at),
        "duration_ms": summary.duration.as_millis() as u64,
        "due": summary.due,
        "checked": summary.checked,
        "alive": summary.alive,
        "dead": summary.dead(),
        "dead_by_reason": summary.dead_counts(),
        "write_ms": summary.write_time.as_millis() as u64,
        "skipped": summary.skipped.as_ref().map(|reason| reason.to_string()),
    })
}

pub fn stats(context: &ApiContext, now: DateTime<Utc>) -> Value {
    let summary = context.state.summary(now);
    let by_protocol: Map<String, Value> = summary
        .by_protocol
        .iter()
        .map(|(p, n)| (p.as_str().to_string(), json!(n)))
        .collect();
    let by_anonymity: Map<String, Value> = summary
        .by_anonymity
        .iter()
        .map(|(a, n)| {
            (
                a.map(|a| a.as_str()).unwrap_or("unknown").to_string(),
                json!(n),
            )
        })
        .collect();
    let by_country: Map<String, Value> = summary
        .by_country
        .iter()
        .map(|(c, n)| (c.clone(), json!(n)))
        .collect();
    let sources: Vec<Value> = summary
        .sources
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "pool_size": s.pool_size,
                "banned": s.banned,
                "entries": s.entries,
                "requests": s.requests,
                "feedbacks": s.feedbacks,
                "successes": s.successes,
                "failures": s.failures,
                "success_rate": success_rate(s.successes, s.failures),
            })
        })
        .collect();
    let lists: Vec<Value> = context
        .fetcher
        .statuses()
        .iter()
        .map(|s| {
            json!({
                "name": redact_url(&s.name),
                "url": redact_url(&s.url),
                "interval_seconds": s.interval.as_secs(),
                "fetches": s.fetches,
                "last_started_at": time(s.last_started_at),
                "last_success_at": time(s.last_success_at),
                "duration_ms": s.last_duration.map(|d| d.as_millis() as u64),
                "bytes": s.counts.bytes,
                "lines": s.counts.lines,
                "parsed": s.counts.parsed,
                "new": s.counts.new,
                "rejected": s.counts.rejected,
                "duplicates": s.counts.duplicates,
                "truncated": s.counts.truncated,
                "not_modified": s.not_modified(),
                "last_error": s.last_error,
                "consecutive_failures": s.consecutive_failures,
                "yield": s.yields.as_ref().map(|y| json!({
                    "listed": y.listed,
                    "active_now": y.active_now,
                    "ever_active": y.ever_active,
                })),
            })
        })
        .collect();
    let history = context.validator.history();
    let in_progress = context.validator.progress().map(|p| {
        use std::sync::atomic::Ordering::Relaxed;
        json!({
            "due": p.due.load(Relaxed),
            "checked": p.checked.load(Relaxed),
            "alive": p.alive.load(Relaxed),
        })
    });
    let last_cycle = history.last().map(cycle);
    let recent = history.iter().rev().map(cycle).collect::<Vec<_>>();
    json!({
        "active_proxies": summary.active,
        "known_proxies": summary.known,
        "by_protocol": by_protocol,
        "by_anonymity": by_anonymity,
        "by_country": by_country,
        "requests": summary.requests,
        "feedbacks": summary.feedbacks,
        "sources": sources,
        "lists": lists,
        "validation": {
            "last_cycle": last_cycle,
            "recent_cycles": recent,
            "in_progress": in_progress,
        },
        "latency_histogram": latency_histogram(context),
        "pool_history": context
            .health
            .pool_history()
            .iter()
            .map(|(at, active)| json!({ "at": time(Some(*at)), "active": active }))
            .collect::<Vec<_>>(),
        "database": if context.health.database_up() { "up" } else { "down" },
        "snapshot_age_seconds": context.health.snapshot_age_seconds(),
    })
}

/// Bounds of the latency histogram, in milliseconds; not cumulative.
const LATENCY_BOUNDS_MS: [u32; 8] = [100, 250, 500, 1000, 2000, 3000, 5000, 10000];

fn latency_histogram(context: &ApiContext) -> Vec<Value> {
    let counts = context.state.latency_histogram(&LATENCY_BOUNDS_MS);
    counts
        .iter()
        .enumerate()
        .map(|(i, count)| json!({ "le_ms": LATENCY_BOUNDS_MS.get(i), "count": count }))
        .collect()
}

pub fn source_view(view: &SourceView) -> Value {
    let proxies: Vec<Value> = view
        .entries
        .iter()
        .map(|e| {
            json!({
                "proxy": e.key.redacted(),
                "active": e.active,
                "score": e.score,
                "estimate": e.estimate,
                "discounted_successes": e.discounted_successes,
                "discounted_failures": e.discounted_failures,
                "success_count": e.success_count,
                "failure_count": e.failure_count,
                "is_banned": e.is_banned,
                "banned_until": time(e.banned_until),
                "last_used": time(Some(e.last_used)),
                "anonymity_evidence": e.anonymity_evidence.as_deref(),
            })
        })
        .collect();
    json!({
        "source": view.name,
        "requests": view.requests,
        "feedbacks": view.feedbacks,
        "total_entries": view.total_entries,
        "proxies": proxies,
    })
}

/// Fills the pool gauges from memory, then renders every metric.
pub fn metrics(context: &ApiContext) -> String {
    let metrics = &context.metrics;
    let summary = context.state.summary(Utc::now());
    metrics.active_proxies.set(summary.active as i64);
    for (protocol, n) in &summary.by_protocol {
        metrics
            .active_by_protocol
            .with_label_values(&[protocol.as_str()])
            .set(*n as i64);
    }
    for (anonymity, n) in &summary.by_anonymity {
        let label = anonymity.map(|a| a.as_str()).unwrap_or("unknown");
        metrics
            .active_by_anonymity
            .with_label_values(&[label])
            .set(*n as i64);
    }
    for source in &summary.sources {
        let label = [source.name.as_str()];
        metrics
            .source_pool
            .with_label_values(&label)
            .set(source.pool_size as i64);
        metrics
            .source_banned
            .with_label_values(&label)
            .set(source.banned as i64);
        metrics
            .source_requests
            .with_label_values(&label)
            .set(source.requests as i64);
        metrics
            .source_feedback
            .with_label_values(&label)
            .set(source.feedbacks as i64);
    }
    for status in context.fetcher.statuses() {
        let label = [redact_url(&status.name)];
        let label = [label[0].as_str()];
        metrics
            .fetch_parsed
            .with_label_values(&label)
            .set(status.counts.parsed as i64);
        metrics
            .fetch_failures
            .with_label_values(&label)
            .set(i64::from(status.consecutive_failures));
    }
    if let Some(last) = context.validator.history().pop() {
        metrics.cycle_checked.set(last.checked as i64);
        metrics.cycle_alive.set(last.alive as i64);
        metrics
            .cycle_duration_ms
            .set(last.duration.as_millis() as i64);
    }
    metrics
        .database_up
        .set(i64::from(context.health.database_up()));
    metrics.render()
}

/// The share of feedbacks that reported a success, `null` before any.
fn success_rate(successes: u64, failures: u64) -> Value {
    let total = successes.saturating_add(failures);
    if total == 0 {
        return Value::Null;
    }
    json!(successes as f64 / total as f64)
}
