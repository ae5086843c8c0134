//! `DIR/log.jsonl`: one JSON object per logged optimizer step, appended as the run goes (a
//! crash loses nothing already written); a resumed run first drops the lines past its
//! checkpoint so the file reads as one unbroken run.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

pub const LOG_FILE: &str = "log.jsonl";

/// One line of log.jsonl.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    /// Optimizer steps done.
    pub step: usize,
    /// Epochs done, fractional (2.5: half-way through the third).
    pub epoch: f64,
    /// Mean training loss over the steps since the previous line.
    pub loss: f32,
    /// The learning rate and gradient norm (before clipping) of this step.
    pub lr: f32,
    pub grad_norm: f32,
    /// Rows trained on so far, and per second since the previous line.
    pub tokens: u64,
    pub tok_s: f64,
    /// Seconds of training so far.
    pub elapsed_s: f64,
    /// Mean loss over the eval set, where it was evaluated at this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f32>,
}

/// Appends one line (and flushes it: the file is read while the run goes on).
pub fn append(path: &Path, line: &LogLine) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let text = serde_json::to_string(line).expect("a log line serializes");
    f.write_all(format!("{text}\n").as_bytes())?;
    Ok(())
}

/// Every line of a log (none when the file does not exist).
pub fn read(path: &Path) -> Result<Vec<LogLine>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::load(path, e.to_string())),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::load(path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

/// Keeps the lines up to `step` (a resumed run continues from there); a line that does not
/// parse (the half-written last line of a crash) ends what is kept.
pub fn truncate_after(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .map_while(|l| serde_json::from_str::<LogLine>(l).ok().map(|p| (l, p)))
        .filter(|(_, p)| p.step <= step)
        .map(|(l, _)| format!("{l}\n"))
        .collect();
    std::fs::write(path, kept)?;
    Ok(())
}
