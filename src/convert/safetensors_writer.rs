//! Writing a safetensors file one tensor at a time, so that a model never has to be held in
//! memory whole. Layout: u64 header length, a JSON header (`{name: {dtype, shape, data_offsets}}`
//! plus `__metadata__`), padded with spaces to a multiple of 8, then the tensors back to back in
//! the order the header lists them.

use crate::dtype::DType;
use crate::error::{Error, Result};
use serde_json::{json, Map, Value};
use std::io::Write;

pub(crate) struct SafetensorsWriter<W: Write> {
    w: W,
    /// (name, byte size) of each tensor still to come, in order.
    pending: std::collections::VecDeque<(String, usize)>,
}

fn dtype_name(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        other => {
            return Err(Error::Usage(format!(
                "safetensors files cannot store {other}"
            )))
        }
    })
}

impl<W: Write> SafetensorsWriter<W> {
    /// Writes the header for `tensors` (name, shape, dtype), in the order their data will follow.
    pub fn begin(mut w: W, tensors: &[(String, Vec<usize>, DType)]) -> Result<Self> {
        let mut header = Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut offset = 0usize;
        let mut pending = std::collections::VecDeque::new();
        for (name, shape, dtype) in tensors {
            let size = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .and_then(|n| dtype.bytes_for(n))
                .ok_or_else(|| Error::Config(format!("tensor {name}: size overflows")))?;
            let end = offset
                .checked_add(size)
                .ok_or_else(|| Error::Config("total tensor size overflows".into()))?;
            let entry = json!({"dtype": dtype_name(*dtype)?, "shape": shape, "data_offsets": [offset, end]});
            if header.insert(name.clone(), entry).is_some() {
                return Err(Error::Config(format!("tensor {name} is written twice")));
            }
            pending.push_back((name.clone(), size));
            offset = end;
        }
        let mut text = serde_json::to_vec(&Value::Object(header))
            .map_err(|e| Error::Config(format!("safetensors header: {e}")))?;
        // The data must start 8-byte aligned; spaces are what other writers pad with.
        text.resize(text.len().div_ceil(8) * 8, b' ');
        w.write_all(&(text.len() as u64).to_le_bytes())?;
        w.write_all(&text)?;
        Ok(SafetensorsWriter { w, pending })
    }

    /// Writes the next tensor's bytes, which must be exactly the size its header entry gave.
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

    #[test]
    fn the_safetensors_crate_reads_what_we_write() {
        let a: Vec<u8> = [1.0f32, 2.0, 3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let b = vec![7u8; 8];
        let tensors = vec![
            ("a".to_string(), vec![3], DType::F32),
            ("b.weight".to_string(), vec![2, 2], DType::BF16),
        ];
        let mut w = SafetensorsWriter::begin(Vec::new(), &tensors).unwrap();
        w.write_tensor(&a).unwrap();
        assert!(w.write_tensor(&[0; 3]).is_err()); // wrong size
        let mut w = SafetensorsWriter::begin(Vec::new(), &tensors).unwrap();
        w.write_tensor(&a).unwrap();
        w.write_tensor(&b).unwrap();
        let bytes = w.finish().unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("a").unwrap().data(), &a[..]);
        let t = st.tensor("b.weight").unwrap();
        assert_eq!((t.shape(), t.data()), (&[2usize, 2][..], &b[..]));
        assert_eq!(
            safetensors::SafeTensors::read_metadata(&bytes).unwrap().0 % 8,
            0
        );
    }
}
