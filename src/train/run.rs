//! The training run: `Trainer::step` over a stream of micro-batches, the way HF's Trainer
//! drives its loop, written out plainly.
//!
//! ```text
//! per epoch e:  batches = data.epoch(e)              (deterministic: resume recomputes it)
//!   per optimizer step: the next grad_accum micro-batches (fewer at the epoch's end)
//!     Trainer::step -> loss, grad norm, lr           (lr from OptimConfig's schedule)
//!     every eval_every: mean loss over the eval set  (forward only)
//!     every log_every:  DIR/log.jsonl line, progress
//!     every save_every: DIR/checkpoint-STEP/, DIR/loss.png
//!   between steps: the stop flag (Ctrl-C) -> checkpoint, return
//! ```
//! The run ends after `max_steps` optimizer steps, or `epochs` whole epochs; the learning-rate
//! schedule's `total_steps` is set to that count (HF's num_training_steps). A resumed run
//! loads its checkpoint (checkpoint.rs), recomputes the epoch's order and continues at the
//! saved position, with the same optimizer state and dropout counters, so its losses are the
//! unbroken run's bit for bit.

use crate::backend::train::TrainBackend;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::train::checkpoint::{self, Position};
use crate::train::log::{self, LogLine, LOG_FILE};
use crate::train::plot::{self, PLOT_FILE};
use crate::train::step::{MicroBatch, StepStats, Trainer};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Where the micro-batches come from: the same list for the same epoch on every call (the
/// shuffle seeded by the epoch), so that a resumed run finds its place again.
pub trait Batches {
    fn epoch(&mut self, epoch: usize) -> Result<Vec<MicroBatch>>;
}

impl<F: FnMut(usize) -> Result<Vec<MicroBatch>>> Batches for F {
    fn epoch(&mut self, epoch: usize) -> Result<Vec<MicroBatch>> {
        self(epoch)
    }
}

/// How the run reports progress on stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Progress {
    /// A bar on a terminal, plain lines otherwise (a log file, CI).
    Auto,
    Bar,
    Lines,
    Off,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunConfig {
    /// Where log.jsonl, loss.png and the checkpoints go.
    pub out_dir: PathBuf,
    /// Whole passes over the data (when max_steps is None).
    pub epochs: usize,
    /// Optimizer steps to run, across epochs.
    pub max_steps: Option<usize>,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub log_every: usize,
    /// Evaluate every so many steps (and at the end) when an eval set is given.
    pub eval_every: Option<usize>,
    pub save_every: Option<usize>,
    /// Keep only the newest so many checkpoints.
    pub keep_checkpoints: Option<usize>,
    /// The base model's name, recorded in the adapter's config for PEFT.
    pub base_model: String,
    /// Draw loss.png at each save and at the end.
    pub plot: bool,
    pub progress: Progress,
    /// The caller's own settings (the command line's data and model flags), recorded in every
    /// checkpoint so that a resume can check it continues the same run.
    pub settings: serde_json::Value,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            out_dir: PathBuf::from("train-out"),
            epochs: 1,
            max_steps: None,
            grad_accum: 1,
            log_every: 10,
            eval_every: None,
            save_every: None,
            keep_checkpoints: None,
            base_model: String::new(),
            plot: true,
            progress: Progress::Auto,
            settings: serde_json::Value::Null,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Every step ran.
    Finished,
    /// The stop flag was set; the last checkpoint holds where the run stood.
    Interrupted,
}

/// What a call to `TrainRun::run` did.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub stop: Stop,
    /// Optimizer steps done (counting those before a resume).
    pub step: usize,
    /// The loss of each step this call ran, in order.
    pub losses: Vec<f32>,
    /// The last eval loss, where an eval set was given.
    pub eval_loss: Option<f32>,
    /// The last checkpoint written.
    pub checkpoint: Option<PathBuf>,
}

pub struct TrainRun<D: Batches> {
    pub cfg: RunConfig,
    pub data: D,
    /// Micro-batches of the eval set (empty: no eval).
    pub eval: Vec<MicroBatch>,
    /// Set by the caller (a Ctrl-C handler) to stop after the current step.
    pub stop: Arc<AtomicBool>,
}

/// Mean loss over the labelled rows of `mbs` at the current weights, forward only.
pub fn eval_loss<B: TrainBackend>(
    b: &B,
    m: &mut Model<B>,
    t: &mut Trainer<B>,
    mbs: &[MicroBatch],
) -> Result<f32> {
    let labelled: usize = mbs.iter().map(|mb| mb.labelled()).sum();
    if labelled == 0 {
        return Err(Error::Usage("the eval set has no labelled rows".into()));
    }
    // Summed as Trainer::step sums its micro-batches, so the two agree bit for bit.
    let mut sum = 0.0f64;
    for mb in mbs {
        sum += t.loss(b, m, mb)? as f64;
    }
    Ok((sum / labelled as f64) as f32)
}

/// `n > 0 && step % n == 0`.
fn every(n: Option<usize>, step: usize) -> bool {
    n.is_some_and(|n| n > 0 && step % n == 0)
}

impl<D: Batches> TrainRun<D> {
    pub fn new(cfg: RunConfig, data: D) -> Self {
        TrainRun {
            cfg,
            data,
            eval: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Runs (or, with `resume`, continues from a checkpoint folder) until the step budget is
    /// spent or the stop flag is set; either way the last state is saved as a checkpoint.
    /// `m` and `t` must be built as the run that saved `resume` was (the same model, LoRA
    /// settings and optimizer settings).
    pub fn run<B: TrainBackend>(
        &mut self,
        b: &B,
        m: &mut Model<B>,
        t: &mut Trainer<B>,
        resume: Option<&Path>,
    ) -> Result<Summary> {
        let g = self.cfg.grad_accum;
        if g == 0 || self.cfg.log_every == 0 {
            return Err(Error::Usage(
                "grad_accum and log_every must be at least 1".into(),
            ));
        }
        let mut pos = self.start(b, m, t, resume)?;
        let mut batches = self.epoch(pos.epoch)?;
        let total = self
            .cfg
            .max_steps
            .unwrap_or(self.cfg.epochs * batches.len().div_ceil(g));
        t.optim.cfg.total_steps = total.max(1);

        let mut out = Summary {
            stop: Stop::Finished,
            step: pos.step,
            losses: Vec::new(),
            eval_loss: None,
            checkpoint: resume.map(Path::to_path_buf),
        };
        let mut saved = resume.map(|_| pos.step);
        let mut clock = Clock::new(pos);
        let mut report = Report::new(self.cfg.progress, total, pos.step);
        while pos.step < total {
            if pos.index >= batches.len() {
                pos.epoch += 1;
                pos.index = 0;
                if self.cfg.max_steps.is_none() && pos.epoch >= self.cfg.epochs {
                    break;
                }
                batches = self.epoch(pos.epoch)?;
            }
            if self.stop.load(Ordering::SeqCst) {
                out.stop = Stop::Interrupted;
                break;
            }
            let end = (pos.index + g).min(batches.len());
            let s = t.step(b, m, &batches[pos.index..end])?;
            pos.index = end;
            pos.step += 1;
            pos.tokens += s.rows as u64;
            out.losses.push(s.loss);
            clock.add(&s);

            let last = pos.step == total;
            let eval_now = !self.eval.is_empty() && (every(self.cfg.eval_every, pos.step) || last);
            let eval = match eval_now {
                true => Some(eval_loss(b, m, t, &self.eval)?),
                false => None,
            };
            out.eval_loss = eval.or(out.eval_loss);
            if every(Some(self.cfg.log_every), pos.step) || eval.is_some() || last {
                let line = clock.line(pos, batches.len(), &s, eval);
                self.log(b, &mut report, &line, total, &clock)?;
            }
            report.step(&s, &clock);
            if every(self.cfg.save_every, pos.step) {
                out.checkpoint = Some(self.save(b, m, t, clock.at(pos), &mut report)?);
                saved = Some(pos.step);
            }
        }
        // What the last line did not cover yet (an interruption, a short last epoch).
        if let Some(s) = clock.pending {
            let line = clock.line(pos, batches.len(), &s, None);
            self.log(b, &mut report, &line, total, &clock)?;
        }
        if saved != Some(pos.step) {
            out.checkpoint = Some(self.save(b, m, t, clock.at(pos), &mut report)?);
        }
        report.finish(out.stop);
        out.step = pos.step;
        Ok(out)
    }

    /// The epoch's micro-batches; an empty epoch would never advance the run.
    fn epoch(&mut self, epoch: usize) -> Result<Vec<MicroBatch>> {
        let batches = self.data.epoch(epoch)?;
        if batches.is_empty() {
            return Err(Error::Usage(format!(
                "epoch {epoch} of the training data has no micro-batches"
            )));
        }
        Ok(batches)
    }

    /// Prepares the output folder and, resuming, loads the checkpoint: the position to go on
    /// from, and a log.jsonl cut back to it.
    fn start<B: TrainBackend>(
        &mut self,
        b: &B,
        m: &mut Model<B>,
        t: &mut Trainer<B>,
        resume: Option<&Path>,
    ) -> Result<Position> {
        let dir = &self.cfg.out_dir;
        std::fs::create_dir_all(dir).map_err(|e| Error::load(dir, e.to_string()))?;
        let log_path = dir.join(LOG_FILE);
        match resume {
            Some(ckpt) => {
                let state = checkpoint::load(b, m, t, ckpt)?;
                log::truncate_after(&log_path, state.position.step)?;
                Ok(state.position)
            }
            None => {
                if let Some(old) = checkpoint::latest(dir)? {
                    return Err(Error::Usage(format!(
                        "{} already holds a run's checkpoints ({}): resume from it, or \
                         train into another folder",
                        dir.display(),
                        old.display()
                    )));
                }
                match std::fs::remove_file(&log_path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                    _ => Ok(Position::default()),
                }
            }
        }
    }

    fn log<B: TrainBackend>(
        &self,
        b: &B,
        report: &mut Report,
        line: &LogLine,
        total: usize,
        clock: &Clock,
    ) -> Result<()> {
        log::append(&self.cfg.out_dir.join(LOG_FILE), line)?;
        report.memory = memory(b);
        report.line(line, total, clock);
        Ok(())
    }

    /// Writes a checkpoint (pruning old ones) and redraws the plot.
    fn save<B: TrainBackend>(
        &self,
        b: &B,
        m: &mut Model<B>,
        t: &Trainer<B>,
        pos: Position,
        report: &mut Report,
    ) -> Result<PathBuf> {
        let dir = &self.cfg.out_dir;
        let run = serde_json::to_value(&self.cfg).expect("the run config serializes");
        let path = checkpoint::save(b, m, t, pos, run, &self.cfg.base_model, dir)?;
        if let Some(keep) = self.cfg.keep_checkpoints {
            checkpoint::prune(dir, keep.max(1))?;
        }
        report.note(&format!("saved {}", path.display()));
        if self.cfg.plot {
            // A plot that fails to draw costs the picture, never the run.
            if let Err(e) = self.plot() {
                report.note(&format!("warning: {e}"));
            }
        }
        Ok(path)
    }

    /// Draws DIR/loss.png from DIR/log.jsonl.
    pub fn plot(&self) -> Result<()> {
        let lines = log::read(&self.cfg.out_dir.join(LOG_FILE))?;
        if lines.is_empty() {
            return Ok(());
        }
        plot::loss_png(&lines, &self.cfg.out_dir.join(PLOT_FILE))
    }
}

/// "used/total GiB" where the backend reports its memory.
fn memory<B: TrainBackend>(b: &B) -> Option<String> {
    let l = b.memory_limits();
    let gib = |x: u64| x as f64 / (1u64 << 30) as f64;
    let (total, free) = (l.total?, l.available?);
    Some(format!(
        "{:.1}/{:.1} GiB",
        gib(total.saturating_sub(free)),
        gib(total)
    ))
}

/// Time and throughput: the run's elapsed seconds continue across a resume; rates count this
/// call's steps only.
struct Clock {
    t0: Instant,
    before: f64,
    steps: usize,
    tokens: u64,
    /// Since the last log line: the sum of the losses, steps, rows, and when it was written.
    loss_sum: f64,
    since_steps: usize,
    since_tokens: u64,
    since_t: f64,
    /// The step not yet in a log line, if any.
    pending: Option<StepStats>,
}

impl Clock {
    fn new(pos: Position) -> Clock {
        Clock {
            t0: Instant::now(),
            before: pos.elapsed_s,
            steps: 0,
            tokens: 0,
            loss_sum: 0.0,
            since_steps: 0,
            since_tokens: 0,
            since_t: 0.0,
            pending: None,
        }
    }

    fn secs(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn add(&mut self, s: &StepStats) {
        self.steps += 1;
        self.tokens += s.rows as u64;
        self.loss_sum += s.loss as f64;
        self.since_steps += 1;
        self.since_tokens += s.rows as u64;
        self.pending = Some(*s);
    }

    fn tok_s(&self) -> f64 {
        self.tokens as f64 / self.secs().max(1e-9)
    }

    /// Seconds left for `left` more steps at this call's pace.
    fn eta(&self, left: usize) -> f64 {
        self.secs() / self.steps.max(1) as f64 * left as f64
    }

    /// The position with the elapsed time brought up to now (for a checkpoint).
    fn at(&self, pos: Position) -> Position {
        Position {
            elapsed_s: self.before + self.secs(),
            ..pos
        }
    }

    /// The log line of the steps since the last one (s: the latest step), and a fresh start.
    fn line(
        &mut self,
        pos: Position,
        epoch_len: usize,
        s: &StepStats,
        eval: Option<f32>,
    ) -> LogLine {
        let now = self.secs();
        let n = self.since_steps.max(1);
        let line = LogLine {
            step: pos.step,
            epoch: pos.epoch as f64 + pos.index as f64 / epoch_len.max(1) as f64,
            loss: (self.loss_sum / n as f64) as f32,
            lr: s.info.lr,
            grad_norm: s.info.grad_norm,
            tokens: pos.tokens,
            tok_s: self.since_tokens as f64 / (now - self.since_t).max(1e-9),
            elapsed_s: self.before + now,
            eval_loss: eval,
        };
        (self.loss_sum, self.since_steps, self.since_tokens) = (0.0, 0, 0);
        self.since_t = now;
        self.pending = None;
        line
    }
}

/// Progress on stderr: an indicatif bar (step/total, loss, lr, tokens/s, memory, ETA), or a
/// plain line per log line when stderr is not a terminal.
struct Report {
    bar: Option<ProgressBar>,
    lines: bool,
    memory: Option<String>,
}

impl Report {
    fn new(p: Progress, total: usize, step: usize) -> Report {
        let p = match p {
            Progress::Auto if std::io::stderr().is_terminal() => Progress::Bar,
            Progress::Auto => Progress::Lines,
            p => p,
        };
        let bar = (p == Progress::Bar).then(|| {
            let bar =
                ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{bar:30} {pos}/{len} {msg} [{elapsed_precise}, eta {eta}]",
            )
            .expect("a valid template");
            bar.set_style(style);
            bar.set_position(step as u64);
            bar.reset_eta(); // a resumed run's rate starts now
            bar
        });
        Report {
            bar,
            lines: p == Progress::Lines,
            memory: None,
        }
    }

    fn step(&self, s: &StepStats, clock: &Clock) {
        if let Some(bar) = &self.bar {
            let mem = self
                .memory
                .as_ref()
                .map_or(String::new(), |m| format!(" mem {m}"));
            bar.set_message(format!(
                "loss {:.4} lr {:.2e} {:.0} tok/s{mem}",
                s.loss,
                s.info.lr,
                clock.tok_s()
            ));
            bar.inc(1);
        }
    }

    fn line(&self, l: &LogLine, total: usize, clock: &Clock) {
        let eval = l
            .eval_loss
            .map_or(String::new(), |e| format!(" eval_loss {e:.4}"));
        if self.lines {
            let mem = self
                .memory
                .as_ref()
                .map_or(String::new(), |m| format!(" mem {m}"));
            eprintln!(
                "step {}/{total} epoch {:.2} loss {:.4}{eval} lr {:.3e} grad_norm {:.3} \
                 {:.0} tok/s{mem} elapsed {:.0}s eta {:.0}s",
                l.step,
                l.epoch,
                l.loss,
                l.lr,
                l.grad_norm,
                l.tok_s,
                l.elapsed_s,
                clock.eta(total.saturating_sub(l.step)),
            );
        } else if let (Some(bar), false) = (&self.bar, eval.is_empty()) {
            bar.println(format!("step {}{eval}", l.step));
        }
    }

    /// A one-off message (a checkpoint saved, a warning).
    fn note(&self, msg: &str) {
        match &self.bar {
            Some(bar) => bar.println(msg),
            None if self.lines => eprintln!("{msg}"),
            None => {}
        }
    }

    fn finish(&self, stop: Stop) {
        if stop == Stop::Interrupted {
            self.note("interrupted: resume from the checkpoint above");
        }
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
