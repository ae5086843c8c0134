//! A `tokenizers::Tokenizer` rebuilt from a GGUF file's vocabulary metadata (`tokenizer.ggml.*`),
//! the way transformers rebuilds it when it loads a GGUF with `gguf_file=`:
//! - model "gpt2": byte-level BPE from tokens + merges; the text is split before BPE by the
//!   pattern that `tokenizer.ggml.pre` names (the pattern the merges were learned on).
//! - model "llama": SentencePiece-style BPE with byte fallback (`<0xNN>` tokens), spaces written
//!   as "▁" and one "▁" prepended to the text; merges from the file, or rebuilt from the scores.
//!
//! Tokens the file marks as control become special added tokens (matched whole, skipped when
//! decoding), user-defined ones plain added tokens, and BOS/EOS are added per the file's flags.

use crate::error::{Error, Result};
use crate::weights::gguf::{Array, GgufFile};
use std::collections::{HashMap, HashSet};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::{AddedToken, DecoderWrapper, SplitDelimiterBehavior, Tokenizer};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// What the chat / generation code needs besides the tokenizer itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GgufSpecialTokens {
    pub bos_id: Option<u32>,
    pub bos: Option<String>,
    pub eos_id: Option<u32>,
    pub eos: Option<String>,
    /// End of turn (`tokenizer.ggml.eot_token_id`), for chat models whose turns end with a token
    /// other than EOS.
    pub eot_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub pad_id: Option<u32>,
    /// Whether encoding with special tokens prepends BOS / appends EOS.
    pub add_bos: bool,
    pub add_eos: bool,
    /// `tokenizer.chat_template` (Jinja), if the file has one.
    pub chat_template: Option<String>,
}

/// The tokenizer the file describes, and its special-token settings.
pub fn tokenizer_from_gguf(g: &GgufFile) -> Result<(Tokenizer, GgufSpecialTokens)> {
    Error::contain_panics(
        |m| {
            Error::Tokenizer(format!(
                "{}: the tokenizer library panicked: {m}",
                g.path().display()
            ))
        },
        || build(g),
    )
}

fn build(g: &GgufFile) -> Result<(Tokenizer, GgufSpecialTokens)> {
    let path = g.path().display().to_string();
    let fail = |m: String| Error::Tokenizer(format!("{path}: {m}"));

    let model = g
        .get_str("tokenizer.ggml.model")?
        .ok_or_else(|| fail("metadata has no tokenizer.ggml.model".into()))?;
    let tokens = g
        .get_string_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| fail("metadata has no tokenizer.ggml.tokens".into()))?;
    if u32::try_from(tokens.len()).is_err() {
        return Err(fail(format!(
            "{} tokens do not fit in u32 ids",
            tokens.len()
        )));
    }
    let types = match g.get_array("tokenizer.ggml.token_type")? {
        None => vec![],
        Some(a) => a
            .to_i64_vec()
            .filter(|t| t.len() == tokens.len())
            .ok_or_else(|| {
                fail(format!(
                    "tokenizer.ggml.token_type is not {} integers",
                    tokens.len()
                ))
            })?,
    };
    let merges = match g.get_string_array("tokenizer.ggml.merges")? {
        None => None,
        Some(m) => Some(split_merges(m).map_err(fail)?),
    };

    let arch = g.architecture()?;
    let (mut tokenizer, byte_level) = match model {
        "gpt2" => (
            byte_level_bpe(g, tokens, merges.unwrap_or_default()).map_err(fail)?,
            true,
        ),
        "llama" if matches!(arch, "gemma" | "gemma2" | "gemma3" | "phi3") => {
            return Err(fail(format!(
                "SentencePiece vocabularies of architecture {arch:?} are not supported"
            )))
        }
        "llama" => {
            let merges = match merges {
                Some(m) => m,
                None => {
                    let scores = g
                        .get_array("tokenizer.ggml.scores")?
                        .and_then(Array::to_f32_vec)
                        .filter(|s| s.len() == tokens.len())
                        .ok_or_else(|| {
                            fail(format!(
                                "no merges, and tokenizer.ggml.scores is not {} numbers",
                                tokens.len()
                            ))
                        })?;
                    // Merges are ranked by score: a NaN has no rank (found by fuzzing).
                    if let Some(i) = scores.iter().position(|s| s.is_nan()) {
                        return Err(fail(format!(
                            "tokenizer.ggml.scores[{i}] is NaN; scores must be numbers"
                        )));
                    }
                    merges_from_scores(tokens, &scores)
                }
            };
            (sentencepiece_bpe(tokens, merges).map_err(fail)?, false)
        }
        other => {
            return Err(fail(format!(
                "tokenizer model {other:?} is not supported (only \"gpt2\" and \"llama\")"
            )))
        }
    };

    // Control tokens become special added tokens. In a byte-level vocabulary every real token is
    // spelled in the byte alphabet, so a "control" token that is not is a mislabel and is skipped.
    let alphabet: HashSet<char> = byte_alphabet().into_iter().collect();
    let spelled = |t: &str| !byte_level || t.chars().all(|c| alphabet.contains(&c));
    let control: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(t, &ty)| ty == TOKEN_CONTROL && spelled(t))
        .map(|(t, _)| AddedToken::from(t.clone(), true).normalized(false))
        .collect();

    // Special-token ids, checked against the vocabulary.
    let id = |key: &str| -> Result<Option<u32>> {
        match g.get_u64(&format!("tokenizer.ggml.{key}"))? {
            None => Ok(None),
            Some(v) if (v as usize) < tokens.len() => Ok(Some(v as u32)),
            Some(v) => Err(fail(format!(
                "tokenizer.ggml.{key} = {v} is not below the vocabulary size {}",
                tokens.len()
            ))),
        }
    };
    let name = |id: Option<u32>| id.map(|i| tokens[i as usize].clone());
    let (bos_id, eos_id, unk_id, pad_id) = (
        id("bos_token_id")?,
        id("eos_token_id")?,
        id("unknown_token_id")?,
        id("padding_token_id")?,
    );
    // The named special tokens are special added tokens too (transformers registers them so).
    let named: Vec<AddedToken> = [bos_id, eos_id, unk_id, pad_id]
        .into_iter()
        .flatten()
        .map(|i| AddedToken::from(tokens[i as usize].clone(), true).normalized(false))
        .collect();
    tokenizer.add_special_tokens(&control);
    tokenizer.add_special_tokens(&named);

    // User-defined tokens are matched whole but are not special; transformers adds those whose
    // spelling is in the vocabulary as stored.
    let in_vocab = tokenizer.get_vocab(false);
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(t, &ty)| ty == TOKEN_USER_DEFINED && in_vocab.contains_key(t.as_str()))
        .map(|(t, _)| AddedToken::from(t.clone(), false).normalized(false))
        .collect();
    tokenizer.add_tokens(&user);

    // SentencePiece vocabularies add BOS unless the file says otherwise (llama.cpp's default).
    let add_bos = g
        .get_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(model == "llama")
        && bos_id.is_some();
    let add_eos = g.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false) && eos_id.is_some();
    let special = GgufSpecialTokens {
        bos_id,
        bos: name(bos_id),
        eos_id,
        eos: name(eos_id),
        eot_id: id("eot_token_id")?,
        unk_id,
        pad_id,
        add_bos,
        add_eos,
        chat_template: g.get_str("tokenizer.chat_template")?.map(str::to_string),
    };
    tokenizer.with_post_processor(Some(post_processor(&special).map_err(fail)?));
    Ok((tokenizer, special))
}

/// "a b" -> ("a", "b"); a merge must be two non-empty parts around one space.
fn split_merges(merges: &[String]) -> std::result::Result<Vec<(String, String)>, String> {
    merges
        .iter()
        .map(|m| {
            let mut parts = m.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                    Ok((a.to_string(), b.to_string()))
                }
                _ => Err(format!(
                    "merge {m:?} is not two tokens separated by one space"
                )),
            }
        })
        .collect()
}

/// GPT-2's byte-to-character table: printable bytes map to themselves, the others to code
/// points from 256 up, so that every byte string is spelled in visible characters.
fn byte_alphabet() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("latin-1")
            } else {
                next += 1;
                char::from_u32(next - 1).expect("below the surrogates")
            }
        })
        .collect()
}

/// The split patterns transformers and llama.cpp use for `tokenizer.ggml.pre`.
pub(crate) const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
pub(crate) const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
pub(crate) const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
pub(crate) const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer for a byte-level vocabulary of pre-tokenizer type `pre`.
fn byte_level_pre_tokenizer(pre: Option<&str>) -> std::result::Result<PreTokenizerWrapper, String> {
    let split = |pattern: &str| -> std::result::Result<PreTokenizerWrapper, String> {
        let split = Split::new(
            SplitPattern::Regex(pattern.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| e.to_string())?;
        Ok(PreSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into())
    };
    let gpt2 = ByteLevel::new(false, true, true);
    Ok(match pre.unwrap_or("default") {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => split(LLAMA3_SPLIT)?,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => split(QWEN2_SPLIT)?,
        "tekken" => split(TEKKEN_SPLIT)?,
        "gpt-4o" | "llama4" | "kanana2" | "minimax-m2" => split(GPT4O_SPLIT)?,
        // These vocabularies were trained with every digit split off on its own (SmolLM2's
        // tokenizer.json: Digits(individual) then ByteLevel; llama.cpp: "\p{N}" then the GPT-2
        // pattern). transformers' GGUF loader leaves the digit split out, which changes the ids
        // of whitespace runs before a digit ("a\n\n1", "x  12"); we follow the model's own
        // tokenizer and llama.cpp here.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            PreSequence::new(vec![Digits::new(true).into(), gpt2.into()]).into()
        }
        "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" => gpt2.into(),
        other => {
            // transformers falls back to GPT-2's pattern for types it does not know; so do we,
            // but say so, since ids may then differ from the model's own tokenizer.
            tracing::warn!(
                "unknown tokenizer.ggml.pre {other:?}; splitting text with GPT-2's pattern"
            );
            gpt2.into()
        }
    })
}

fn byte_level_bpe(
    g: &GgufFile,
    tokens: &[String],
    merges: Vec<(String, String)>,
) -> std::result::Result<Tokenizer, String> {
    // Tokens not already spelled in the byte alphabet (a control token with a space, say) are
    // respelled byte by byte, as transformers does.
    let table = byte_alphabet();
    let alphabet: HashSet<char> = table.iter().copied().collect();
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let t = if t.chars().all(|c| alphabet.contains(&c)) {
                t.clone()
            } else {
                t.bytes().map(|b| table[b as usize]).collect()
            };
            (t, i as u32)
        })
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| format!("building the BPE model: {e}"))?;
    let pre = g.get_str("tokenizer.ggml.pre").map_err(|e| e.to_string())?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(byte_level_pre_tokenizer(pre)?));
    tok.with_decoder(Some(ByteLevel::new(true, true, true)));
    Ok(tok)
}

fn sentencepiece_bpe(
    tokens: &[String],
    merges: Vec<(String, String)>,
) -> std::result::Result<Tokenizer, String> {
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| format!("building the BPE model: {e}"))?;
    let mut tok = Tokenizer::new(bpe);
    // No normalizer: "▁" for spaces and one prepended to the first piece of text.
    tok.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::First, false)));
    let replace = Replace::new("▁", " ").map_err(|e| e.to_string())?;
    let decoders: Vec<DecoderWrapper> = vec![
        replace.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ];
    tok.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tok)
}

/// Merges for a vocabulary that only has scores (transformers' `generate_merges`): every split
/// of a token into two tokens of the vocabulary is a merge ranked by the whole token's score,
/// higher first, ties broken by the longer left part, then the longer right part, then by
/// vocabulary order.
fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    // As Python dicts: a repeated token keeps its last id, and its first position with its last
    // score in the score table.
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    let mut score_of: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
    for (t, &s) in tokens.iter().zip(scores) {
        if score_of.insert(t, s).is_none() {
            order.push(t);
        }
    }
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for token in order {
        let score = score_of[token];
        let mut local: Vec<(&str, &str, f32)> = token
            .char_indices()
            .skip(1)
            .map(|(at, _)| token.split_at(at))
            .filter(|(l, r)| ids.contains_key(l) && ids.contains_key(r))
            .map(|(l, r)| (l, r, score))
            .collect();
        local.sort_by_key(|(l, r, _)| (ids[l], ids[r]));
        merges.extend(local);
    }
    // Stable sort, descending: equal keys keep their order, as with Python's reverse=True.
    let key = |m: &(&str, &str, f32)| (m.2, m.0.chars().count(), m.1.chars().count());
    merges.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        kb.0.partial_cmp(&ka.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(kb.1.cmp(&ka.1))
            .then(kb.2.cmp(&ka.2))
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

/// BOS / EOS around each sequence, per the file's flags.
fn post_processor(s: &GgufSpecialTokens) -> std::result::Result<TemplateProcessing, String> {
    // Template pieces name special tokens by a key; the keys here are fixed words so that token
    // strings containing ':' or spaces cannot break the template syntax.
    let mut specials = vec![];
    if let (true, Some(id), Some(tok)) = (s.add_bos, s.bos_id, &s.bos) {
        specials.push(
            SpecialToken::new("bos".into(), vec![id], vec![tok.clone()])
                .map_err(|e| e.to_string())?,
        );
    }
    if let (true, Some(id), Some(tok)) = (s.add_eos, s.eos_id, &s.eos) {
        specials.push(
            SpecialToken::new("eos".into(), vec![id], vec![tok.clone()])
                .map_err(|e| e.to_string())?,
        );
    }
    let sequence = |seq: &str, type_id: u32| {
        let mut out = vec![];
        if s.add_bos {
            out.push(format!("bos:{type_id}"));
        }
        out.push(format!("{seq}:{type_id}"));
        if s.add_eos {
            out.push(format!("eos:{type_id}"));
        }
        out
    };
    let single = sequence("$A", 0);
    let pair = [sequence("$A", 0), sequence("$B", 1)].concat();
    TemplateProcessing::builder()
        .try_single(single)
        .and_then(|b| b.try_pair(pair))
        .map_err(|e| e.to_string())?
        .special_tokens(specials)
        .build()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let t = byte_alphabet();
        assert_eq!(t[b'A' as usize], 'A');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t.iter().collect::<HashSet<_>>().len(), 256);
        let theirs = ByteLevel::alphabet();
        assert!(t.iter().all(|c| theirs.contains(c)));
    }

    #[test]
    fn merges_from_scores_rank_by_score_then_length() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -0.5];
        let m = merges_from_scores(&tokens, &scores);
        let m: Vec<(&str, &str)> = m.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        // "abc" (score -0.5) splits as ab+c and a+bc; the longer left part first.
        assert_eq!(m, vec![("ab", "c"), ("a", "bc"), ("a", "b"), ("b", "c")]);
    }
}
