//! A GGUF file written field by field (header, metadata, tensor infos, aligned data), so that
//! the catalogue can make any single field wrong. `Gguf::tiny()` is a whole valid Llama model.

const ALIGN: u64 = 32;
const F32: u32 = 0;

#[derive(Clone)]
pub enum V {
    U32(u32),
    U64(u64),
    F32(f32),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    /// A value with an arbitrary type id and payload.
    Raw(u32, Vec<u8>),
}

#[derive(Clone)]
pub struct Tensor {
    pub name: String,
    /// ggml order (fastest first).
    pub dims: Vec<u64>,
    pub ty: u32,
    pub data: Vec<u8>,
    /// Offset in the data section; None lays tensors out one after another.
    pub offset: Option<u64>,
}

#[derive(Clone)]
pub struct Gguf {
    pub magic: [u8; 4],
    pub version: u32,
    /// Counts written in the header; None writes the real ones.
    pub tensor_count: Option<u64>,
    pub kv_count: Option<u64>,
    pub kvs: Vec<(String, V)>,
    pub tensors: Vec<Tensor>,
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl V {
    fn write(&self, out: &mut Vec<u8>) {
        let (ty, body): (u32, Vec<u8>) = match self {
            V::U32(v) => (4, v.to_le_bytes().to_vec()),
            V::U64(v) => (10, v.to_le_bytes().to_vec()),
            V::F32(v) => (6, v.to_le_bytes().to_vec()),
            V::Str(s) => {
                let mut b = Vec::new();
                string(&mut b, s);
                (8, b)
            }
            V::Strs(items) => {
                let mut b = 8u32.to_le_bytes().to_vec();
                b.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for s in items {
                    string(&mut b, s);
                }
                (9, b)
            }
            V::I32s(items) => {
                let mut b = 5u32.to_le_bytes().to_vec();
                b.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for v in items {
                    b.extend_from_slice(&v.to_le_bytes());
                }
                (9, b)
            }
            V::Raw(ty, body) => (*ty, body.clone()),
        };
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&body);
    }
}

impl Gguf {
    /// A whole Llama model: dim 8, 2 heads, ffn 16, one layer, a 16-token byte-level BPE.
    pub fn tiny() -> Gguf {
        let tokens = [
            "<s>",
            "</s>",
            "h",
            "e",
            "l",
            "o",
            "Ġ",
            "w",
            "r",
            "d",
            "he",
            "ll",
            "hell",
            "hello",
            "!",
            "<|im_end|>",
        ];
        let kvs = vec![
            ("general.architecture".into(), V::Str("llama".into())),
            ("llama.context_length".into(), V::U32(32)),
            ("llama.embedding_length".into(), V::U32(8)),
            ("llama.feed_forward_length".into(), V::U32(16)),
            ("llama.block_count".into(), V::U32(1)),
            ("llama.attention.head_count".into(), V::U32(2)),
            ("llama.attention.head_count_kv".into(), V::U32(2)),
            (
                "llama.attention.layer_norm_rms_epsilon".into(),
                V::F32(1e-5),
            ),
            ("tokenizer.ggml.model".into(), V::Str("gpt2".into())),
            (
                "tokenizer.ggml.tokens".into(),
                V::Strs(tokens.iter().map(|t| t.to_string()).collect()),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                V::I32s([3, 3].into_iter().chain([1; 13]).chain([3]).collect()),
            ),
            (
                "tokenizer.ggml.merges".into(),
                V::Strs(
                    ["h e", "l l", "he ll", "hell o"]
                        .iter()
                        .map(|t| t.to_string())
                        .collect(),
                ),
            ),
            ("tokenizer.ggml.bos_token_id".into(), V::U32(0)),
            ("tokenizer.ggml.eos_token_id".into(), V::U32(1)),
            (
                "tokenizer.chat_template".into(),
                V::Str("{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}".into()),
            ),
        ];
        let t = |name: &str, dims: &[u64]| {
            let n: u64 = dims.iter().product();
            let data = (0..n)
                .flat_map(|i| ((i as f32 * 0.37).sin() * 0.5).to_le_bytes())
                .collect();
            Tensor {
                name: name.into(),
                dims: dims.to_vec(),
                ty: F32,
                data,
                offset: None,
            }
        };
        let tensors = vec![
            t("token_embd.weight", &[8, 16]),
            t("output_norm.weight", &[8]),
            t("blk.0.attn_norm.weight", &[8]),
            t("blk.0.attn_q.weight", &[8, 8]),
            t("blk.0.attn_k.weight", &[8, 8]),
            t("blk.0.attn_v.weight", &[8, 8]),
            t("blk.0.attn_output.weight", &[8, 8]),
            t("blk.0.ffn_norm.weight", &[8]),
            t("blk.0.ffn_gate.weight", &[8, 16]),
            t("blk.0.ffn_up.weight", &[8, 16]),
            t("blk.0.ffn_down.weight", &[16, 8]),
        ];
        Gguf {
            magic: *b"GGUF",
            version: 3,
            tensor_count: None,
            kv_count: None,
            kvs,
            tensors,
        }
    }

    pub fn set(mut self, key: &str, v: V) -> Gguf {
        match self.kvs.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = v,
            None => self.kvs.push((key.into(), v)),
        }
        self
    }

    pub fn without(mut self, key: &str) -> Gguf {
        self.kvs.retain(|(k, _)| k != key);
        self
    }

    pub fn tensor(mut self, name: &str, f: impl FnOnce(&mut Tensor)) -> Gguf {
        f(self
            .tensors
            .iter_mut()
            .find(|t| t.name == name)
            .expect("tensor of the tiny model"));
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut out = self.magic.to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        let tc = self.tensor_count.unwrap_or(self.tensors.len() as u64);
        out.extend_from_slice(&tc.to_le_bytes());
        let kc = self.kv_count.unwrap_or(self.kvs.len() as u64);
        out.extend_from_slice(&kc.to_le_bytes());
        for (k, v) in &self.kvs {
            string(&mut out, k);
            v.write(&mut out);
        }
        let mut next = 0u64;
        let mut placed = Vec::new();
        for t in &self.tensors {
            string(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.to_le_bytes());
            let offset = t.offset.unwrap_or(next);
            out.extend_from_slice(&offset.to_le_bytes());
            placed.push(offset);
            next = (offset + t.data.len() as u64).div_ceil(ALIGN) * ALIGN;
        }
        let data_start = (out.len() as u64).div_ceil(ALIGN) * ALIGN;
        out.resize(data_start as usize, 0);
        for (t, offset) in self.tensors.iter().zip(placed) {
            let at = (data_start + offset) as usize;
            let end = at + t.data.len();
            if end <= (data_start as usize) + (1 << 20) {
                if out.len() < end {
                    out.resize(end, 0);
                }
                out[at..end].copy_from_slice(&t.data);
            }
        }
        out.resize(
            (out.len() as u64).div_ceil(ALIGN) as usize * ALIGN as usize,
            0,
        );
        out
    }
}
