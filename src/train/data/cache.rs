//! The token cache: a dataset tokenized once, in one binary file named by a key over everything
//! that shapes its tokens (the data's bytes, the tokenizer, the options, this format's version).
//!
//! Layout (little-endian): MAGIC, VERSION u32, key u64, report length u64 + the report as JSON,
//! sample count u64, per sample (length u32, tokens u32 x length, loss flags u8 x length: row i
//! predicts token i+1 when set), then an FNV-1a checksum u64 of every byte before it. A file is
//! used only if all of it checks out; anything else is a miss and the data is tokenized again.

use super::{DataOptions, Report, Sample, IGNORE};
use crate::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 16] = b"anyllama-tokens\n";
/// Bump when the file layout or the tokenization rules (format.rs) change.
const VERSION: u32 = 1;

/// What `load_cached` did with the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheStatus {
    /// The tokens came from this file.
    Hit(PathBuf),
    /// The data was tokenized and written to `path`.
    Built {
        path: PathBuf,
        /// Why a cache file already at `path` was not used.
        rebuilt_because: Option<String>,
        /// Why the cache could not be written (the run goes on without it).
        write_error: Option<String>,
    },
}

impl std::fmt::Display for CacheStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheStatus::Hit(path) => write!(f, "data: tokens read from {}", path.display()),
            CacheStatus::Built {
                path,
                rebuilt_because,
                write_error,
            } => {
                if let Some(why) = rebuilt_because {
                    writeln!(
                        f,
                        "data: note: the token cache was unusable ({why}); rebuilt"
                    )?;
                }
                match write_error {
                    None => write!(f, "data: tokens cached in {}", path.display()),
                    Some(e) => write!(
                        f,
                        "data: warning: cannot write the token cache {}: {e}",
                        path.display()
                    ),
                }
            }
        }
    }
}

/// Why a cache file was not used.
pub(super) enum Miss {
    Absent,
    Unusable(String),
}

/// FNV-1a, 64 bits: stable across builds (std's hasher is not promised to be).
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(mut self, data: &[u8]) -> Fnv {
        for &b in data {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }
    /// A length-prefixed part, so that parts cannot run into each other.
    fn part(self, data: &[u8]) -> Fnv {
        self.bytes(&(data.len() as u64).to_le_bytes()).bytes(data)
    }
}

/// The key of `data` tokenized by `tokenizer` with `opts`.
pub(super) fn key(data: &[u8], tokenizer: &Tokenizer, opts: &DataOptions) -> u64 {
    // The tokenizer as its full JSON (vocabulary, merges, normalizer, post-processor), plus
    // what this crate adds around it: the template and the special tokens.
    let tokenizer_json = tokenizer
        .inner()
        .to_string(false)
        .unwrap_or_else(|_| format!("vocab {}", tokenizer.vocab_size()));
    Fnv::new()
        .part(&VERSION.to_le_bytes())
        .part(data)
        .part(tokenizer_json.as_bytes())
        .part(tokenizer.chat_template().unwrap_or("").as_bytes())
        .part(format!("{:?}", tokenizer.specials()).as_bytes())
        .part(&(opts.seq as u64).to_le_bytes())
        .part(format!("{:?} {}", opts.loss_on, opts.skip_bad_lines).as_bytes())
        .0
}

/// `<cache_dir>/<data file stem>-<key>.tokens`.
pub(super) fn file_name(cache_dir: &Path, data: &Path, key: u64) -> PathBuf {
    let stem: String = data
        .file_stem()
        .map(|s| s.to_string_lossy())
        .unwrap_or_default()
        .chars()
        .take(64)
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' | '.' => c,
            _ => '_',
        })
        .collect();
    cache_dir.join(format!("{stem}-{key:016x}.tokens"))
}

pub(super) fn write(
    path: &Path,
    key: u64,
    samples: &[Sample],
    report: &Report,
) -> Result<(), String> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&key.to_le_bytes());
    let report_json = serde_json::to_vec(report).map_err(|e| e.to_string())?;
    out.extend_from_slice(&(report_json.len() as u64).to_le_bytes());
    out.extend_from_slice(&report_json);
    out.extend_from_slice(&(samples.len() as u64).to_le_bytes());
    for s in samples {
        let len = u32::try_from(s.tokens.len()).map_err(|_| "a sample is too long to cache")?;
        out.extend_from_slice(&len.to_le_bytes());
        for t in &s.tokens {
            out.extend_from_slice(&t.to_le_bytes());
        }
        out.extend(s.labels.iter().map(|&l| (l >= 0) as u8));
    }
    let sum = Fnv::new().bytes(&out).0;
    out.extend_from_slice(&sum.to_le_bytes());
    // Written whole under another name, then renamed: a crash leaves no half file behind.
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &out)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            e.to_string()
        })
}

pub(super) fn read(path: &Path, key: u64) -> Result<(Vec<Sample>, Report), Miss> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        // No file, or no folder where the cache folder should be (writing will say why).
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            return Err(Miss::Absent)
        }
        Err(e) => return Err(Miss::Unusable(format!("cannot read it: {e}"))),
    };
    parse(&bytes, key).map_err(Miss::Unusable)
}

/// A byte reader that fails instead of reading past the end.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or("it ends early")?;
        let part = &self.bytes[self.at..end];
        self.at = end;
        Ok(part)
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn len(&mut self) -> Result<usize, String> {
        usize::try_from(self.u64()?).map_err(|_| "a length is too large".to_string())
    }
}

fn parse(bytes: &[u8], key: u64) -> Result<(Vec<Sample>, Report), String> {
    let body_len = bytes.len().checked_sub(8).ok_or("it is too short")?;
    let (body, sum) = bytes.split_at(body_len);
    if !body.starts_with(MAGIC) {
        return Err("it is not a token cache".into());
    }
    if sum != Fnv::new().bytes(body).0.to_le_bytes() {
        return Err("its checksum does not match (damaged file)".into());
    }
    let mut r = Reader {
        bytes: body,
        at: MAGIC.len(),
    };
    if r.u32()? != VERSION {
        return Err("it was written by another version".into());
    }
    if r.u64()? != key {
        return Err("it belongs to other data, tokenizer or options".into());
    }
    let report_len = r.len()?;
    let report: Report =
        serde_json::from_slice(r.take(report_len)?).map_err(|e| format!("bad report: {e}"))?;
    let count = r.len()?;
    // Each sample takes at least 4 bytes, which bounds the allocation by the file's size.
    if count > body.len() / 4 {
        return Err("its sample count does not fit the file".into());
    }
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        samples.push(read_sample(&mut r)?);
    }
    if r.at != body.len() {
        return Err("it has bytes after the last sample".into());
    }
    let tokens: usize = samples.iter().map(|s| s.tokens.len()).sum();
    let labelled: usize = samples.iter().map(|s| s.labelled()).sum();
    if (report.samples, report.tokens, report.labelled) != (count, tokens, labelled) {
        return Err("its report does not match its samples".into());
    }
    Ok((samples, report))
}

fn read_sample(r: &mut Reader) -> Result<Sample, String> {
    let len = r.u32()? as usize;
    let raw = r.take(len.checked_mul(4).ok_or("a length is too large")?)?;
    let tokens: Vec<u32> = raw
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let flags = r.take(len)?;
    let mut labels = Vec::with_capacity(len);
    for (i, &flag) in flags.iter().enumerate() {
        labels.push(match (flag, tokens.get(i + 1)) {
            (0, _) => IGNORE,
            (1, Some(&next)) => i32::try_from(next).map_err(|_| "a token id is too large")?,
            _ => return Err("a loss flag is invalid".into()),
        });
    }
    Ok(Sample { tokens, labels })
}
