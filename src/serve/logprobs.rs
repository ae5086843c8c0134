//! `logprobs` in OpenAI's two shapes: chat's `{"content": [{token, logprob, bytes,
//! top_logprobs}]}` and the legacy completions' `{tokens, token_logprobs, top_logprobs,
//! text_offset}`. A token's text is its own decoding (a piece of a multi-byte character decodes
//! to U+FFFD; `bytes` then holds that replacement's bytes, not the raw byte).

use crate::tokenizer::Tokenizer;
use serde_json::{json, Map, Value};

fn text(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

fn entry(tok: &Tokenizer, id: u32, logprob: f32) -> Value {
    let t = text(tok, id);
    json!({"token": t, "logprob": logprob, "bytes": t.as_bytes()})
}

/// Chat: the `logprobs` of a choice (or of a chunk) for `tokens`.
pub fn chat(tok: &Tokenizer, tokens: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(tok, t.id, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|&(id, lp)| entry(tok, id, lp)).collect();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Completions: the `logprobs` of a choice (or of a chunk) for `tokens`, whose text starts at
/// character offset `offset` of the completion.
pub fn text_completion(tok: &Tokenizer, tokens: &[TokenLogprob], mut offset: usize) -> Value {
    let (mut strs, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for t in tokens {
        let s = text(tok, t.id);
        offsets.push(offset);
        offset += s.chars().count();
        strs.push(s);
        lps.push(t.logprob);
        // Keyed by text: where two alternatives decode alike (pieces of characters), the more
        // likely one stands for both.
        let mut top = Map::new();
        for &(id, lp) in &t.top {
            top.entry(text(tok, id)).or_insert(json!(lp));
        }
        tops.push(Value::Object(top));
    }
    json!({"tokens": strs, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// A generated token's log-probability under the model (the log-softmax of its raw logits,
/// before temperature, penalties and truncation), and the `top` most likely tokens'.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// The log-probability of `id` and the `top` largest under log_softmax(logits).
pub fn token_logprobs(logits: &[f32], id: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = max
        + logits
            .iter()
            .map(|&l| ((l - max) as f64).exp())
            .sum::<f64>()
            .ln() as f32;
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    for (t, &l) in logits.iter().enumerate() {
        if best.len() < top || best.last().is_some_and(|&(_, b)| l > b) {
            let at = best.partition_point(|&(_, b)| b >= l);
            best.insert(at, (t as u32, l));
            best.truncate(top);
        }
    }
    TokenLogprob {
        id,
        logprob: logits[id as usize] - lse,
        top: best.into_iter().map(|(t, l)| (t, l - lse)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_logprobs_is_log_softmax_with_the_largest_first() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5];
        let lse = logits.iter().map(|&l| (l as f64).exp()).sum::<f64>().ln();
        let t = token_logprobs(&logits, 4, 3);
        assert!((t.logprob as f64 - (0.5 - lse)).abs() < 1e-6);
        let ids: Vec<u32> = t.top.iter().map(|p| p.0).collect();
        assert_eq!(ids, [1, 3, 0]);
        for &(id, lp) in &t.top {
            assert!((lp as f64 - (logits[id as usize] as f64 - lse)).abs() < 1e-6);
        }
        assert!(token_logprobs(&logits, 0, 0).top.is_empty());
    }
}
