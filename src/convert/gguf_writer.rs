//! Writing a GGUF v3 file one tensor at a time (the layout `weights::gguf::parse` reads):
//!   "GGUF" u32:3 u64:tensor_count u64:kv_count, the metadata key/values, the tensor infos
//!   (name, dims fastest-first, ggml type, offset), zero padding to the alignment, then each
//!   tensor's bytes at its offset, every offset a multiple of the alignment.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::weights::gguf::value::type_id;
use crate::weights::gguf::{Array, GgmlType, Value};
use std::io::Write;

/// GGUF metadata entries, in the order they are written.
pub(crate) type Metadata = Vec<(String, Value)>;

/// Tensor data alignment; the format's default, so no `general.alignment` key is needed.
pub(crate) const ALIGNMENT: usize = 32;

pub(crate) struct GgufWriter<W: Write> {
    w: W,
    /// (name, byte size) of each tensor still to come, in order.
    pending: std::collections::VecDeque<(String, usize)>,
}

fn put_string(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => type_id::U8,
        Value::I8(_) => type_id::I8,
        Value::U16(_) => type_id::U16,
        Value::I16(_) => type_id::I16,
        Value::U32(_) => type_id::U32,
        Value::I32(_) => type_id::I32,
        Value::U64(_) => type_id::U64,
        Value::I64(_) => type_id::I64,
        Value::F32(_) => type_id::F32,
        Value::F64(_) => type_id::F64,
        Value::Bool(_) => type_id::BOOL,
        Value::String(_) => type_id::STRING,
        Value::Array(_) => type_id::ARRAY,
    }
}

fn put_value(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x]),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[*x as u8]),
        Value::String(s) => put_string(w, s),
        Value::Array(a) => put_array(w, a),
    }
}

fn put_array(w: &mut impl Write, a: &Array) -> std::io::Result<()> {
    fn each<T, W: Write>(
        w: &mut W,
        ty: u32,
        items: &[T],
        mut put: impl FnMut(&mut W, &T) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        w.write_all(&ty.to_le_bytes())?;
        w.write_all(&(items.len() as u64).to_le_bytes())?;
        items.iter().try_for_each(|x| put(w, x))
    }
    match a {
        Array::U8(v) => each(w, type_id::U8, v, |w, x| w.write_all(&[*x])),
        Array::I8(v) => each(w, type_id::I8, v, |w, x| w.write_all(&x.to_le_bytes())),
        Array::U16(v) => each(w, type_id::U16, v, |w, x| w.write_all(&x.to_le_bytes())),
        Array::I16(v) => each(w, type_id::I16, v, |w, x| w.write_all(&x.to_le_bytes())),
        Array::U32(v) => each(w, type_id::U32, v, |w, x| w.write_all(&x.to_le_bytes())),
        Array::I32(v) => each(w, type_id::I32, v, |w, x| w.write_all(&x.to_le_bytes())),
        Array::U64(v) => each(w, type_id::U64, v, |w, x| w.write_all(&x.to_le_bytes())),
        Array::I64(v) => each(w, type_id::I64, v, |w, x| w.write_all(&x.to_le_bytes())),
        Array::F32(v) => each(w, type_id::F32, v, |w, x| w.write_all(&x.to_le_bytes())),
        Array::F64(v) => each(w, type_id::F64, v, |w, x| w.write_all(&x.to_le_bytes())),
        Array::Bool(v) => each(w, type_id::BOOL, v, |w, x| w.write_all(&[*x as u8])),
        Array::String(v) => each(w, type_id::STRING, v, |w, s| put_string(w, s)),
        Array::Array(v) => each(w, type_id::ARRAY, v, |w, a| put_array(w, a)),
    }
}

fn pad(w: &mut impl Write, written: usize) -> std::io::Result<usize> {
    let n = written.next_multiple_of(ALIGNMENT) - written;
    w.write_all(&[0u8; ALIGNMENT][..n])?;
    Ok(n)
}

impl<W: Write> GgufWriter<W> {
    /// Writes the header: `metadata` in order, then the infos of `tensors` (name, HF-order
    /// shape, stored dtype) whose data must follow in the same order.
    pub fn begin(
        mut w: W,
        metadata: &[(String, Value)],
        tensors: &[(String, Vec<usize>, DType)],
    ) -> Result<Self> {
        let mut head: Vec<u8> = Vec::new();
        head.extend_from_slice(b"GGUF");
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (key, value) in metadata {
            put_string(&mut head, key)?;
            head.extend_from_slice(&value_type(value).to_le_bytes());
            put_value(&mut head, value)?;
        }
        let mut offset = 0usize;
        let mut pending = std::collections::VecDeque::new();
        for (name, shape, dtype) in tensors {
            let cols = shape.last().copied().unwrap_or(1);
            let size = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .filter(|_| cols % dtype.block_elems() == 0 && !shape.is_empty())
                .and_then(|n| dtype.bytes_for(n))
                .ok_or_else(|| {
                    Error::Config(format!(
                        "tensor {name}: shape {shape:?} cannot be stored as {dtype} \
                         (rows must be whole blocks and the size must fit)"
                    ))
                })?;
            put_string(&mut head, name)?;
            head.extend_from_slice(&(shape.len() as u32).to_le_bytes());
            for &d in shape.iter().rev() {
                head.extend_from_slice(&(d as u64).to_le_bytes());
            }
            head.extend_from_slice(&GgmlType::from_dtype(*dtype).0.to_le_bytes());
            head.extend_from_slice(&(offset as u64).to_le_bytes());
            pending.push_back((name.clone(), size));
            offset = offset
                .checked_add(size)
                .map(|o| o.next_multiple_of(ALIGNMENT))
                .ok_or_else(|| Error::Config("total tensor size overflows".into()))?;
        }
        w.write_all(&head)?;
        pad(&mut w, head.len())?;
        Ok(GgufWriter { w, pending })
    }

    /// Writes the next tensor's bytes (exactly the announced size) and the padding after them.
    pub fn write_tensor(&mut self, data: &[u8]) -> Result<()> {
        let (name, size) = self
            .pending
            .pop_front()
            .ok_or_else(|| Error::Config("more tensors written than announced".into()))?;
        if data.len() != size {
            return Err(Error::Config(format!(
                "tensor {name}: {} bytes written, {size} announced",
                data.len()
            )));
        }
        self.w.write_all(data)?;
        pad(&mut self.w, size)?;
        Ok(())
    }

    /// Checks every announced tensor was written and flushes.
    pub fn finish(mut self) -> Result<W> {
        if let Some((name, _)) = self.pending.front() {
            return Err(Error::Config(format!("tensor {name} was never written")));
        }
        self.w.flush()?;
        Ok(self.w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::gguf::GgufFile;
    use crate::weights::TensorSource;

    #[test]
    fn the_reader_reads_what_we_write() {
        let metadata = vec![
            (
                "general.architecture".to_string(),
                Value::String("test".into()),
            ),
            ("a.u32".to_string(), Value::U32(7)),
            ("a.f64".to_string(), Value::F64(-0.25)),
            ("a.bool".to_string(), Value::Bool(true)),
            (
                "a.nested".to_string(),
                Value::Array(Array::Array(vec![
                    Array::String(vec!["x".into(), "".into()]),
                    Array::I16(vec![-3]),
                ])),
            ),
        ];
        let t0: Vec<u8> = (0..12u8).collect(); // [3] f32
        let t1 = vec![9u8; 34 * 2]; // [2, 32] q8_0
        let tensors = vec![
            ("t0".to_string(), vec![3], DType::F32),
            ("t1".to_string(), vec![2, 32], DType::Q8_0),
        ];
        assert!(
            GgufWriter::begin(Vec::new(), &[], &[("x".into(), vec![2, 31], DType::Q8_0)]).is_err()
        );
        let mut w = GgufWriter::begin(Vec::new(), &metadata, &tensors).unwrap();
        w.write_tensor(&t0).unwrap();
        w.write_tensor(&t1).unwrap();
        let bytes = w.finish().unwrap();
        let path =
            std::env::temp_dir().join(format!("anyllama-gguf-writer-{}.gguf", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        let g = GgufFile::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let got: Vec<(String, Value)> = g
            .metadata_entries()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        assert_eq!(got, metadata);
        assert_eq!(g.version(), 3);
        let a = g.get("t0").unwrap().unwrap();
        assert_eq!(
            (a.shape, a.dtype, &a.data[..]),
            (vec![3], DType::F32, &t0[..])
        );
        let b = g.get("t1").unwrap().unwrap();
        assert_eq!(
            (b.shape, b.dtype, &b.data[..]),
            (vec![2, 32], DType::Q8_0, &t1[..])
        );
        assert_eq!(g.tensor_info("t1").unwrap().offset % ALIGNMENT as u64, 0);
    }
}
