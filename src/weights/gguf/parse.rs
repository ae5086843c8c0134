//! Parsing the GGUF header: magic, version, metadata key/values, tensor infos, and the start of the
//! data section. Every count, length, dimension and offset in the file is treated as hostile: it is
//! checked against the bytes that are actually left and against overflow before anything is
//! allocated for it, so a file can never make us reserve more memory than a few times its size.
//!
//! Layout (all little-endian; strings are a u64 byte length followed by UTF-8 bytes):
//!   "GGUF" u32:version u64:tensor_count u64:kv_count
//!   kv_count x { string:key u32:value_type value }
//!   tensor_count x { string:name u32:n_dims u64[n_dims]:ne u32:ggml_type u64:offset }
//!   padding to `general.alignment` (default 32), then the tensor data.

use super::ggml_type::GgmlType;
use super::value::{type_id, Array, Value};
use super::TensorInfo;
use crate::error::{Error, Result};
use std::collections::HashSet;
use std::path::Path;

/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal but nobody nests them deeply; the limit keeps recursion bounded.
const MAX_ARRAY_DEPTH: usize = 8;
/// Smallest possible metadata entry: empty key (8) + value type (4) + one-byte value.
const MIN_KV_BYTES: u64 = 13;
/// Smallest possible tensor info: empty name (8) + n_dims (4) + one dim (8) + type (4) + offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 32;
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Caps on top of the file-size checks, so that even a huge file cannot make one entry claim
/// gigabytes: keys and tensor names are short (the format limits keys to 65535 bytes), the
/// longest real strings are chat templates (tens of KB), the longest arrays vocabularies and
/// merge lists (a few hundred thousand entries).
const MAX_NAME_LEN: u64 = 65_535;
const MAX_STRING_LEN: u64 = 1 << 24;
const MAX_ARRAY_LEN: u64 = 1 << 24;

/// Everything in the header, validated.
pub(crate) struct Header {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute file offset where the data section starts.
    pub data_offset: u64,
}

/// A bounds-checked little-endian reader over the file bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::load(
            self.path,
            format!("malformed GGUF at byte {}: {msg}", self.pos),
        )
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(format_args!(
                "{what} needs {n} bytes but only {} are left in the file",
                self.remaining()
            )));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.buf[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self
            .take(N as u64, what)?
            .try_into()
            .expect("take returns N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        self.string_capped(what, MAX_STRING_LEN)
    }

    fn string_capped(&mut self, what: &str, cap: u64) -> Result<String> {
        let len = self.u64(what)?;
        if len > cap {
            return Err(self.err(format_args!(
                "{what}: string length {len} is over the limit of {cap} bytes"
            )));
        }
        if len > self.remaining() {
            return Err(self.err(format_args!(
                "{what}: string length {len} runs past the end of the file ({} bytes left)",
                self.remaining()
            )));
        }
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.err(format_args!("{what}: string is not valid UTF-8")))
    }

    /// Fails unless `count` elements of at least `min_bytes` each can fit in what is left.
    fn check_count(&self, count: u64, min_bytes: u64, what: &str) -> Result<usize> {
        if what.ends_with("array length") && count > MAX_ARRAY_LEN {
            return Err(self.err(format_args!(
                "{what} {count} is over the limit of {MAX_ARRAY_LEN} elements"
            )));
        }
        let fits = count
            .checked_mul(min_bytes)
            .is_some_and(|n| n <= self.remaining());
        if !fits {
            return Err(self.err(format_args!(
                "{what} {count} cannot fit in the {} bytes left in the file",
                self.remaining()
            )));
        }
        Ok(count as usize)
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            type_id::U8 => Value::U8(self.array::<1>(key)?[0]),
            type_id::I8 => Value::I8(self.array::<1>(key)?[0] as i8),
            type_id::U16 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            type_id::I16 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            type_id::U32 => Value::U32(self.u32(key)?),
            type_id::I32 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            type_id::U64 => Value::U64(self.u64(key)?),
            type_id::I64 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            type_id::F32 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            type_id::F64 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            type_id::BOOL => Value::Bool(self.bool(key)?),
            type_id::STRING => Value::String(self.string(key)?),
            type_id::ARRAY => Value::Array(self.array_value(key, depth)?),
            other => return Err(self.err(format_args!("key {key:?}: unknown value type {other}"))),
        })
    }

    /// A bool is one byte; like ggml we take any non-zero byte as true.
    fn bool(&mut self, key: &str) -> Result<bool> {
        Ok(self.array::<1>(key)?[0] != 0)
    }

    /// Reads `n` fixed-size elements after checking they fit.
    fn fixed<T, const N: usize>(
        &mut self,
        count: u64,
        key: &str,
        conv: impl Fn([u8; N]) -> T,
    ) -> Result<Vec<T>> {
        let n = self.check_count(count, N as u64, &format!("key {key:?}: array length"))?;
        let bytes = self.take(n as u64 * N as u64, key)?;
        Ok(bytes
            .chunks_exact(N)
            .map(|c| conv(c.try_into().expect("chunk of N")))
            .collect())
    }

    fn array_value(&mut self, key: &str, depth: usize) -> Result<Array> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.err(format_args!(
                "key {key:?}: arrays nested more than {MAX_ARRAY_DEPTH} deep"
            )));
        }
        let ty = self.u32(key)?;
        let count = self.u64(key)?;
        let what = format!("key {key:?}: array length");
        Ok(match ty {
            type_id::U8 => Array::U8(self.fixed(count, key, |b: [u8; 1]| b[0])?),
            type_id::I8 => Array::I8(self.fixed(count, key, |b: [u8; 1]| b[0] as i8)?),
            type_id::U16 => Array::U16(self.fixed(count, key, u16::from_le_bytes)?),
            type_id::I16 => Array::I16(self.fixed(count, key, i16::from_le_bytes)?),
            type_id::U32 => Array::U32(self.fixed(count, key, u32::from_le_bytes)?),
            type_id::I32 => Array::I32(self.fixed(count, key, i32::from_le_bytes)?),
            type_id::U64 => Array::U64(self.fixed(count, key, u64::from_le_bytes)?),
            type_id::I64 => Array::I64(self.fixed(count, key, i64::from_le_bytes)?),
            type_id::F32 => Array::F32(self.fixed(count, key, f32::from_le_bytes)?),
            type_id::F64 => Array::F64(self.fixed(count, key, f64::from_le_bytes)?),
            type_id::BOOL => {
                let n = self.check_count(count, 1, &what)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.bool(key)?);
                }
                Array::Bool(v)
            }
            type_id::STRING => {
                // Each string takes at least its 8-byte length.
                let n = self.check_count(count, 8, &what)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.string(key)?);
                }
                Array::String(v)
            }
            type_id::ARRAY => {
                // Each inner array takes at least its type (4) and length (8).
                let n = self.check_count(count, 12, &what)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.array_value(key, depth + 1)?);
                }
                Array::Array(v)
            }
            other => {
                return Err(self.err(format_args!(
                    "key {key:?}: unknown array element type {other}"
                )))
            }
        })
    }
}

/// Parses and validates the header of a GGUF file held in `buf`.
pub(crate) fn parse_header(buf: &[u8], path: &Path) -> Result<Header> {
    let mut c = Cursor { buf, pos: 0, path };
    if buf.len() < 24 {
        return Err(Error::load(
            path,
            format!(
                "file is {} bytes, too short for a GGUF header (24 bytes)",
                buf.len()
            ),
        ));
    }
    let magic = c.array::<4>("magic")?;
    if &magic != b"GGUF" {
        return Err(Error::load(
            path,
            format!("not a GGUF file: starts with bytes {magic:02x?}, expected \"GGUF\""),
        ));
    }
    let version = c.u32("version")?;
    if version != 2 && version != 3 {
        let msg = if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            "big-endian GGUF files are not supported".to_string()
        } else {
            format!("unsupported GGUF version {version} (versions 2 and 3 are supported)")
        };
        return Err(Error::load(path, msg));
    }
    let tensor_count = c.u64("tensor count")?;
    let kv_count = c.u64("metadata count")?;

    let n_kv = c.check_count(kv_count, MIN_KV_BYTES, "metadata count")?;
    let mut metadata = Vec::with_capacity(n_kv);
    let mut keys = HashSet::with_capacity(n_kv);
    for _ in 0..n_kv {
        let key = c.string_capped("metadata key", MAX_NAME_LEN)?;
        let ty = c.u32("metadata value type")?;
        let value = c.value(ty, &key, 0)?;
        if !keys.insert(key.clone()) {
            return Err(c.err(format_args!("metadata key {key:?} appears twice")));
        }
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= 1 << 30 => a,
            _ => {
                return Err(Error::load(
                    path,
                    format!("general.alignment is {v:?}; it must be a power of two"),
                ))
            }
        },
    };

    let n_tensors = c.check_count(tensor_count, MIN_TENSOR_INFO_BYTES, "tensor count")?;
    let mut tensors = Vec::with_capacity(n_tensors);
    let mut names = HashSet::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let info = tensor_info(&mut c, alignment)?;
        if !names.insert(info.name.clone()) {
            return Err(c.err(format_args!("tensor {:?} appears twice", info.name)));
        }
        tensors.push(info);
    }

    // The data section starts at the next multiple of the alignment after the tensor infos.
    let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
    let file_len = buf.len() as u64;
    for t in &tensors {
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.n_bytes as u64));
        if end.is_none_or(|e| e > file_len) {
            return Err(Error::load(
                path,
                format!(
                    "tensor {:?}: data at offset {} (+{} bytes, data section at {data_offset}) \
                     runs past the end of the file ({file_len} bytes)",
                    t.name, t.offset, t.n_bytes
                ),
            ));
        }
    }
    // Two tensors must not share bytes: writing one would change the other, and a file that
    // overlaps them is broken or crafted.
    let mut ranges: Vec<(u64, u64, &str)> = tensors
        .iter()
        .map(|t| (t.offset, t.offset + t.n_bytes as u64, t.name.as_str()))
        .collect();
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        let ((_, end, first), (start, _, second)) = (pair[0], pair[1]);
        if start < end {
            return Err(Error::load(
                path,
                format!("tensors {first:?} and {second:?} overlap in the data section"),
            ));
        }
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

fn tensor_info(c: &mut Cursor<'_>, alignment: u64) -> Result<TensorInfo> {
    let name = c.string_capped("tensor name", MAX_NAME_LEN)?;
    let n_dims = c.u32("tensor dimension count")?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(c.err(format_args!(
            "tensor {name:?} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
        )));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        dims.push(c.u64("tensor dimension")?);
    }
    if dims.contains(&0) {
        return Err(c.err(format_args!(
            "tensor {name:?} has a zero dimension in {dims:?}"
        )));
    }
    let ggml_type = GgmlType(c.u32("tensor type")?);
    let offset = c.u64("tensor offset")?;

    let Some((block_elems, block_bytes)) = ggml_type.block_geometry() else {
        return Err(c.err(format_args!(
            "tensor {name:?} has unknown ggml type {}",
            ggml_type.0
        )));
    };
    // Element count and byte size, refusing anything that overflows: a huge count could never be
    // backed by the file anyway, and the end-of-file check below needs an honest size.
    let n_elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| {
            c.err(format_args!(
                "tensor {name:?}: dimensions {dims:?} overflow"
            ))
        })?;
    if dims[0] % block_elems as u64 != 0 {
        return Err(c.err(format_args!(
            "tensor {name:?}: row length {} is not a multiple of the {} block size {block_elems}",
            dims[0],
            ggml_type.name()
        )));
    }
    let n_bytes = (n_elements / block_elems)
        .checked_mul(block_bytes)
        .ok_or_else(|| c.err(format_args!("tensor {name:?}: byte size overflows")))?;
    if offset % alignment != 0 {
        return Err(c.err(format_args!(
            "tensor {name:?}: data offset {offset} is not a multiple of the alignment {alignment}"
        )));
    }
    Ok(TensorInfo {
        name,
        ggml_type,
        dims,
        offset,
        n_elements,
        n_bytes,
    })
}
