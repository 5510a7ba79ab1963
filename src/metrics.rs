//! Prometheus metrics: request counts and latency histograms per endpoint,
//! recorded on every request, and pool gauges filled from memory at scrape
//! time. Nothing here touches the database.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The endpoints we label by: a fixed set, so a client probing random paths
/// cannot grow the label space.
pub const ENDPOINTS: &[&str] = &[
    "/get-proxy",
    "/feedback",
    "/health",
    "/stats",
    "/sources",
    "/metrics",
    "/judge",
    "/admin",
    "/",
    "/openapi.json",
    "other",
];

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    pub active_proxies: IntGauge,
    pub active_by_protocol: IntGaugeVec,
    pub active_by_anonymity: IntGaugeVec,
    pub source_pool: IntGaugeVec,
    pub source_banned: IntGaugeVec,
    pub source_requests: IntGaugeVec,
    pub source_feedback: IntGaugeVec,
    pub fetch_parsed: IntGaugeVec,
    pub fetch_failures: IntGaugeVec,
    pub cycle_checked: IntGauge,
    pub cycle_alive: IntGauge,
    pub cycle_duration_ms: IntGauge,
    pub database_up: IntGauge,
    pub gateway: GatewayMetrics,
}

/// The rotating gateway's figures, counted as they happen.
#[derive(Clone)]
pub struct GatewayMetrics {
    pub connections_open: IntGauge,
    pub connections_total: IntCounter,
    /// Connections refused at `max_connections`.
    pub connections_refused: IntCounter,
    /// Plain http requests by outcome (see `gateway::RequestOutcome`).
    pub requests: IntCounterVec,
    /// CONNECT and socks tunnels by outcome (see `gateway::TunnelOutcome`).
    pub tunnels: IntCounterVec,
    /// Pool proxies tried.
    pub attempts: IntCounter,
    /// Failed attempts by reason (see `gateway::FailureReason`).
    pub failures: IntCounterVec,
    /// Bytes relayed, by direction: `to_client` or `to_target`.
    pub bytes: IntCounterVec,
    pub sessions: IntGauge,
}

impl GatewayMetrics {
    fn new() -> GatewayMetrics {
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("metric");
        let counter_vec = |name: &str, help: &str, label: &str| {
            IntCounterVec::new(Opts::new(name, help), &[label]).expect("metric")
        };
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("metric");
        GatewayMetrics {
            connections_open: gauge(
                "proxy_pool_gateway_connections_open",
                "Gateway client connections open now",
            ),
            connections_total: counter(
                "proxy_pool_gateway_connections_total",
                "Gateway client connections accepted",
            ),
            connections_refused: counter(
                "proxy_pool_gateway_connections_refused_total",
                "Gateway client connections refused at max_connections",
            ),
            requests: counter_vec(
                "proxy_pool_gateway_requests_total",
                "Plain http requests through the gateway by outcome",
                "outcome",
            ),
            tunnels: counter_vec(
                "proxy_pool_gateway_tunnels_total",
                "CONNECT and socks tunnels through the gateway by outcome",
                "outcome",
            ),
            attempts: counter(
                "proxy_pool_gateway_attempts_total",
                "Pool proxies tried by the gateway",
            ),
            failures: counter_vec(
                "proxy_pool_gateway_failures_total",
                "Failed gateway attempts by reason",
                "reason",
            ),
            bytes: counter_vec(
                "proxy_pool_gateway_bytes_total",
                "Bytes relayed by the gateway by direction",
                "direction",
            ),
            sessions: gauge(
                "proxy_pool_gateway_sessions",
                "Sticky gateway sessions in memory",
            ),
        }
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.connections_open.clone()),
            Box::new(self.connections_total.clone()),
            Box::new(self.connections_refused.clone()),
            Box::new(self.requests.clone()),
            Box::new(self.tunnels.clone()),
            Box::new(self.attempts.clone()),
            Box::new(self.failures.clone()),
            Box::new(self.bytes.clone()),
            Box::new(self.sessions.clone()),
        ]
    }

    /// Each label's count of `counters`, for /stats (labels seen so far).
    pub fn by_label(counters: &IntCounterVec) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for family in prometheus::core::Collector::collect(counters) {
            for metric in family.get_metric() {
                let label = metric
                    .get_label()
                    .first()
                    .map(|l| l.value().to_string())
                    .unwrap_or_default();
                out.push((label, metric.get_counter().get_value() as u64));
            }
        }
        out.sort();
        out
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "proxy_pool_http_requests_total",
                "HTTP requests by endpoint and status",
            ),
            &["endpoint", "status"],
        )
        .expect("metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "proxy_pool_http_request_duration_seconds",
                "HTTP request handling time by endpoint",
            )
            .buckets(vec![
                0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                0.25, 1.0,
            ]),
            &["endpoint"],
        )
        .expect("metric");
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("metric");
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels).expect("metric")
        };
        let metrics = Metrics {
            requests,
            latency,
            active_proxies: gauge("proxy_pool_active_proxies", "Active proxies in memory"),
            active_by_protocol: gauge_vec(
                "proxy_pool_active_proxies_by_protocol",
                "Active proxies by protocol",
                &["protocol"],
            ),
            active_by_anonymity: gauge_vec(
                "proxy_pool_active_proxies_by_anonymity",
                "Active proxies by anonymity",
                &["anonymity"],
            ),
            source_pool: gauge_vec(
                "proxy_pool_source_pool_size",
                "Active proxies not banned for the source",
                &["source"],
            ),
            source_banned: gauge_vec(
                "proxy_pool_source_banned",
                "Proxies banned for the source",
                &["source"],
            ),
            source_requests: gauge_vec(
                "proxy_pool_source_requests",
                "get-proxy requests of the source",
                &["source"],
            ),
            source_feedback: gauge_vec(
                "proxy_pool_source_feedback",
                "Feedback reports of the source",
                &["source"],
            ),
            fetch_parsed: gauge_vec(
                "proxy_pool_list_parsed",
                "Proxies parsed from the list by its last fetch",
                &["list"],
            ),
            fetch_failures: gauge_vec(
                "proxy_pool_list_consecutive_failures",
                "Consecutive failed fetches of the list",
                &["list"],
            ),
            cycle_checked: gauge(
                "proxy_pool_validation_checked",
                "Proxies checked by the last cycle",
            ),
            cycle_alive: gauge(
                "proxy_pool_validation_alive",
                "Proxies alive in the last cycle",
            ),
            cycle_duration_ms: gauge(
                "proxy_pool_validation_duration_milliseconds",
                "Duration of the last validation cycle",
            ),
            database_up: gauge(
                "proxy_pool_database_up",
                "1 when the database answered last",
            ),
            registry,
            gateway: GatewayMetrics::new(),
        };
        let mut collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.requests.clone()),
            Box::new(metrics.latency.clone()),
            Box::new(metrics.active_proxies.clone()),
            Box::new(metrics.active_by_protocol.clone()),
            Box::new(metrics.active_by_anonymity.clone()),
            Box::new(metrics.source_pool.clone()),
            Box::new(metrics.source_banned.clone()),
            Box::new(metrics.source_requests.clone()),
            Box::new(metrics.source_feedback.clone()),
            Box::new(metrics.fetch_parsed.clone()),
            Box::new(metrics.fetch_failures.clone()),
            Box::new(metrics.cycle_checked.clone()),
            Box::new(metrics.cycle_alive.clone()),
            Box::new(metrics.cycle_duration_ms.clone()),
            Box::new(metrics.database_up.clone()),
        ];
        collectors.extend(metrics.gateway.collectors());
        for collector in collectors {
            metrics
                .registry
                .register(collector)
                .expect("register metric");
        }
        metrics
    }

    /// Maps a request path to its endpoint label.
    pub fn endpoint_label(path: &str) -> &'static str {
        if path.starts_with("/sources/") {
            return "/sources";
        }
        if path.starts_with("/admin/") {
            return "/admin";
        }
        ENDPOINTS
            .iter()
            .find(|e| **e == path)
            .copied()
            .unwrap_or("other")
    }

    pub fn observe(&self, endpoint: &str, status: u16, seconds: f64) {
        let status = status.to_string();
        self.requests.with_label_values(&[endpoint, &status]).inc();
        self.latency.with_label_values(&[endpoint]).observe(seconds);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(err) = encoder.encode(&self.registry.gather(), &mut buffer) {
            log::warn!("cannot encode metrics: {err}");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
