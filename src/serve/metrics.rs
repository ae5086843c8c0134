//! `GET /metrics`: the engine's counters in Prometheus' text format (version 0.0.4). The engine
//! thread updates them as it admits, steps and retires requests; the HTTP side only reads them
//! (and counts the requests it turns away). Everything is an atomic or a short lock, so a
//! scrape never waits for a step.

use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Upper bounds (seconds) of the time-to-first-token histogram's buckets.
const TTFT_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Window of the tokens-per-second gauge.
const RATE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Metrics {
    pub admitted: AtomicU64,
    pub rejected: AtomicU64,
    /// Finished requests by reason: stop, length, cancelled (client gone), error.
    pub finished: [AtomicU64; 4],
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens whose KV came from the prefix cache instead of a forward.
    pub prefix_hit_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub steps: AtomicU64,
    ttft: Mutex<Histogram>,
    rate: Mutex<VecDeque<(Instant, u64)>>,
}

#[derive(Default)]
struct Histogram {
    counts: [u64; TTFT_BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// Why a request left the engine, as /metrics counts it.
#[derive(Clone, Copy)]
pub enum Ended {
    Stop = 0,
    Length = 1,
    Cancelled = 2,
    Error = 3,
}

const ENDED: [&str; 4] = ["stop", "length", "cancelled", "error"];

/// The engine's state that /metrics shows beside the counters.
pub struct Gauges {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_total: usize,
    pub kv_blocks_free: usize,
}

impl Metrics {
    pub fn ended(&self, why: Ended) {
        self.finished[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn first_token(&self, waited: Duration) {
        let s = waited.as_secs_f64();
        let mut h = self.ttft.lock().unwrap_or_else(|e| e.into_inner());
        for (c, &le) in h.counts.iter_mut().zip(&TTFT_BUCKETS) {
            if s <= le {
                *c += 1;
            }
        }
        h.sum += s;
        h.count += 1;
    }

    /// One engine step that generated `tokens` tokens.
    pub fn step(&self, tokens: u64, now: Instant) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.generated_tokens.fetch_add(tokens, Ordering::Relaxed);
        let mut r = self.rate.lock().unwrap_or_else(|e| e.into_inner());
        r.push_back((now, tokens));
        while r.front().is_some_and(|&(t, _)| now - t > RATE_WINDOW) {
            r.pop_front();
        }
    }

    /// Generated tokens per second over the last RATE_WINDOW (0 when idle that long).
    fn tokens_per_second(&self, now: Instant) -> f64 {
        let r = self.rate.lock().unwrap_or_else(|e| e.into_inner());
        let recent = r.iter().filter(|&&(t, _)| now - t <= RATE_WINDOW);
        let tokens: u64 = recent.map(|&(_, n)| n).sum();
        match r.front() {
            Some(&(first, _)) if tokens > 0 => {
                tokens as f64
                    / (now - first)
                        .as_secs_f64()
                        .max(RATE_WINDOW.as_secs_f64() / 10.0)
            }
            _ => 0.0,
        }
    }

    pub fn render(&self, g: &Gauges) -> String {
        let mut o = String::new();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut metric = |name: &str, kind: &str, help: &str, lines: &[(String, String)]| {
            let _ = writeln!(
                o,
                "# HELP anyllama_{name} {help}\n# TYPE anyllama_{name} {kind}"
            );
            for (labels, v) in lines {
                let _ = writeln!(o, "anyllama_{name}{labels} {v}");
            }
        };
        let one = |v: String| vec![(String::new(), v)];
        metric(
            "requests_admitted_total",
            "counter",
            "Requests the engine admitted.",
            &one(load(&self.admitted).to_string()),
        );
        metric(
            "requests_rejected_total",
            "counter",
            "Requests refused with 429 (queue full).",
            &one(load(&self.rejected).to_string()),
        );
        let finished: Vec<_> = ENDED
            .iter()
            .zip(&self.finished)
            .map(|(r, c)| (format!("{{reason=\"{r}\"}}"), load(c).to_string()))
            .collect();
        metric(
            "requests_finished_total",
            "counter",
            "Requests that left the engine, by reason.",
            &finished,
        );
        metric(
            "requests_running",
            "gauge",
            "Requests generating now.",
            &one(g.running.to_string()),
        );
        metric(
            "requests_waiting",
            "gauge",
            "Requests queued for admission.",
            &one(g.waiting.to_string()),
        );
        metric(
            "kv_blocks_total",
            "gauge",
            "Blocks of the shared paged KV cache.",
            &one(g.kv_blocks_total.to_string()),
        );
        metric(
            "kv_blocks_used",
            "gauge",
            "KV blocks held by running requests.",
            &one((g.kv_blocks_total - g.kv_blocks_free.min(g.kv_blocks_total)).to_string()),
        );
        metric(
            "prompt_tokens_total",
            "counter",
            "Prompt tokens prefilled.",
            &one(load(&self.prompt_tokens).to_string()),
        );
        metric(
            "prefix_cache_hit_tokens_total",
            "counter",
            "Prompt tokens served from the prefix cache.",
            &one(load(&self.prefix_hit_tokens).to_string()),
        );
        metric(
            "generation_tokens_total",
            "counter",
            "Tokens generated.",
            &one(load(&self.generated_tokens).to_string()),
        );
        metric(
            "engine_steps_total",
            "counter",
            "Forward calls of the engine.",
            &one(load(&self.steps).to_string()),
        );
        let rate = self.tokens_per_second(Instant::now());
        metric(
            "generation_tokens_per_second",
            "gauge",
            "Tokens generated per second over the last 10 s.",
            &one(format!("{rate:.3}")),
        );
        let h = self.ttft.lock().unwrap_or_else(|e| e.into_inner());
        let mut lines: Vec<_> = TTFT_BUCKETS
            .iter()
            .zip(&h.counts)
            .map(|(le, c)| (format!("_bucket{{le=\"{le}\"}}"), c.to_string()))
            .collect();
        lines.push(("_bucket{le=\"+Inf\"}".into(), h.count.to_string()));
        lines.push(("_sum".into(), format!("{:.6}", h.sum)));
        lines.push(("_count".into(), h.count.to_string()));
        metric(
            "time_to_first_token_seconds",
            "histogram",
            "From a request's arrival to its first token.",
            &lines,
        );
        o
    }
}
