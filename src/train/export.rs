//! Saving a model held on a device (after full fine-tuning) as an HF folder that transformers and
//! anyllama load: every weight of `Model::w` is read back (matrices in their device dtype, norm
//! weights and biases as the f32 they were widened to) and written through the convert
//! pipeline (`convert::write_hf`: the same names, config.json, atomic rename), in bf16 unless
//! asked otherwise, sharded past 5 GB as transformers' `save_pretrained` does. The tokenizer,
//! chat template and generation config come from the files the model was loaded from.

use crate::backend::{Backend, Weight};
use crate::convert::{self, check_dtype, check_output, write_hf, Input, SHARD_LIMIT};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::loader::ModelFiles;
use crate::model::Model;
use crate::pool::Buf;
use crate::train::lora::Proj;
use crate::weights::{tensor_name, HostTensor, TensorMeta, TensorSource};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

/// The storage type of a saved fine-tuned model unless one is asked for (as transformers saves
/// a bf16 model).
pub const DEFAULT_DTYPE: DType = DType::BF16;

/// Writes `m` (loaded from `files`, then trained) as the HF folder `out` (created; it must not
/// exist or be empty): model.safetensors with every weight stored as `dtype` (f32, f16 or
/// bf16; shards `model-0000N-of-0000M.safetensors` with `model.safetensors.index.json` past
/// 5 GB), config.json, and the tokenizer files, chat template and generation config of
/// `files` (copied as they are from an HF folder, written from the GGUF metadata otherwise).
/// A model whose embeddings are tied stays tied (no `lm_head.weight`). Block-quantized weights
/// and LoRA adapters on the model are refused: save adapters with `peft::save`, or merge them
/// with `train::merge`.
pub fn save_hf<B: Backend>(
    b: &B,
    m: &Model<B>,
    files: &ModelFiles,
    out: &Path,
    dtype: DType,
) -> Result<()> {
    save_hf_sharded(b, m, files, out, dtype, SHARD_LIMIT)
}

/// `save_hf` with shards of at most `shard_limit` bytes.
fn save_hf_sharded<B: Backend>(
    b: &B,
    m: &Model<B>,
    files: &ModelFiles,
    out: &Path,
    dtype: DType,
    shard_limit: usize,
) -> Result<()> {
    check_dtype(dtype, false)?;
    check_output(&files.path, out)?;
    if m.lora.is_some() {
        return Err(Error::Usage(
            "the model carries LoRA adapters, which a saved model would leave out; save them \
             as a PEFT adapter (peft::save) or merge them into the base (train::merge)"
                .into(),
        ));
    }
    let (c, f) = (&m.cfg, &files.cfg);
    if (c.vocab_size, c.dim, c.n_layers, c.ffn_dim) != (f.vocab_size, f.dim, f.n_layers, f.ffn_dim)
    {
        return Err(Error::Usage(format!(
            "the model ({} layers, dim {}, vocab {}) was not loaded from {} ({} layers, dim {}, \
             vocab {})",
            c.n_layers,
            c.dim,
            c.vocab_size,
            files.path.display(),
            f.n_layers,
            f.dim,
            f.vocab_size
        )));
    }
    let tensors = DeviceTensors::new(b, m)?;
    let mut cfg = m.cfg.clone();
    // What the forward pass does: the embedding table is the classifier when there is no other.
    cfg.tie_embeddings = m.w.output.is_none();
    let input = Input {
        path: &files.path,
        cfg: &cfg,
        tensors: &tensors,
        gguf_names: false,
        tokenizer: Some(&files.tokenizer),
        generation: files.generation.as_ref(),
        hf_dir: (!files.gguf).then_some(files.path.as_path()),
    };
    write_hf(
        &input,
        out,
        dtype,
        &convert::unchanged,
        &|_, _| {},
        shard_limit,
    )
}

/// Writes the tokenizer files of `files` into the folder `dir` (created if needed; files of
/// the same names are replaced), as `save_hf` does: tokenizer.json, tokenizer_config.json
/// (with the chat template), and special_tokens_map.json / chat_template.jinja where an HF
/// folder has them. For a PEFT adapter folder, so that it carries its tokenizer.
pub fn write_tokenizer_files(files: &ModelFiles, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::load(dir, e.to_string()))?;
    convert::write_tokenizer_files(&Input::of_files(files), dir)
}

/// One weight on the device.
enum DeviceTensor<'a, B: Backend> {
    /// A matrix in its stored dtype.
    Matrix(&'a Weight<B>),
    /// An f32 vector of this many values (norm weights, biases).
    Vector(&'a Buf<B>, usize),
}

/// The weights of a model on a device as a `TensorSource` under HF names, each read back when
/// it is asked for.
struct DeviceTensors<'a, B: Backend> {
    b: &'a B,
    names: Vec<String>,
    by_name: HashMap<String, DeviceTensor<'a, B>>,
}

/// The tensor roles of `weights::load`'s table for a projection's weight and bias.
fn roles(p: Proj) -> (&'static str, &'static str) {
    match p {
        Proj::Q => ("wq", "bq"),
        Proj::K => ("wk", "bk"),
        Proj::V => ("wv", "bv"),
        Proj::O => ("wo", "bo"),
        Proj::Gate => ("w1", "b1"),
        Proj::Up => ("w3", "b3"),
        Proj::Down => ("w2", "b2"),
    }
}

impl<'a, B: Backend> DeviceTensors<'a, B> {
    fn new(b: &'a B, m: &'a Model<B>) -> Result<Self> {
        use DeviceTensor::{Matrix, Vector};
        let (w, dim) = (&m.w, m.cfg.dim);
        let mut list: Vec<(String, DeviceTensor<'a, B>)> = vec![
            (
                tensor_name("tok_embeddings", 0, false),
                Matrix(&w.tok_embeddings),
            ),
            (tensor_name("norm", 0, false), Vector(&w.norm, dim)),
        ];
        if let Some(o) = &w.output {
            list.push((tensor_name("output", 0, false), Matrix(o)));
        }
        for (i, l) in w.layers.iter().enumerate() {
            list.push((
                tensor_name("attn_norm", i, false),
                Vector(&l.attn_norm, dim),
            ));
            list.push((tensor_name("ffn_norm", i, false), Vector(&l.ffn_norm, dim)));
            for p in Proj::ALL {
                let (weight, bias) = p.of(l);
                let (wr, br) = roles(p);
                list.push((tensor_name(wr, i, false), Matrix(weight)));
                if let Some(bias) = bias {
                    list.push((tensor_name(br, i, false), Vector(bias, weight.rows)));
                }
            }
        }
        for (name, t) in &list {
            if let Matrix(wt) = t {
                if wt.dtype.is_quantized() {
                    return Err(Error::Usage(format!(
                        "{name} is stored as {} blocks: a block-quantized model cannot be fully \
                         fine-tuned or saved as a trained model; train LoRA adapters on it and \
                         merge them into an f32 / f16 / bf16 copy instead",
                        wt.dtype
                    )));
                }
            }
        }
        Ok(DeviceTensors {
            b,
            names: list.iter().map(|(n, _)| n.clone()).collect(),
            by_name: list.into_iter().collect(),
        })
    }
}

impl<B: Backend> TensorSource for DeviceTensors<'_, B> {
    fn names(&self) -> Vec<String> {
        self.names.clone()
    }

    fn meta(&self, name: &str) -> Result<Option<TensorMeta>> {
        Ok(self.by_name.get(name).map(|t| match t {
            DeviceTensor::Matrix(w) => TensorMeta {
                dtype: w.dtype,
                shape: vec![w.rows, w.cols],
                bytes: w.dtype.bytes_for(w.rows * w.cols).unwrap_or(0),
            },
            DeviceTensor::Vector(_, n) => TensorMeta {
                dtype: DType::F32,
                shape: vec![*n],
                bytes: n * 4,
            },
        }))
    }

    fn get(&self, name: &str) -> Result<Option<HostTensor<'_>>> {
        let Some(meta) = self.meta(name)? else {
            return Ok(None);
        };
        let buf = match &self.by_name[name] {
            DeviceTensor::Matrix(w) => &w.buf,
            DeviceTensor::Vector(v, _) => *v,
        };
        if buf.len() < meta.bytes {
            return Err(Error::Device(format!(
                "{name}: a {}-byte device buffer holds fewer than the {} bytes of its shape {:?}",
                buf.len(),
                meta.bytes,
                meta.shape
            )));
        }
        let mut data = vec![0u8; meta.bytes];
        self.b.read(buf, 0, &mut data)?;
        Ok(Some(HostTensor {
            dtype: meta.dtype,
            shape: meta.shape,
            data: Cow::Owned(data),
        }))
    }

    fn total_bytes(&self) -> usize {
        self.names
            .iter()
            .filter_map(|n| self.meta(n).ok().flatten())
            .map(|m| m.bytes)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;
    use crate::convert::shard_groups;
    use crate::generate::Generator;

    #[test]
    fn shards_close_before_the_limit_is_passed() {
        assert_eq!(shard_groups(&[], 10), vec![0..0]);
        assert_eq!(shard_groups(&[4, 4, 4], 100), vec![0..3]);
        assert_eq!(shard_groups(&[4, 4, 4], 8), vec![0..2, 2..3]);
        assert_eq!(shard_groups(&[4, 5, 4], 8), vec![0..1, 1..2, 2..3]);
        // A tensor over the limit gets a shard of its own.
        assert_eq!(shard_groups(&[2, 20, 2, 2], 8), vec![0..1, 1..2, 2..4]);
        assert_eq!(shard_groups(&[20], 8), vec![0..1]);
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!(
            "anyllama-export-unit-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    fn logits(b: &Cpu, m: &mut Model<Cpu>, prompt: &[u32]) -> Vec<f32> {
        let mut g = Generator::new(b, m, 32, DType::F32, 32).unwrap();
        g.all_logits(prompt).unwrap()
    }

    #[test]
    fn a_small_shard_limit_writes_shards_and_an_index_that_load_back() {
        let b = Cpu::new();
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/tiny-chat");
        let files = ModelFiles::open(&dir).unwrap();
        let mut m = files.load(&b, false).unwrap();
        let out = scratch("sharded");
        // tiny-chat in f32 is about 0.2 MB: shards of 64 KB make several.
        save_hf_sharded(&b, &m, &files, &out, DType::F32, 64 << 10).unwrap();
        let index: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let map = index["weight_map"].as_object().unwrap();
        let mut shards: Vec<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
        shards.sort();
        shards.dedup();
        assert!(shards.len() > 2, "{shards:?}");
        let n = shards.len();
        for (i, s) in shards.iter().enumerate() {
            assert_eq!(*s, format!("model-{:05}-of-{n:05}.safetensors", i + 1));
            let bytes = std::fs::metadata(out.join(s)).unwrap().len();
            // Each shard holds at most the limit, unless it is one tensor larger than it.
            let in_shard = map.values().filter(|v| v.as_str() == Some(s)).count();
            assert!(
                bytes <= (64 << 10) + 4096 || in_shard == 1,
                "{s}: {bytes} bytes"
            );
        }
        assert!(!out.join("model.safetensors").exists());
        let total: u64 = index["metadata"]["total_size"].as_u64().unwrap();
        let src = &files.source;
        let f32_bytes: usize = src
            .names()
            .iter()
            .map(|n| {
                src.meta(n)
                    .unwrap()
                    .unwrap()
                    .shape
                    .iter()
                    .product::<usize>()
                    * 4
            })
            .sum();
        assert_eq!(total as usize, f32_bytes);

        let again = ModelFiles::open(&out).unwrap();
        let mut m2 = again.load(&b, false).unwrap();
        let prompt = [1u32, 20, 300, 7, 45, 2, 99];
        assert_eq!(logits(&b, &mut m2, &prompt), logits(&b, &mut m, &prompt));
        std::fs::remove_dir_all(&out).unwrap();
    }
}
