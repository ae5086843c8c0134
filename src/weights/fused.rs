//! Phi-3 stores q, k, v as one `qkv_proj` matrix and gate, up as one `gate_up_proj` (GGUF:
//! `attn_qkv`, and `ffn_up` of twice the width). `SplitFused` shows such a source under Llama's
//! names: each projection is a band of rows of the fused matrix (rows are whole blocks in every
//! stored format, so the band's bytes are a slice of the fused tensor's, quantized or not).

use super::{HostTensor, TensorMeta, TensorSource};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use std::borrow::Cow;

pub struct SplitFused<S> {
    inner: S,
    q: usize,
    kv: usize,
    ffn: usize,
}

/// Where a split name's rows live: the fused tensor, the first row and the row count.
struct Band {
    fused: String,
    start: usize,
    rows: usize,
}

impl<S: TensorSource> SplitFused<S> {
    pub fn new(inner: S, cfg: &ModelConfig) -> Self {
        SplitFused {
            inner,
            q: cfg.q_dim(),
            kv: cfg.kv_dim(),
            ffn: cfg.ffn_dim,
        }
    }

    /// The band of a fused tensor holding `name`, when the source stores it fused.
    fn band(&self, name: &str) -> Result<Option<Band>> {
        let (q, kv, ffn) = (self.q, self.kv, self.ffn);
        let Some((prefix, rest)) = split_layer(name) else {
            return Ok(None);
        };
        let (fused, start, rows) = match rest {
            "self_attn.q_proj.weight" => ("self_attn.qkv_proj.weight", 0, q),
            "self_attn.k_proj.weight" => ("self_attn.qkv_proj.weight", q, kv),
            "self_attn.v_proj.weight" => ("self_attn.qkv_proj.weight", q + kv, kv),
            "mlp.gate_proj.weight" => ("mlp.gate_up_proj.weight", 0, ffn),
            "mlp.up_proj.weight" => ("mlp.gate_up_proj.weight", ffn, ffn),
            "attn_q.weight" => ("attn_qkv.weight", 0, q),
            "attn_k.weight" => ("attn_qkv.weight", q, kv),
            "attn_v.weight" => ("attn_qkv.weight", q + kv, kv),
            "ffn_gate.weight" => ("ffn_up.weight", 0, ffn),
            "ffn_up.weight" => ("ffn_up.weight", ffn, ffn),
            _ => return Ok(None),
        };
        let fused = format!("{prefix}{fused}");
        // A split tensor stored under its own name wins, except llama.cpp's `ffn_up`, which is
        // the fused gate + up exactly when it has twice the rows and no `ffn_gate` exists.
        if fused != name && self.inner.meta(name)?.is_some() {
            return Ok(None);
        }
        let Some(meta) = self.inner.meta(&fused)? else {
            return Ok(None);
        };
        let want = if fused.ends_with("qkv.weight") || fused.ends_with("qkv_proj.weight") {
            q + 2 * kv
        } else {
            2 * ffn
        };
        if fused == name && (meta.shape.first() != Some(&want) || self.has_gate(prefix)?) {
            return Ok(None);
        }
        if meta.shape.len() != 2 || meta.shape[0] != want {
            return Err(Error::Config(format!(
                "tensor {fused} has shape {:?}; the config implies [{want}, _] (fused)",
                meta.shape
            )));
        }
        Ok(Some(Band { fused, start, rows }))
    }

    fn has_gate(&self, prefix: &str) -> Result<bool> {
        Ok(self
            .inner
            .meta(&format!("{prefix}ffn_gate.weight"))?
            .is_some())
    }
}

/// "model.layers.3.self_attn.q_proj.weight" -> ("model.layers.3.", "self_attn.q_proj.weight"),
/// likewise "blk.3.attn_q.weight".
fn split_layer(name: &str) -> Option<(&str, &str)> {
    let head = ["model.layers.", "blk."]
        .into_iter()
        .find(|h| name.starts_with(h))?;
    let after = &name[head.len()..];
    let dot = after.find('.')?;
    after[..dot].parse::<usize>().ok()?;
    let cut = head.len() + dot + 1;
    Some((&name[..cut], &name[cut..]))
}

impl<S: TensorSource> TensorSource for SplitFused<S> {
    fn names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for n in self.inner.names() {
            let split: &[&str] = match split_layer(&n).map(|(_, r)| r) {
                Some("self_attn.qkv_proj.weight") => &["q_proj", "k_proj", "v_proj"],
                Some("mlp.gate_up_proj.weight") => &["gate_proj", "up_proj"],
                Some("attn_qkv.weight") => &["attn_q", "attn_k", "attn_v"],
                _ => &[],
            };
            if split.is_empty() {
                out.push(n);
                continue;
            }
            let (prefix, _) = split_layer(&n).expect("matched above");
            let block = if n.contains("self_attn.") {
                "self_attn."
            } else if n.contains("mlp.") {
                "mlp."
            } else {
                ""
            };
            out.extend(split.iter().map(|s| format!("{prefix}{block}{s}.weight")));
        }
        // llama.cpp's fused ffn_up shows as ffn_gate + ffn_up.
        let fused_up: Vec<String> = out
            .iter()
            .filter(|n| n.ends_with(".ffn_up.weight"))
            .filter(|n| self.band(n).ok().flatten().is_some_and(|b| b.fused == **n))
            .map(|n| n.replace(".ffn_up.", ".ffn_gate."))
            .collect();
        out.extend(fused_up);
        out
    }

    fn get(&self, name: &str) -> Result<Option<HostTensor<'_>>> {
        let Some(band) = self.band(name)? else {
            return self.inner.get(name);
        };
        let t = self
            .inner
            .get(&band.fused)?
            .ok_or_else(|| Error::Config(format!("tensor {} vanished", band.fused)))?;
        let row = t.data.len() / t.shape[0];
        let range = band.start * row..(band.start + band.rows) * row;
        let data = match t.data {
            Cow::Borrowed(d) => Cow::Borrowed(&d[range]),
            Cow::Owned(d) => Cow::Owned(d[range].to_vec()),
        };
        Ok(Some(HostTensor {
            dtype: t.dtype,
            shape: vec![band.rows, t.shape[1]],
            data,
        }))
    }

    fn meta(&self, name: &str) -> Result<Option<TensorMeta>> {
        let Some(band) = self.band(name)? else {
            return self.inner.meta(name);
        };
        let m = self
            .inner
            .meta(&band.fused)?
            .ok_or_else(|| Error::Config(format!("tensor {} vanished", band.fused)))?;
        Ok(Some(TensorMeta {
            dtype: m.dtype,
            shape: vec![band.rows, m.shape[1]],
            bytes: m.bytes / m.shape[0] * band.rows,
        }))
    }

    fn total_bytes(&self) -> usize {
        self.inner.total_bytes()
    }
}
