//! `/metrics` in the Prometheus text format (version 0.0.4): request
//! counts and latencies by route, sandboxes by state, and the durations of
//! boots, restores and snapshots. Written by hand: a few counters and
//! histograms do not need a metrics framework.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Debug, Clone, Default)]
struct Histogram {
    /// Cumulative counts per bucket of [`BUCKETS`].
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bound, bucket) in BUCKETS.iter().zip(self.buckets.iter_mut()) {
            if seconds <= *bound {
                *bucket += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, count) in BUCKETS.iter().zip(self.buckets) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// A sandbox operation whose duration is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Operation {
    /// Create or start: until the agent answers.
    Boot,
    Restore,
    Snapshot,
}

impl Operation {
    fn label(self) -> &'static str {
        match self {
            Operation::Boot => "boot",
            Operation::Restore => "restore",
            Operation::Snapshot => "snapshot",
        }
    }
}

#[derive(Default)]
struct Inner {
    /// (method, route, status) -> count.
    requests: BTreeMap<(String, String, u16), u64>,
    /// (method, route) -> latency.
    latency: BTreeMap<(String, String), Histogram>,
    operations: BTreeMap<Operation, Histogram>,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    /// One finished request. `route` is the matched route template (never
    /// the raw path, so label values stay few).
    pub fn request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        *inner
            .requests
            .entry((method.to_string(), route.to_string(), status))
            .or_default() += 1;
        inner
            .latency
            .entry((method.to_string(), route.to_string()))
            .or_default()
            .observe(elapsed.as_secs_f64());
    }

    pub fn operation(&self, operation: Operation, elapsed: Duration) {
        if let Ok(mut inner) = self.inner.lock() {
            inner
                .operations
                .entry(operation)
                .or_default()
                .observe(elapsed.as_secs_f64());
        }
    }

    /// The exposition text; `sandboxes` counts sandboxes by state.
    pub fn render(&self, sandboxes: &BTreeMap<String, u64>) -> String {
        let mut out = String::new();
        out.push_str("# HELP arrakis_sandboxes Sandboxes by lifecycle state.\n");
        out.push_str("# TYPE arrakis_sandboxes gauge\n");
        for (state, count) in sandboxes {
            let _ = writeln!(out, "arrakis_sandboxes{{state=\"{state}\"}} {count}");
        }
        let Ok(inner) = self.inner.lock() else {
            return out;
        };
        out.push_str("# HELP arrakis_http_requests_total HTTP requests by route and status.\n");
        out.push_str("# TYPE arrakis_http_requests_total counter\n");
        for ((method, route, status), count) in &inner.requests {
            let _ = writeln!(
                out,
                "arrakis_http_requests_total{{method=\"{method}\",route=\"{}\",status=\"{status}\"}} {count}",
                escape(route)
            );
        }
        out.push_str("# HELP arrakis_http_request_duration_seconds HTTP request latency.\n");
        out.push_str("# TYPE arrakis_http_request_duration_seconds histogram\n");
        for ((method, route), histogram) in &inner.latency {
            let labels = format!("method=\"{method}\",route=\"{}\"", escape(route));
            histogram.render(&mut out, "arrakis_http_request_duration_seconds", &labels);
        }
        out.push_str(
            "# HELP arrakis_operation_duration_seconds Sandbox boots (until the agent answers), restores and snapshots.\n",
        );
        out.push_str("# TYPE arrakis_operation_duration_seconds histogram\n");
        for (operation, histogram) in &inner.operations {
            let labels = format!("operation=\"{}\"", operation.label());
            histogram.render(&mut out, "arrakis_operation_duration_seconds", &labels);
        }
        out
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let metrics = Metrics::default();
        metrics.request("GET", "/v1/vms", 200, Duration::from_millis(3));
        metrics.request("GET", "/v1/vms", 200, Duration::from_millis(300));
        metrics.operation(Operation::Boot, Duration::from_millis(1100));
        let text = metrics.render(&BTreeMap::from([("running".to_string(), 2)]));
        assert!(
            text.contains("arrakis_sandboxes{state=\"running\"} 2\n"),
            "{text}"
        );
        assert!(text.contains(
            "arrakis_http_requests_total{method=\"GET\",route=\"/v1/vms\",status=\"200\"} 2\n"
        ));
        assert!(text.contains(
            "arrakis_http_request_duration_seconds_bucket{method=\"GET\",route=\"/v1/vms\",le=\"0.005\"} 1\n"
        ));
        assert!(text.contains(
            "arrakis_http_request_duration_seconds_bucket{method=\"GET\",route=\"/v1/vms\",le=\"0.5\"} 2\n"
        ));
        assert!(text.contains(
            "arrakis_http_request_duration_seconds_count{method=\"GET\",route=\"/v1/vms\"} 2\n"
        ));
        assert!(text.contains(
            "arrakis_operation_duration_seconds_bucket{operation=\"boot\",le=\"1\"} 0\n"
        ));
        assert!(text.contains(
            "arrakis_operation_duration_seconds_bucket{operation=\"boot\",le=\"2.5\"} 1\n"
        ));
        assert_eq!(escape("a\"b\\c\n"), "a\\\"b\\\\c\\n");
    }
}
