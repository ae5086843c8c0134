//! safetensors checkpoints (single file or sharded with an index), memory-mapped.
//!
//! Opening reads every header and checks it against the file (the `safetensors` crate checks
//! that offsets are contiguous, sizes match shapes and the data ends where the file ends), checks
//! that the index and the shards agree tensor by tensor, and records where each tensor's bytes
//! lie. `get` then hands out slices of the mapping: nothing is copied until upload.

use super::{HostTensor, TensorSource};
use crate::dtype::DType;
use crate::error::{Error, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// All tensors of a safetensors checkpoint, memory-mapped.
pub struct SafetensorsSource {
    shards: Vec<Shard>,
    /// Sorted by name so `names()` is stable.
    tensors: BTreeMap<String, Entry>,
}

struct Shard {
    path: PathBuf,
    map: Mmap,
}

/// Where one tensor lives: shard index and absolute byte range inside that shard's mapping.
struct Entry {
    shard: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

impl SafetensorsSource {
    /// Opens `path`: a `.safetensors` file, or a folder holding `model.safetensors` or
    /// `model.safetensors.index.json` plus the shards it names.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_file() {
            return Self::from_files(&[path.to_path_buf()], None);
        }
        let single = path.join(SINGLE_FILE);
        if single.is_file() {
            return Self::from_files(&[single], None);
        }
        let index = path.join(INDEX_FILE);
        if index.is_file() {
            let (shard_names, weight_map) = read_index(&index)?;
            let files: Vec<PathBuf> = shard_names.iter().map(|n| path.join(n)).collect();
            for f in &files {
                check_inside(path, f, &index)?;
            }
            return Self::from_files(&files, Some((&index, &weight_map)));
        }
        Err(Error::load(
            path,
            format!("no {SINGLE_FILE} or {INDEX_FILE} found"),
        ))
    }

    /// The files the tensors come from, in the order they were opened.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// Maps every file and collects its tensors. With an index, each tensor must sit in exactly
    /// the shard the index names, and every tensor the index names must exist.
    fn from_files(
        files: &[PathBuf],
        index: Option<(&Path, &HashMap<String, String>)>,
    ) -> Result<Self> {
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = BTreeMap::new();
        for (shard_idx, file) in files.iter().enumerate() {
            let map = map_file(file)?;
            let shard_name = file
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            for (name, entry) in read_header(file, &map, shard_idx)? {
                if let Some((index_path, weight_map)) = index {
                    match weight_map.get(&name) {
                        Some(listed) if listed == shard_name => {}
                        Some(listed) => {
                            return Err(Error::load(
                                file,
                                format!(
                                    "holds tensor `{name}`, which {} puts in {listed}",
                                    index_path.display()
                                ),
                            ))
                        }
                        None => {
                            return Err(Error::load(
                                file,
                                format!(
                                    "holds tensor `{name}`, which {} does not list",
                                    index_path.display()
                                ),
                            ))
                        }
                    }
                }
                if let Some(previous) = tensors.insert(name.clone(), entry) {
                    let first = &files[previous.shard];
                    return Err(Error::load(
                        file,
                        format!("tensor `{name}` is also stored in {}", first.display()),
                    ));
                }
            }
            shards.push(Shard {
                path: file.clone(),
                map,
            });
        }
        if let Some((index_path, weight_map)) = index {
            let mut missing: Vec<_> = weight_map
                .keys()
                .filter(|n| !tensors.contains_key(*n))
                .collect();
            missing.sort();
            if let Some(name) = missing.first() {
                return Err(Error::load(
                    index_path,
                    format!(
                        "lists tensor `{name}` in {}, which does not hold it",
                        weight_map[*name]
                    ),
                ));
            }
        }
        Ok(SafetensorsSource { shards, tensors })
    }
}

impl TensorSource for SafetensorsSource {
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn get(&self, name: &str) -> Result<Option<HostTensor<'_>>> {
        let Some(e) = self.tensors.get(name) else {
            return Ok(None);
        };
        let shard = &self.shards[e.shard];
        // Ranges were checked against the mapping at open; `get` keeps that a non-panicking path.
        let data = shard.map.get(e.start..e.end).ok_or_else(|| {
            Error::load(
                &shard.path,
                format!("tensor `{name}` lies outside the file"),
            )
        })?;
        Ok(Some(HostTensor {
            dtype: e.dtype,
            shape: e.shape.clone(),
            data: Cow::Borrowed(data),
        }))
    }
}

/// Reads the index: the distinct shard file names (in first-seen order) and tensor -> shard.
fn read_index(path: &Path) -> Result<(Vec<String>, HashMap<String, String>)> {
    let text = super::read_text_file(path).map_err(|e| Error::load(path, e.to_string()))?;
    let root: Value =
        serde_json::from_str(&text).map_err(|e| Error::load(path, format!("invalid JSON: {e}")))?;
    let map = root
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::load(path, "no `weight_map` object"))?;
    let mut shard_names: Vec<String> = Vec::new();
    let mut weight_map = HashMap::with_capacity(map.len());
    for (tensor, shard) in map {
        let shard = shard
            .as_str()
            .ok_or_else(|| Error::load(path, format!("shard of `{tensor}` is not a file name")))?;
        if !is_plain_file_name(shard) {
            return Err(Error::load(
                path,
                format!("shard `{shard}` of `{tensor}` is not a plain file name inside the folder"),
            ));
        }
        if !shard_names.iter().any(|s| s == shard) {
            shard_names.push(shard.to_string());
        }
        weight_map.insert(tensor.clone(), shard.to_string());
    }
    if weight_map.is_empty() {
        return Err(Error::load(path, "`weight_map` is empty"));
    }
    Ok((shard_names, weight_map))
}

/// A shard name must not reach outside the model folder.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && !(name.len() >= 2 && name.as_bytes()[1] == b':') // Windows drive prefix
}

/// A shard must resolve to a file inside the model folder: a symbolic link may not lead out of
/// it. The one exception is the Hugging Face cache, whose `snapshots/<rev>/` folders hold links
/// into the same repository's `blobs/`.
fn check_inside(dir: &Path, file: &Path, index: &Path) -> Result<()> {
    let Ok(target) = std::fs::canonicalize(file) else {
        return Ok(()); // missing: opening it reports that, naming the file
    };
    let root = std::fs::canonicalize(dir).map_err(|e| Error::load(dir, e.to_string()))?;
    let in_hub_blobs = || {
        let snapshots = root.parent()?;
        (snapshots.file_name()? == "snapshots")
            .then(|| snapshots.parent().map(|repo| repo.join("blobs")))
            .flatten()
            .is_some_and(|blobs| target.starts_with(blobs))
            .then_some(())
    };
    if target.starts_with(&root) || in_hub_blobs().is_some() {
        return Ok(());
    }
    Err(Error::load(
        index,
        format!(
            "shard {} is a link to {}, outside the model folder",
            file.display(),
            target.display()
        ),
    ))
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::load(path, e.to_string()))?;
    // Safety: the mapping is read-only. Like every mmap-based loader we rely on the checkpoint
    // not being truncated or rewritten while the model is loaded.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::load(path, format!("cannot memory-map: {e}")))
}

/// Parses and validates one file's header; returns each tensor with its absolute byte range.
fn read_header(path: &Path, map: &[u8], shard: usize) -> Result<Vec<(String, Entry)>> {
    let (header_len, metadata) = SafeTensors::read_metadata(map)
        .map_err(|e| Error::load(path, format!("not a valid safetensors file: {e}")))?;
    // Data starts after the 8-byte length and the header; read_metadata checked both fit.
    let data_start = 8usize
        .checked_add(header_len)
        .ok_or_else(|| Error::load(path, "header length overflows"))?;
    let mut out = Vec::new();
    for (name, info) in metadata.tensors() {
        let dtype = match info.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => {
                return Err(Error::load(
                    path,
                    format!(
                        "tensor `{name}` has dtype {other:?}; only F32, F16 and BF16 are supported"
                    ),
                ))
            }
        };
        let (s, e) = info.data_offsets;
        let range = data_start
            .checked_add(s)
            .zip(data_start.checked_add(e))
            .filter(|&(start, end)| start <= end && end <= map.len());
        let Some((start, end)) = range else {
            return Err(Error::load(
                path,
                format!("tensor `{name}` lies outside the file"),
            ));
        };
        let numel = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if numel.and_then(|n| dtype.bytes_for(n)) != Some(end - start) {
            return Err(Error::load(
                path,
                format!(
                    "tensor `{name}`: shape {:?} does not match its {} bytes",
                    info.shape,
                    end - start
                ),
            ));
        }
        out.push((
            name,
            Entry {
                shard,
                dtype,
                shape: info.shape.clone(),
                start,
                end,
            },
        ));
    }
    Ok(out)
}
