//! Prometheus metrics: microvms by state (from the store), latency histograms of launch,
//! suspend and resume, error and request counters. Written by hand in the text exposition
//! format: a handful of series do not need a metrics framework. Served on the operator's
//! own listener ([`router`]), never on the tenants' API.

use crate::service::Service;
use axum::extract::State;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

/// Histogram bucket bounds in seconds.
const BUCKETS: &[f64] = &[0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    n: u64,
}

/// The daemon's metrics.
#[derive(Default)]
pub struct Metrics {
    hist: Mutex<BTreeMap<&'static str, Histogram>>,
    errors: Mutex<BTreeMap<String, u64>>,
    requests: Mutex<BTreeMap<(String, u16), u64>>,
}

impl Metrics {
    /// Records one latency of `what` (launch, suspend, resume).
    pub fn observe(&self, what: &'static str, d: Duration) {
        let mut h = self.hist.lock().unwrap_or_else(|p| p.into_inner());
        let e = h.entry(what).or_default();
        if e.counts.is_empty() {
            e.counts = vec![0; BUCKETS.len()];
        }
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                e.counts[i] += 1;
            }
        }
        e.sum += s;
        e.n += 1;
    }

    /// Counts a failed `what`.
    pub fn error(&self, what: &str) {
        *self.errors.lock().unwrap_or_else(|p| p.into_inner()).entry(what.to_owned()).or_default() += 1;
    }

    /// Counts an API request.
    pub fn request(&self, op: &str, status: u16) {
        *self.requests.lock().unwrap_or_else(|p| p.into_inner()).entry((op.to_owned(), status)).or_default() += 1;
    }

    /// The exposition text, with `states` (microvms by state).
    pub fn render(&self, states: &[(String, i64)]) -> String {
        let mut o = String::new();
        o.push_str("# HELP hearth_microvms Microvms by state.\n# TYPE hearth_microvms gauge\n");
        for st in crate::lifecycle::MicrovmState::ALL.iter().map(|s| s.as_str()) {
            let n = states.iter().find(|(s, _)| s == st).map_or(0, |(_, n)| *n);
            o.push_str(&format!("hearth_microvms{{state=\"{st}\"}} {n}\n"));
        }
        for (what, h) in self.hist.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            o.push_str(&format!("# HELP hearth_{what}_seconds Microvm {what} latency.\n# TYPE hearth_{what}_seconds histogram\n"));
            for (i, b) in BUCKETS.iter().enumerate() {
                o.push_str(&format!("hearth_{what}_seconds_bucket{{le=\"{b}\"}} {}\n", h.counts[i]));
            }
            o.push_str(&format!(
                "hearth_{what}_seconds_bucket{{le=\"+Inf\"}} {}\nhearth_{what}_seconds_sum {}\nhearth_{what}_seconds_count {}\n",
                h.n, h.sum, h.n
            ));
        }
        o.push_str("# HELP hearth_errors_total Failed microvm actions.\n# TYPE hearth_errors_total counter\n");
        for (what, n) in self.errors.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            o.push_str(&format!("hearth_errors_total{{action=\"{what}\"}} {n}\n"));
        }
        o.push_str("# HELP hearth_requests_total API requests.\n# TYPE hearth_requests_total counter\n");
        for ((op, status), n) in self.requests.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            o.push_str(&format!("hearth_requests_total{{operation=\"{op}\",status=\"{status}\"}} {n}\n"));
        }
        o
    }
}

/// The operator's metrics listener: `GET /metrics` (the exposition text) and nothing else.
/// Served apart from the API (`hearth serve --metrics-listen`): the counts, latencies and
/// per-operation traffic of all tenants are the operator's to see.
pub fn router(svc: Arc<Service>) -> axum::Router {
    axum::Router::new().route("/metrics", axum::routing::get(scrape)).with_state(svc)
}

async fn scrape(State(svc): State<Arc<Service>>) -> impl axum::response::IntoResponse {
    let states = svc.microvm_counts().await;
    let mut text = svc.metrics.render(&states);
    text.push_str(&svc.capacity_metrics().await);
    text.push_str(&svc.pools.render());
    ([("content-type", "text/plain; version=0.0.4")], text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn metrics_are_served_on_their_own_listener_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("hearth.db")).unwrap();
        let token_key = crate::ingress::TokenKey::load_or_create(dir.path()).unwrap();
        let vm = hearth_vmm::VmConfig::new("/nonexistent/vmlinuz", "/nonexistent/initramfs");
        let svc = Arc::new(Service::new(store, dir.path().into(), dir.path().into(), vm, token_key));
        let serve = |router: axum::Router| async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(l, router).await });
            addr
        };
        let api = serve(crate::server::router(svc.clone())).await;
        let metrics = serve(router(svc.clone())).await;
        let r = reqwest::get(format!("http://{metrics}/metrics")).await.unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        assert!(text.contains("hearth_microvms{state=\"RUNNING\"} 0"), "{text}");
        assert!(text.contains(&format!("hearth_host_vcpus{{of=\"capacity\"}} {}", svc.capacity.vcpus)), "{text}");
        assert!(text.contains("hearth_host_memory_mib{of=\"held\"} 0"), "{text}");
        // On the API, an unsigned request like any other.
        let r = reqwest::get(format!("http://{api}/metrics")).await.unwrap();
        assert_eq!(r.status(), 403);
        assert!(!r.text().await.unwrap().contains("hearth_microvms"));
        // The metrics listener serves nothing else.
        assert_eq!(reqwest::get(format!("http://{metrics}/health")).await.unwrap().status(), 404);
    }
}
