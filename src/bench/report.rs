//! What `anyllama bench` prints: a table for people, JSON for scripts.
//!
//! JSON (`--json`): `{"schema": 1, "tool", "version", "unix_time", "rows": [Row...]}`, one row
//! per (harness, backend, model, dtype). bench/peers/hf_transformers.py writes rows with the
//! same fields. A figure that was not measured (skipped, failed, not applicable) is null.
//!
//! | field | meaning |
//! |---|---|
//! | harness | "anyllama", or the peer's name ("transformers", "transformers+compile") |
//! | backend, device | backend name ("wgpu", "cuda", "cpu") and the device description |
//! | model, dtype, kv_dtype | shape name or model path; weight and KV-cache storage types |
//! | weights_bytes | bytes of all weights on the device |
//! | bytes_per_token | weight bytes one decode step reads (layers, norms, output, one embedding row) |
//! | prompt_tokens, gen_tokens | the decode measurement's prompt and generated lengths |
//! | decode_runs | timed decode runs (after one warm-up) |
//! | decode_tok_s | median decode tokens/s at batch 1 (tokens after the first / their time) |
//! | decode_tok_s_all | every run's decode tokens/s |
//! | ttft_ms | median time to first token: prefill of prompt_tokens plus sampling one token |
//! | prefill_tok_s | {"<prompt tokens>": median tokens/s of a prefill of that many tokens} |
//! | long_ctx_tokens, long_ctx_gen_tokens | the long-context decode: prompt and generated lengths |
//! | long_ctx_decode_tok_s | decode tokens/s after a prompt of long_ctx_tokens |
//! | peak_mem_bytes | peak device bytes during the decode measurement (weights, KV, activations) |
//! | bandwidth_gbps, bandwidth_source | the bandwidth figure ("copy": measured device copy, read + write bytes; "given": --bandwidth) |
//! | achieved_gbps | bytes_per_token * decode_tok_s / 1e9 |
//! | bandwidth_fraction | achieved_gbps / bandwidth_gbps |
//! | error | why this row has no figures (backend missing, out of memory, ...), else null |
//! | notes | anything else worth knowing (skipped for time, ...) |

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Every figure of one (harness, backend, model, dtype) measurement.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Row {
    pub harness: String,
    pub backend: String,
    pub device: String,
    pub model: String,
    pub dtype: String,
    pub kv_dtype: String,
    pub weights_bytes: Option<u64>,
    pub bytes_per_token: Option<u64>,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub decode_runs: usize,
    pub decode_tok_s: Option<f64>,
    pub decode_tok_s_all: Vec<f64>,
    pub ttft_ms: Option<f64>,
    pub prefill_tok_s: BTreeMap<String, f64>,
    pub long_ctx_tokens: Option<usize>,
    pub long_ctx_gen_tokens: Option<usize>,
    pub long_ctx_decode_tok_s: Option<f64>,
    pub peak_mem_bytes: Option<u64>,
    pub bandwidth_gbps: Option<f64>,
    pub bandwidth_source: Option<String>,
    pub achieved_gbps: Option<f64>,
    pub bandwidth_fraction: Option<f64>,
    pub error: Option<String>,
    pub notes: Vec<String>,
}

impl Row {
    /// Fills achieved_gbps and bandwidth_fraction from the other figures.
    pub fn derive_bandwidth(&mut self) {
        self.achieved_gbps = match (self.bytes_per_token, self.decode_tok_s) {
            (Some(b), Some(t)) => Some(b as f64 * t / 1e9),
            _ => None,
        };
        self.bandwidth_fraction = match (self.achieved_gbps, self.bandwidth_gbps) {
            (Some(a), Some(bw)) if bw > 0.0 => Some(a / bw),
            _ => None,
        };
    }
}

/// The whole `--json` document.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub schema: u32,
    pub tool: String,
    pub version: String,
    pub unix_time: u64,
    pub rows: Vec<Row>,
}

impl Report {
    pub fn new(rows: Vec<Row>) -> Self {
        Report {
            schema: 1,
            tool: "anyllama bench".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            rows,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plain data serialises")
    }

    /// A fixed-width table, one line per row, then each row's error and notes.
    pub fn table(&self) -> String {
        let mut prefills: Vec<usize> = self
            .rows
            .iter()
            .flat_map(|r| r.prefill_tok_s.keys().filter_map(|k| k.parse().ok()))
            .collect();
        prefills.sort_unstable();
        prefills.dedup();
        let mut head: Vec<String> = ["backend", "model", "dtype", "decode tok/s", "TTFT ms"]
            .map(String::from)
            .to_vec();
        head.extend(prefills.iter().map(|n| format!("prefill {n} tok/s")));
        head.extend(
            [
                "long-ctx decode",
                "peak MiB",
                "GB/token",
                "achieved GB/s",
                "of bandwidth",
            ]
            .map(String::from),
        );
        let num = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
        let mut lines = vec![head];
        for r in &self.rows {
            let mut l = vec![
                r.backend.clone(),
                r.model.clone(),
                r.dtype.clone(),
                num(r.decode_tok_s, 1),
                num(r.ttft_ms, 1),
            ];
            l.extend(
                prefills
                    .iter()
                    .map(|n| num(r.prefill_tok_s.get(&n.to_string()).copied(), 0)),
            );
            l.push(match (r.long_ctx_decode_tok_s, r.long_ctx_tokens) {
                (Some(t), Some(n)) => format!("{t:.1} @{n}"),
                _ => "-".into(),
            });
            l.push(num(
                r.peak_mem_bytes.map(|b| b as f64 / (1 << 20) as f64),
                0,
            ));
            l.push(num(r.bytes_per_token.map(|b| b as f64 / 1e9), 3));
            l.push(num(r.achieved_gbps, 1));
            l.push(match (r.bandwidth_fraction, r.bandwidth_gbps) {
                (Some(f), Some(bw)) => format!("{:.0}% of {bw:.0}", f * 100.0),
                _ => "-".into(),
            });
            lines.push(l);
        }
        let widths: Vec<usize> = (0..lines[0].len())
            .map(|c| lines.iter().map(|l| l[c].len()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for l in &lines {
            let cells: Vec<String> = l
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:>w$}"))
                .collect();
            out += cells.join("  ").trim_end();
            out.push('\n');
        }
        for r in &self.rows {
            if let Some(e) = &r.error {
                out += &format!("{} {} {}: error: {e}\n", r.backend, r.model, r.dtype);
            }
            for n in &r.notes {
                out += &format!("{} {} {}: {n}\n", r.backend, r.model, r.dtype);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_is_derived_and_the_table_lists_every_row() {
        let mut r = Row {
            backend: "cpu".into(),
            model: "tiny".into(),
            dtype: "bf16".into(),
            bytes_per_token: Some(2_000_000_000),
            decode_tok_s: Some(10.0),
            bandwidth_gbps: Some(40.0),
            ..Default::default()
        };
        r.prefill_tok_s.insert("512".into(), 100.0);
        r.derive_bandwidth();
        assert_eq!(r.achieved_gbps, Some(20.0));
        assert_eq!(r.bandwidth_fraction, Some(0.5));
        let failed = Row {
            backend: "cuda".into(),
            error: Some("no CUDA".into()),
            ..Default::default()
        };
        let rep = Report::new(vec![r, failed]);
        let t = rep.table();
        assert!(
            t.contains("prefill 512 tok/s") && t.contains("50% of 40"),
            "{t}"
        );
        assert!(t.contains("cuda") && t.contains("error: no CUDA"), "{t}");
        let back: Report = serde_json::from_str(&rep.to_json()).unwrap();
        assert_eq!(back.rows, rep.rows);
    }
}
