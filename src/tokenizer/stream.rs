//! Streaming decode: text for each generated token as soon as it is final.
//!
//! Decoding tokens one by one and concatenating is wrong in two ways. Byte-level BPE and
//! SentencePiece byte fallback split a multi-byte character over several tokens, and a token
//! alone decodes to U+FFFD; SentencePiece decoders also drop the leading space of the first token
//! they see. So each step decodes a small window (the last emitted token as context plus the new
//! ones), emits the window's text minus the context's text, and emits nothing while the text
//! ends in U+FFFD (a character still incomplete).
//!
//! SentencePiece byte fallback decodes a run of `<0xXX>` tokens as one unit: if any byte of the
//! run is invalid UTF-8, every byte of it becomes U+FFFD, even characters that were complete.
//! So text is also held back while such a run may still grow. With that, streaming is exact:
//! the concatenation of everything returned plus `finish()` equals `decode(all ids)`.

use super::Tokenizer;
use crate::error::Result;

/// Incremental decoder; create one with [`Tokenizer::stream_decoder`].
pub struct StreamDecoder {
    tokenizer: Tokenizer,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    /// Start of the window decoded at each step: context already emitted.
    prefix_offset: usize,
    /// Ids before this one have been emitted.
    read_offset: usize,
    /// Everything returned so far, checked against the full decode in `finish`.
    emitted: String,
    /// The decoder merges runs of `<0xXX>` byte tokens (SentencePiece byte fallback).
    byte_fallback: bool,
}

impl StreamDecoder {
    pub(super) fn new(tokenizer: Tokenizer, skip_special_tokens: bool) -> StreamDecoder {
        let byte_fallback = tokenizer
            .inner
            .get_decoder()
            .and_then(|decoder| serde_json::to_string(decoder).ok())
            .is_some_and(|json| json.contains("\"ByteFallback\""));
        StreamDecoder {
            byte_fallback,
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            emitted: String::new(),
        }
    }

    /// Adds one token id and returns the text it completes (often empty while a character is
    /// split across tokens).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let context = self.decode(self.prefix_offset, self.read_offset)?;
        let window = self.decode(self.prefix_offset, self.ids.len())?;
        let complete =
            window.len() > context.len() && !window.ends_with('\u{FFFD}') && !self.in_byte_run();
        match window.strip_prefix(context.as_str()) {
            Some(new_text) if complete => {
                let new_text = new_text.to_string();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                self.emitted.push_str(&new_text);
                Ok(new_text)
            }
            _ => Ok(String::new()),
        }
    }

    /// Returns the text not yet emitted (a trailing incomplete character comes out as U+FFFD,
    /// as in a full decode) and resets the decoder for a new sequence.
    pub fn finish(&mut self) -> Result<String> {
        let full = self.decode(0, self.ids.len())?;
        let rest = match full.strip_prefix(self.emitted.as_str()) {
            Some(rest) => rest.to_string(),
            None => {
                // A decoder whose output for earlier tokens depends on later ones; the streamed
                // text cannot be taken back, so finish the window the usual way.
                tracing::warn!("streamed text is not a prefix of the full decode");
                let context = self.decode(self.prefix_offset, self.read_offset)?;
                let window = self.decode(self.prefix_offset, self.ids.len())?;
                window
                    .strip_prefix(context.as_str())
                    .map(str::to_string)
                    .unwrap_or_default()
            }
        };
        self.ids.clear();
        self.prefix_offset = 0;
        self.read_offset = 0;
        self.emitted.clear();
        Ok(rest)
    }

    /// The ids pushed since the last `finish`.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Whether the last token that reaches the decoder is a byte-fallback token, so that the run
    /// of bytes it belongs to may still grow (skipped special tokens do not end a run).
    fn in_byte_run(&self) -> bool {
        if !self.byte_fallback {
            return false;
        }
        let inner = &self.tokenizer.inner;
        let visible = self
            .ids
            .iter()
            .rev()
            .filter_map(|&id| inner.id_to_token(id))
            .find(|token| {
                !(self.skip_special_tokens && inner.get_added_vocabulary().is_special_token(token))
            });
        visible.is_some_and(|token| is_byte_token(&token))
    }

    fn decode(&self, start: usize, end: usize) -> Result<String> {
        if start == end {
            return Ok(String::new());
        }
        self.tokenizer
            .decode(&self.ids[start..end], self.skip_special_tokens)
    }
}

/// `<0xXX>`, the spelling ByteFallback decodes as a raw byte.
fn is_byte_token(token: &str) -> bool {
    let bytes = token.as_bytes();
    bytes.len() == 6
        && token.starts_with("<0x")
        && bytes[5] == b'>'
        && u8::from_str_radix(&token[3..5], 16).is_ok()
}
