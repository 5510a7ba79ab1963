//! `proxy-pool stats`: the service's /stats JSON as plain-text tables for a
//! terminal. Pure, so it is tested on a JSON value.

use std::fmt::Write;

use serde_json::Value;

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Renders rows as a table with a header, columns padded to their widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(width) = widths.get_mut(i) {
                *width = (*width).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "  {}", padded.join("  ").trim_end());
    };
    line(
        &mut out,
        &headers.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
    );
    for row in rows {
        line(&mut out, row);
    }
    out
}

fn counts(object: &Value) -> Vec<Vec<String>> {
    object
        .as_object()
        .map(|map| map.iter().map(|(k, v)| vec![k.clone(), text(v)]).collect())
        .unwrap_or_default()
}

pub fn render(stats: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "active proxies: {}   known: {}   database: {}   snapshot age: {} s",
        text(&stats["active_proxies"]),
        text(&stats["known_proxies"]),
        text(&stats["database"]),
        text(&stats["snapshot_age_seconds"])
    );
    let _ = writeln!(out, "\nby protocol");
    out.push_str(&table(
        &["protocol", "active"],
        &counts(&stats["by_protocol"]),
    ));
    let _ = writeln!(out, "\nby anonymity");
    out.push_str(&table(
        &["anonymity", "active"],
        &counts(&stats["by_anonymity"]),
    ));
    let countries: Vec<Vec<String>> = counts(&stats["by_country"]).into_iter().take(10).collect();
    if !countries.is_empty() {
        let _ = writeln!(out, "\ntop countries");
        out.push_str(&table(&["country", "active"], &countries));
    }
    let lists: Vec<Vec<String>> = stats["lists"]
        .as_array()
        .map(|lists| {
            lists
                .iter()
                .map(|l| {
                    vec![
                        text(&l["name"]),
                        text(&l["last_started_at"]),
                        text(&l["parsed"]),
                        text(&l["new"]),
                        text(&l["rejected"]),
                        format!(
                            "{}/{}",
                            text(&l["yield"]["active_now"]),
                            text(&l["yield"]["listed"])
                        ),
                        text(&l["last_error"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    let _ = writeln!(out, "\nlists");
    out.push_str(&table(
        &[
            "list",
            "last fetch",
            "parsed",
            "new",
            "rejected",
            "active/listed",
            "error",
        ],
        &lists,
    ));
    let cycles: Vec<Vec<String>> = stats["validation"]["recent_cycles"]
        .as_array()
        .map(|cycles| {
            cycles
                .iter()
                .take(5)
                .map(|c| {
                    vec![
                        text(&c["started_at"]),
                        text(&c["duration_ms"]),
                        text(&c["checked"]),
                        text(&c["alive"]),
                        text(&c["dead"]),
                        text(&c["skipped"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    let _ = writeln!(out, "\nvalidation cycles (newest first)");
    out.push_str(&table(
        &["started", "ms", "checked", "alive", "dead", "skipped"],
        &cycles,
    ));
    let sources: Vec<Vec<String>> = stats["sources"]
        .as_array()
        .map(|sources| {
            sources
                .iter()
                .map(|s| {
                    vec![
                        text(&s["name"]),
                        text(&s["pool_size"]),
                        text(&s["banned"]),
                        text(&s["requests"]),
                        text(&s["feedbacks"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    let _ = writeln!(out, "\nsources");
    out.push_str(&table(
        &["source", "pool", "banned", "requests", "feedback"],
        &sources,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_pad_columns_and_show_missing_values_as_dashes() {
        let stats = json!({
            "active_proxies": 12, "known_proxies": 40, "database": "up", "snapshot_age_seconds": null,
            "by_protocol": {"http": 10, "socks5": 2},
            "by_anonymity": {"elite": 7},
            "by_country": {},
            "lists": [{"name": "speedx", "last_started_at": "2026-11-22T12:00:00Z", "parsed": 900,
                       "new": 3, "rejected": 1, "yield": {"active_now": 12, "listed": 900}, "last_error": null}],
            "validation": {"recent_cycles": [{"started_at": "t", "duration_ms": 5, "checked": 40,
                           "alive": 12, "dead": 28, "skipped": null}]},
            "sources": [{"name": "crawler", "pool_size": 12, "banned": 1, "requests": 30, "feedbacks": 29}]
        });
        let out = render(&stats);
        assert!(
            out.contains("active proxies: 12   known: 40   database: up   snapshot age: - s"),
            "{out}"
        );
        assert!(out.contains("  http      10"), "{out}");
        assert!(out.contains("speedx"), "{out}");
        assert!(out.contains("12/900"), "{out}");
        assert!(
            out.contains("  crawler  12    1       30        29"),
            "{out}"
        );
    }
}
