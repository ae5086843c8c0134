//! Fine-tuning datasets: a JSONL file becomes tokenized samples with per-row labels, tokenized
//! once and cached, then shuffled into micro-batches per epoch.
//!
//! One sample per line; the format is found per line from its keys, the first that matches:
//! - `{"messages": [{"role", "content"}, ...]}` (chat): rendered with the model's own chat
//!   template. Loss on the assistant turns only (TRL's assistant-only loss, Unsloth's
//!   train_on_responses_only): each assistant turn's tokens are the ones that rendering
//!   `messages[..=i]` adds to `messages[..i]` rendered with the generation prompt, so the
//!   end-of-turn marker the template writes after the content (`<|im_end|>\n`,
//!   `<|eot_id|>`) carries loss too and the model learns to stop. Every such rendering must be
//!   a text prefix of the whole conversation's; a template that renders earlier turns
//!   differently once later ones exist (Qwen3 dropping old reasoning) is an error, as its
//!   assistant turns cannot be located. Roles: system, user, assistant, tool.
//! - `{"prompt", "completion"}`: joined by plain concatenation (as TRL does); loss on the
//!   completion.
//! - `{"instruction", "input" (optional, may be empty or null), "output"}` (Alpaca): the prompt
//!   is the Stanford Alpaca template ("Below is an instruction that describes a task...",
//!   see `format::alpaca_prompt`) and the answer is the output; loss on the output.
//! - `{"text"}`: loss on every token.
//!
//! Outside chat (where the template writes its own special tokens) a sample is BOS (when the
//! tokenizer adds one) + the text + EOS (with loss: the end of the answer is learned). The
//! prompt/answer boundary is found on tokens, not characters: the prompt is tokenized alone and
//! the answer's loss starts at the first token where the whole sample's tokens differ, so a
//! token merged across the boundary belongs to the answer (the same rule places chat turns).
//! `LossOn::All` puts loss on every token of every format.
//!
//! Labels are next-token targets per row (`MicroBatch`'s form): row i of a sample predicts
//! token i+1 when that token carries loss, else -100; a sample's last row predicts nothing.
//! Samples longer than `seq` keep their start; samples left with no labelled row are dropped.
//! Bad lines are errors `FILE:LINE: why`, or skipped and counted with `skip_bad_lines`; blank
//! lines are skipped silently. What happened is a [`Report`] the caller prints.
//!
//! Batching ([`Dataset::epoch`]) is a pure function of (seed, epoch), so a resumed run recomputes
//! its data order instead of storing it.

mod batching;
mod cache;
mod format;

pub use cache::CacheStatus;
pub use format::Format;

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use crate::train::step::MicroBatch;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The label of a row that carries no loss.
pub const IGNORE: i32 = -100;

/// Bad-line reasons kept for the report when `skip_bad_lines` is on.
const KEPT_REASONS: usize = 5;

/// Which tokens are trained on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LossOn {
    /// Assistant turns, completions and outputs; every token of plain text.
    #[default]
    Answers,
    /// Every token of every sample.
    All,
}

/// What shapes the samples (everything here is part of the cache key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataOptions {
    /// Tokens a sample may have; longer ones are truncated.
    pub seq: usize,
    pub loss_on: LossOn,
    /// Skip (and count) lines that cannot be used instead of failing on the first.
    pub skip_bad_lines: bool,
}

/// One tokenized sample: `labels[i]` is the target of row i (`tokens[i + 1]` or [`IGNORE`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub tokens: Vec<u32>,
    pub labels: Vec<i32>,
}

impl Sample {
    pub fn labelled(&self) -> usize {
        self.labels.iter().filter(|&&l| l >= 0).count()
    }
}

/// What loading a file did, for the user (its `Display` is a few lines for stderr).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The data file as given.
    pub file: String,
    /// Lines read as each format (before dropping).
    pub text: usize,
    pub chat: usize,
    pub prompt_completion: usize,
    pub alpaca: usize,
    /// Samples kept.
    pub samples: usize,
    /// Samples cut to `seq` tokens.
    pub truncated: usize,
    pub seq: usize,
    /// Samples with no labelled row after masking and truncation.
    pub dropped: usize,
    /// Bad lines skipped, and the first few of them as (line number, why).
    pub skipped: usize,
    pub skip_reasons: Vec<(usize, String)>,
    /// Tokens and labelled rows of the kept samples.
    pub tokens: usize,
    pub labelled: usize,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let share = 100.0 * self.labelled as f64 / self.tokens.max(1) as f64;
        write!(
            f,
            "data: {}: {} samples (chat {}, prompt/completion {}, alpaca {}, text {}), \
             {} tokens, {} labelled ({share:.1}%)",
            self.file,
            self.samples,
            self.chat,
            self.prompt_completion,
            self.alpaca,
            self.text,
            self.tokens,
            self.labelled
        )?;
        if self.truncated > 0 {
            write!(
                f,
                "\ndata: warning: {} samples longer than {} tokens were truncated (their start is kept)",
                self.truncated, self.seq
            )?;
        }
        if self.dropped > 0 {
            write!(
                f,
                "\ndata: {} samples dropped: no labelled token left after masking and truncation",
                self.dropped
            )?;
        }
        if self.skipped > 0 {
            write!(f, "\ndata: {} bad lines skipped", self.skipped)?;
            for (line, why) in &self.skip_reasons {
                write!(f, "\ndata:   {}:{line}: {why}", self.file)?;
            }
            if self.skipped > self.skip_reasons.len() {
                write!(f, "\ndata:   ...")?;
            }
        }
        Ok(())
    }
}

/// A tokenized data file.
#[derive(Clone, Debug)]
pub struct Dataset {
    samples: Vec<Sample>,
    report: Report,
}

impl Dataset {
    /// Reads and tokenizes `path`.
    pub fn load(path: &Path, tokenizer: &Tokenizer, opts: &DataOptions) -> Result<Dataset> {
        let bytes = read(path)?;
        Dataset::from_bytes(&path.display().to_string(), &bytes, tokenizer, opts)
    }

    /// Like [`Dataset::load`], through a cache file in `cache_dir` keyed by the data's bytes, the
    /// tokenizer and the options. A missing, stale or damaged cache is rebuilt; failing to write
    /// one is not an error (the status says so).
    pub fn load_cached(
        path: &Path,
        tokenizer: &Tokenizer,
        opts: &DataOptions,
        cache_dir: &Path,
    ) -> Result<(Dataset, CacheStatus)> {
        let bytes = read(path)?;
        let name = path.display().to_string();
        let key = cache::key(&bytes, tokenizer, opts);
        let file = cache::file_name(cache_dir, path, key);
        let why_not = match cache::read(&file, key) {
            Ok((samples, mut report)) => {
                report.file = name;
                return Ok((Dataset { samples, report }, CacheStatus::Hit(file)));
            }
            Err(cache::Miss::Absent) => None,
            Err(cache::Miss::Unusable(why)) => {
                tracing::warn!("{}: ignoring the token cache: {why}", file.display());
                Some(why)
            }
        };
        let data = Dataset::from_bytes(&name, &bytes, tokenizer, opts)?;
        let write_error = cache::write(&file, key, &data.samples, &data.report).err();
        let status = CacheStatus::Built {
            path: file,
            rebuilt_because: why_not,
            write_error,
        };
        Ok((data, status))
    }

    /// Tokenizes the JSONL text `bytes`; `name` is the file named in errors and the report.
    pub fn from_bytes(
        name: &str,
        bytes: &[u8],
        tokenizer: &Tokenizer,
        opts: &DataOptions,
    ) -> Result<Dataset> {
        if opts.seq < 2 {
            return Err(Error::Usage(format!(
                "a training sequence needs at least 2 tokens (seq is {})",
                opts.seq
            )));
        }
        let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
        let parsed = format::tokenize_lines(&lines, tokenizer, opts.loss_on);
        let mut report = Report {
            file: name.to_string(),
            seq: opts.seq,
            ..Report::default()
        };
        let mut samples = Vec::new();
        for (i, result) in parsed.into_iter().enumerate() {
            let line = i + 1;
            let (format, tokens, mask) = match result {
                None => continue, // blank
                Some(Ok(tokenized)) => tokenized,
                Some(Err(why)) if opts.skip_bad_lines => {
                    report.skipped += 1;
                    if report.skip_reasons.len() < KEPT_REASONS {
                        report.skip_reasons.push((line, why));
                    }
                    continue;
                }
                Some(Err(why)) => return Err(Error::Usage(format!("{name}:{line}: {why}"))),
            };
            *report.count_of(format) += 1;
            let (sample, truncated) = make_sample(tokens, mask, opts.seq);
            report.truncated += truncated as usize;
            if sample.labelled() == 0 {
                report.dropped += 1;
                continue;
            }
            report.tokens += sample.tokens.len();
            report.labelled += sample.labelled();
            samples.push(sample);
        }
        report.samples = samples.len();
        if samples.is_empty() {
            return Err(Error::Usage(format!(
                "{name}: no usable training sample ({} bad lines skipped, {} samples without a \
                 labelled token)",
                report.skipped, report.dropped
            )));
        }
        Ok(Dataset { samples, report })
    }

    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    pub fn report(&self) -> &Report {
        &self.report
    }

    /// The most tokens of one sample (the `seq` it was loaded with).
    pub fn seq(&self) -> usize {
        self.report.seq
    }

    /// The micro-batches of one epoch, a pure function of (`seed`, `epoch`): every sample once,
    /// in an order shuffled per epoch, at most `batch * seq()` rows per micro-batch. Packed:
    /// samples are appended greedily, each its own sequence (attention stays inside it). Not
    /// packed: `batch` samples per micro-batch, of similar lengths.
    pub fn epoch(&self, epoch: usize, seed: u64, batch: usize, packing: bool) -> Vec<MicroBatch> {
        let batch = batch.max(1);
        let mut rng = batching::rng(seed, epoch);
        let order = batching::shuffled(self.samples.len(), &mut rng);
        if packing {
            batching::packed(&self.samples, &order, batch * self.seq())
        } else {
            batching::grouped(&self.samples, &order, batch, &mut rng)
        }
    }
}

impl Report {
    fn count_of(&mut self, format: Format) -> &mut usize {
        match format {
            Format::Text => &mut self.text,
            Format::Chat => &mut self.chat,
            Format::PromptCompletion => &mut self.prompt_completion,
            Format::Alpaca => &mut self.alpaca,
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Usage(format!("{}: cannot read: {e}", path.display())))
}

/// Cuts `tokens` to `seq` (keeping the start) and turns the per-token loss mask into per-row
/// next-token labels. Returns the sample and whether it was cut.
fn make_sample(mut tokens: Vec<u32>, mut mask: Vec<bool>, seq: usize) -> (Sample, bool) {
    let truncated = tokens.len() > seq;
    tokens.truncate(seq);
    mask.truncate(seq);
    let labels = (0..tokens.len())
        .map(|i| match (tokens.get(i + 1), mask.get(i + 1)) {
            (Some(&next), Some(true)) => i32::try_from(next).unwrap_or(IGNORE),
            _ => IGNORE,
        })
        .collect();
    (Sample { tokens, labels }, truncated)
}
