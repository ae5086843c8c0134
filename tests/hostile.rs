//! The catalogue of hostile and broken inputs: every case is made here from a small valid model
//! (a GGUF file written byte by byte below, or a copy of the tiny-chat HF folder) by one change,
//! and must be refused with the expected error kind and a message naming the file and the
//! problem, quickly, without a panic and without a large allocation.
//!
//! The memory cap is real: this test binary's global allocator refuses any single allocation
//! over 64 MiB and any growth of live memory past 512 MiB, so a loader that trusted a claimed
//! size would abort the run ("memory allocation of N bytes failed") instead of passing. The
//! command-line cases run the binary under `ulimit -v`.

mod common;

use anyllama::backend::cpu::Cpu;
use anyllama::backend::MemoryLimits;
use anyllama::dtype::DType;
use anyllama::generate::{GenerateOptions, Generator};
use anyllama::loader::ModelFiles;
use anyllama::weights::safetensors::SafetensorsSource;
use anyllama::Error;
use serde_json::{json, Value};
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Memory cap

const MAX_ONE_ALLOCATION: usize = 64 << 20;
const MAX_LIVE: usize = 512 << 20;

struct CappedAllocator;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

impl CappedAllocator {
    fn reserve(size: usize) -> bool {
        if size > MAX_ONE_ALLOCATION {
            return false;
        }
        let live = LIVE.fetch_add(size, Ordering::SeqCst) + size;
        if live > MAX_LIVE {
            LIVE.fetch_sub(size, Ordering::SeqCst);
            return false;
        }
        PEAK.fetch_max(live, Ordering::SeqCst);
        true
    }
}

unsafe impl GlobalAlloc for CappedAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !Self::reserve(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = System.alloc(layout);
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !Self::reserve(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = System.alloc_zeroed(layout);
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() && !Self::reserve(new_size - layout.size()) {
            return std::ptr::null_mut();
        }
        let p = System.realloc(ptr, layout, new_size);
        if p.is_null() {
            if new_size > layout.size() {
                LIVE.fetch_sub(new_size - layout.size(), Ordering::SeqCst);
            }
        } else if new_size < layout.size() {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::SeqCst);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: CappedAllocator = CappedAllocator;

// ---------------------------------------------------------------------------------------------
// A GGUF file written field by field, so that any field can be made wrong.

const ALIGN: u64 = 32;
const F32: u32 = 0;

#[derive(Clone)]
enum V {
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
struct Tensor {
    name: String,
    /// ggml order (fastest first).
    dims: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
    /// Offset in the data section; None lays tensors out one after another.
    offset: Option<u64>,
}

#[derive(Clone)]
struct Gguf {
    magic: [u8; 4],
    version: u32,
    /// Counts written in the header; None writes the real ones.
    tensor_count: Option<u64>,
    kv_count: Option<u64>,
    kvs: Vec<(String, V)>,
    tensors: Vec<Tensor>,
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
    fn tiny() -> Gguf {
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

    fn set(mut self, key: &str, v: V) -> Gguf {
        match self.kvs.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = v,
            None => self.kvs.push((key.into(), v)),
        }
        self
    }

    fn without(mut self, key: &str) -> Gguf {
        self.kvs.retain(|(k, _)| k != key);
        self
    }

    fn tensor(mut self, name: &str, f: impl FnOnce(&mut Tensor)) -> Gguf {
        f(self
            .tensors
            .iter_mut()
            .find(|t| t.name == name)
            .expect("tensor of the tiny model"));
        self
    }

    fn bytes(&self) -> Vec<u8> {
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

// ---------------------------------------------------------------------------------------------
// The cases

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Load,
    Config,
    Tokenizer,
    Template,
    Device,
    Generation,
    Usage,
}

fn kind(e: &Error) -> Kind {
    match e {
        Error::Load { .. } => Kind::Load,
        Error::Config(_) => Kind::Config,
        Error::Tokenizer(_) => Kind::Tokenizer,
        Error::Template(_) => Kind::Template,
        Error::Device(_) => Kind::Device,
        Error::Generation(_) => Kind::Generation,
        Error::Usage(_) => Kind::Usage,
        Error::Io(_) => panic!("an io error carries no file name: {e}"),
    }
}

/// A scratch folder for one case.
fn case_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir()
        .join(format!("anyllama-hostile-{}", std::process::id()))
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_gguf(name: &str, g: &Gguf) -> PathBuf {
    write_gguf_bytes(name, &g.bytes())
}

fn write_gguf_bytes(name: &str, bytes: &[u8]) -> PathBuf {
    let path = case_dir(name).join(format!("{name}.gguf"));
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Opens the model and uploads it to the CPU backend: the whole loading path.
fn open_and_load(path: &Path) -> anyllama::Result<()> {
    let files = ModelFiles::open(path)?;
    files.check_fits(&Cpu::new(), 16, DType::F16, 8)?;
    files.load(&Cpu::new(), false)?;
    Ok(())
}

/// A copy of the tiny-chat HF folder, changed by `edit`.
fn hf_copy(name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let src = common::fixtures().join("hf/tiny-chat");
    let dir = case_dir(name).join("model");
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    edit(&dir);
    dir
}

fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string(&v).unwrap()).unwrap();
}

/// Splits a safetensors file into its JSON header and data, lets `f` change both, writes it.
fn edit_safetensors(path: &Path, f: impl FnOnce(&mut Value, &mut Vec<u8>)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut data = bytes[8 + n..].to_vec();
    f(&mut header, &mut data);
    let h = serde_json::to_vec(&header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}

/// A copy of the sharded fixture (three shards and an index), changed by `edit`.
fn sharded_copy(name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let src = common::fixtures().join("hf/yarn-gqa2-f16-sharded-v4");
    let dir = case_dir(name).join("model");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        if p.extension()
            .is_some_and(|x| x == "safetensors" || x == "json")
        {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    edit(&dir);
    dir
}

fn index_path(dir: &Path) -> PathBuf {
    dir.join("model.safetensors.index.json")
}

/// Greedy generation on the tiny-chat model with a context of `ctx` tokens.
fn generate_with(ctx: usize, prompt: &[u32]) -> anyllama::Result<()> {
    let files = ModelFiles::open(&common::fixtures().join("hf/tiny-chat"))?;
    let b = Cpu::new();
    let mut model = files.load(&b, false)?;
    let mut g = Generator::new(&b, &mut model, ctx, DType::F32, 8)?;
    let opts = GenerateOptions {
        max_new_tokens: 4,
        sampling: Default::default(),
        eos_ids: vec![],
        ignore_eos: false,
    };
    g.generate(prompt, &opts, &mut |_| true).map(|_| ())
}

fn render(template: &str) -> anyllama::Result<()> {
    anyllama::chat_template::render_chat_template(
        template,
        &[anyllama::chat_template::Message::new("user", "hi")],
        true,
        &[],
    )
    .map(|_| ())
}

/// The file or folder a case wrote (if any) and what loading it gave.
type CaseResult = (Option<PathBuf>, anyllama::Result<()>);

struct Case {
    name: &'static str,
    kind: Kind,
    /// Fragments the message must contain (the problem; the file is checked separately).
    says: &'static [&'static str],
    /// Whether the message must name the file or folder the case wrote.
    names_file: bool,
    run: Box<dyn Fn(&'static str) -> CaseResult>,
}

fn gguf_case(
    name: &'static str,
    kind: Kind,
    says: &'static [&'static str],
    make: fn() -> Vec<u8>,
) -> Case {
    Case {
        name,
        kind,
        says,
        names_file: true,
        run: Box::new(move |n| {
            let p = write_gguf_bytes(n, &make());
            let r = open_and_load(&p);
            (Some(p), r)
        }),
    }
}

fn hf_case(name: &'static str, kind: Kind, says: &'static [&'static str], edit: fn(&Path)) -> Case {
    Case {
        name,
        kind,
        says,
        names_file: true,
        run: Box::new(move |n| {
            let d = hf_copy(n, edit);
            let r = open_and_load(&d);
            (Some(d), r)
        }),
    }
}

fn sharded_case(
    name: &'static str,
    kind: Kind,
    says: &'static [&'static str],
    edit: fn(&Path),
) -> Case {
    Case {
        name,
        kind,
        says,
        names_file: true,
        run: Box::new(move |n| {
            let d = sharded_copy(n, edit);
            let r = SafetensorsSource::open(&d).map(|_| ());
            (Some(d), r)
        }),
    }
}

fn other_case(
    name: &'static str,
    kind: Kind,
    says: &'static [&'static str],
    run: fn() -> anyllama::Result<()>,
) -> Case {
    Case {
        name,
        kind,
        says,
        names_file: false,
        run: Box::new(move |_| (None, run())),
    }
}

fn tiny() -> Gguf {
    Gguf::tiny()
}

fn catalogue() -> Vec<Case> {
    use Kind::*;
    vec![
        // ---- GGUF: the container ----
        gguf_case("gguf_empty", Load, &["too short"], Vec::new),
        gguf_case(
            "gguf_truncated",
            Load,
            &["past the end of the file"],
            || {
                let b = tiny().bytes();
                b[..b.len() / 3].to_vec()
            },
        ),
        gguf_case("gguf_bad_magic", Load, &["not a GGUF file"], || {
            let mut g = tiny();
            g.magic = *b"GGML";
            g.bytes()
        }),
        gguf_case(
            "gguf_version",
            Load,
            &["unsupported GGUF version 7"],
            || {
                let mut g = tiny();
                g.version = 7;
                g.bytes()
            },
        ),
        gguf_case("gguf_big_endian", Load, &["big-endian"], || {
            let mut g = tiny();
            g.version = 3u32.swap_bytes();
            g.bytes()
        }),
        gguf_case("gguf_huge_tensor_count", Load, &["tensor count"], || {
            let mut g = tiny();
            g.tensor_count = Some(1 << 60);
            g.bytes()
        }),
        gguf_case("gguf_huge_kv_count", Load, &["metadata count"], || {
            let mut g = tiny();
            g.kv_count = Some(u64::MAX);
            g.bytes()
        }),
        gguf_case("gguf_huge_string", Load, &["string length"], || {
            let mut body = (1u64 << 40).to_le_bytes().to_vec();
            body.extend_from_slice(b"abc");
            tiny().set("general.name", V::Raw(8, body)).bytes()
        }),
        gguf_case("gguf_huge_array", Load, &["array length"], || {
            let mut body = 8u32.to_le_bytes().to_vec();
            body.extend_from_slice(&(1u64 << 62).to_le_bytes());
            tiny().set("tokenizer.ggml.tokens", V::Raw(9, body)).bytes()
        }),
        gguf_case("gguf_nested_arrays", Load, &["nested"], || {
            // An array of arrays of arrays ... deeper than any real file.
            let mut body = Vec::new();
            for _ in 0..20 {
                body.extend_from_slice(&9u32.to_le_bytes());
                body.extend_from_slice(&1u64.to_le_bytes());
            }
            body.extend_from_slice(&4u32.to_le_bytes());
            body.extend_from_slice(&0u64.to_le_bytes());
            tiny().set("general.nested", V::Raw(9, body)).bytes()
        }),
        gguf_case(
            "gguf_unknown_value_type",
            Load,
            &["unknown value type 77"],
            || tiny().set("general.odd", V::Raw(77, vec![0; 8])).bytes(),
        ),
        gguf_case("gguf_too_many_dims", Load, &["5 dimensions"], || {
            tiny()
                .tensor("output_norm.weight", |t| t.dims = vec![8, 1, 1, 1, 1])
                .bytes()
        }),
        gguf_case("gguf_zero_dim", Load, &["zero dimension"], || {
            tiny()
                .tensor("blk.0.attn_q.weight", |t| t.dims = vec![8, 0])
                .bytes()
        }),
        gguf_case("gguf_dims_overflow", Load, &["overflow"], || {
            tiny()
                .tensor("blk.0.attn_q.weight", |t| {
                    t.dims = vec![1 << 32, 1 << 32, 16]
                })
                .bytes()
        }),
        gguf_case(
            "gguf_huge_tensor",
            Load,
            &["runs past the end of the file"],
            || {
                // 2^40 f32 values claimed by a 5 KB file.
                tiny()
                    .tensor("blk.0.attn_q.weight", |t| t.dims = vec![1 << 20, 1 << 20])
                    .bytes()
            },
        ),
        gguf_case("gguf_unknown_type", Load, &["unknown ggml type 99"], || {
            tiny().tensor("output_norm.weight", |t| t.ty = 99).bytes()
        }),
        gguf_case(
            "gguf_undecodable_type",
            Load,
            &["Q5_K", "cannot be decoded"],
            || {
                // Q5_K (type 13): a real ggml type, 256 values per 176-byte block, not supported.
                tiny()
                    .tensor("blk.0.ffn_down.weight", |t| {
                        t.dims = vec![256, 8];
                        t.ty = 13;
                        t.data = vec![0; 176 * 8];
                    })
                    .bytes()
            },
        ),
        gguf_case("gguf_offset_past_end", Load, &["runs past the end"], || {
            tiny()
                .tensor("output_norm.weight", |t| t.offset = Some(1 << 50))
                .bytes()
        }),
        gguf_case("gguf_misaligned", Load, &["alignment"], || {
            tiny()
                .tensor("output_norm.weight", |t| t.offset = Some(513))
                .bytes()
        }),
        gguf_case("gguf_overlap", Load, &["overlap"], || {
            tiny()
                .tensor("blk.0.attn_k.weight", |t| t.offset = Some(0))
                .bytes()
        }),
        gguf_case("gguf_duplicate_tensor", Load, &["appears twice"], || {
            tiny()
                .tensor("blk.0.attn_k.weight", |t| {
                    t.name = "blk.0.attn_q.weight".into()
                })
                .bytes()
        }),
        gguf_case("gguf_bad_alignment", Load, &["power of two"], || {
            tiny().set("general.alignment", V::U32(3)).bytes()
        }),
        gguf_case(
            "gguf_missing_key",
            Load,
            &["llama.embedding_length"],
            || tiny().without("llama.embedding_length").bytes(),
        ),
        gguf_case(
            "gguf_wrong_key_type",
            Load,
            &["llama.block_count", "expected"],
            || {
                tiny()
                    .set("llama.block_count", V::Str("one".into()))
                    .bytes()
            },
        ),
        gguf_case("gguf_zero_width", Config, &["must be positive"], || {
            tiny().set("llama.embedding_length", V::U32(0)).bytes()
        }),
        gguf_case(
            "gguf_heads_do_not_divide",
            Config,
            &["not a multiple"],
            || {
                tiny()
                    .set("llama.attention.head_count", V::U32(3))
                    .set("llama.attention.head_count_kv", V::U32(3))
                    .bytes()
            },
        ),
        gguf_case(
            "gguf_huge_layers",
            Config,
            &["num_hidden_layers", "larger than"],
            || tiny().set("llama.block_count", V::U64(1 << 40)).bytes(),
        ),
        gguf_case("gguf_arch", Config, &["\"gpt2\"", "not supported"], || {
            tiny()
                .set("general.architecture", V::Str("gpt2".into()))
                .bytes()
        }),
        gguf_case(
            "gguf_wrong_shape",
            Config,
            &["blk.0.attn_v.weight", "shape"],
            || {
                tiny()
                    .tensor("blk.0.attn_v.weight", |t| t.dims = vec![8, 4])
                    .bytes()
            },
        ),
        gguf_case(
            "gguf_missing_tensor",
            Config,
            &["blk.0.ffn_up.weight", "missing"],
            || {
                let mut g = tiny();
                g.tensors.retain(|t| t.name != "blk.0.ffn_up.weight");
                g.bytes()
            },
        ),
        gguf_case(
            "gguf_vocab_past_embedding",
            Config,
            &["16 tokens", "embedding only 12"],
            || {
                tiny()
                    .set("llama.vocab_size", V::U32(12))
                    .tensor("token_embd.weight", |t| {
                        t.dims = vec![8, 12];
                        t.data.truncate(8 * 12 * 4);
                    })
                    .bytes()
            },
        ),
        gguf_case(
            "gguf_special_id_out_of_vocab",
            Tokenizer,
            &["bos_token_id = 999"],
            || {
                tiny()
                    .set("tokenizer.ggml.bos_token_id", V::U32(999))
                    .bytes()
            },
        ),
        gguf_case(
            "gguf_tokenizer_model",
            Tokenizer,
            &["\"bert\"", "not supported"],
            || {
                tiny()
                    .set("tokenizer.ggml.model", V::Str("bert".into()))
                    .bytes()
            },
        ),
        gguf_case("gguf_bad_merge", Tokenizer, &["merge"], || {
            tiny()
                .set("tokenizer.ggml.merges", V::Strs(vec!["hel".into()]))
                .bytes()
        }),
        gguf_case("gguf_nan_scores", Tokenizer, &["scores[3] is NaN"], || {
            // Found by fuzzing: NaN scores broke the ordering of the rebuilt merges.
            let mut scores: Vec<u8> = 6u32.to_le_bytes().to_vec();
            scores.extend_from_slice(&16u64.to_le_bytes());
            for i in 0..16 {
                let s = if i == 3 { f32::NAN } else { -(i as f32) };
                scores.extend_from_slice(&s.to_le_bytes());
            }
            tiny()
                .set("tokenizer.ggml.model", V::Str("llama".into()))
                .without("tokenizer.ggml.merges")
                .set("tokenizer.ggml.scores", V::Raw(9, scores))
                .bytes()
        }),
        gguf_case(
            "gguf_token_types_length",
            Tokenizer,
            &["token_type"],
            || {
                tiny()
                    .set("tokenizer.ggml.token_type", V::I32s(vec![1, 1]))
                    .bytes()
            },
        ),
        // ---- safetensors, single file ----
        hf_case("st_header_past_end", Load, &["model.safetensors"], |d| {
            let p = d.join("model.safetensors");
            let mut b = std::fs::read(&p).unwrap();
            let claimed = b.len() as u64 * 2;
            b[..8].copy_from_slice(&claimed.to_le_bytes());
            std::fs::write(&p, b).unwrap();
        }),
        hf_case("st_huge_header", Load, &["model.safetensors"], |d| {
            let p = d.join("model.safetensors");
            let mut b = std::fs::read(&p).unwrap();
            b[..8].copy_from_slice(&(1u64 << 62).to_le_bytes());
            std::fs::write(&p, b).unwrap();
        }),
        hf_case("st_header_not_json", Load, &["model.safetensors"], |d| {
            let p = d.join("model.safetensors");
            let mut b = std::fs::read(&p).unwrap();
            b[8] = b'#';
            std::fs::write(&p, b).unwrap();
        }),
        hf_case("st_unknown_dtype", Load, &["model.safetensors"], |d| {
            edit_safetensors(&d.join("model.safetensors"), |h, _| {
                h["model.norm.weight"]["dtype"] = json!("F9_E9");
            })
        }),
        hf_case(
            "st_unsupported_dtype",
            Load,
            &["model.norm.weight", "I32"],
            |d| {
                edit_safetensors(&d.join("model.safetensors"), |h, _| {
                    // I32 has the size of the stored BF16 pair count / 2: same bytes, other dtype.
                    let shape = h["model.norm.weight"]["shape"][0].as_u64().unwrap();
                    h["model.norm.weight"]["dtype"] = json!("I32");
                    h["model.norm.weight"]["shape"] = json!([shape / 2]);
                })
            },
        ),
        hf_case("st_shape_vs_bytes", Load, &["model.safetensors"], |d| {
            edit_safetensors(&d.join("model.safetensors"), |h, _| {
                h["model.norm.weight"]["shape"] = json!([1000]);
            })
        }),
        hf_case("st_overlap", Load, &["model.safetensors"], |d| {
            edit_safetensors(&d.join("model.safetensors"), |h, _| {
                let (name, first) = h
                    .as_object()
                    .unwrap()
                    .iter()
                    .find(|(k, _)| *k != "__metadata__")
                    .map(|(k, v)| (k.clone(), v["data_offsets"].clone()))
                    .unwrap();
                let other = h
                    .as_object()
                    .unwrap()
                    .keys()
                    .find(|k| **k != name && *k != "__metadata__")
                    .unwrap()
                    .clone();
                // Two tensors on the same bytes (shapes left as they are: the sizes differ or
                // the coverage breaks, either way the ranges no longer tile the file).
                h[&other]["data_offsets"] = first;
            })
        }),
        hf_case("st_truncated", Load, &["model.safetensors"], |d| {
            let p = d.join("model.safetensors");
            let b = std::fs::read(&p).unwrap();
            std::fs::write(&p, &b[..b.len() - 100]).unwrap();
        }),
        hf_case(
            "st_wrong_shape",
            Config,
            &["model.embed_tokens.weight", "shape"],
            |d| {
                edit_safetensors(&d.join("model.safetensors"), |h, _| {
                    let s = h["model.embed_tokens.weight"]["shape"].clone();
                    let (r, c) = (s[0].as_u64().unwrap(), s[1].as_u64().unwrap());
                    h["model.embed_tokens.weight"]["shape"] = json!([c, r]);
                })
            },
        ),
        // ---- sharded index ----
        sharded_case("idx_traversal", Load, &["not a plain file name"], |d| {
            edit_json(&index_path(d), |v| {
                let map = v["weight_map"].as_object_mut().unwrap();
                let k = map.keys().next().unwrap().clone();
                map[&k] = json!("../model-00001-of-00003.safetensors");
            })
        }),
        sharded_case("idx_absolute", Load, &["not a plain file name"], |d| {
            edit_json(&index_path(d), |v| {
                let map = v["weight_map"].as_object_mut().unwrap();
                let k = map.keys().next().unwrap().clone();
                map[&k] = json!("/etc/passwd");
            })
        }),
        sharded_case(
            "idx_link_outside",
            Load,
            &["outside the model folder"],
            |d| {
                // A shard that is a link to a file in the parent folder.
                let shard = d.join("model-00003-of-00003.safetensors");
                let outside = d.parent().unwrap().join("elsewhere.safetensors");
                std::fs::rename(&shard, &outside).unwrap();
                std::os::unix::fs::symlink(&outside, &shard).unwrap();
            },
        ),
        sharded_case("idx_missing_tensor", Load, &["does not hold it"], |d| {
            edit_json(&index_path(d), |v| {
                v["weight_map"]["model.layers.9.mlp.up_proj.weight"] =
                    json!("model-00001-of-00003.safetensors");
            })
        }),
        sharded_case("idx_unlisted_tensor", Load, &["does not list"], |d| {
            edit_json(&index_path(d), |v| {
                // A tensor of the shard that holds several, so the shard is still opened.
                let map = v["weight_map"].as_object_mut().unwrap();
                let k = map
                    .iter()
                    .find(|(_, s)| *s == "model-00002-of-00003.safetensors")
                    .unwrap()
                    .0
                    .clone();
                map.remove(&k);
            })
        }),
        sharded_case("idx_wrong_shard", Load, &["puts in"], |d| {
            edit_json(&index_path(d), |v| {
                let map = v["weight_map"].as_object_mut().unwrap();
                let k = map
                    .iter()
                    .find(|(_, s)| *s == "model-00001-of-00003.safetensors")
                    .unwrap()
                    .0
                    .clone();
                map[&k] = json!("model-00002-of-00003.safetensors");
            })
        }),
        sharded_case("idx_broken_json", Load, &["invalid JSON"], |d| {
            std::fs::write(index_path(d), "{\"weight_map\": {").unwrap();
        }),
        sharded_case(
            "idx_missing_shard",
            Load,
            &["model-00002-of-00003.safetensors"],
            |d| {
                std::fs::remove_file(d.join("model-00002-of-00003.safetensors")).unwrap();
            },
        ),
        // ---- config.json ----
        hf_case("cfg_broken_json", Config, &["not valid JSON"], |d| {
            std::fs::write(d.join("config.json"), "{\"hidden_size\": 48,").unwrap();
        }),
        hf_case(
            "cfg_unknown_rope",
            Config,
            &["unknown rope type `su`"],
            |d| {
                edit_json(&d.join("config.json"), |v| {
                    v["rope_parameters"] = json!({"rope_type": "su", "factor": 2.0});
                })
            },
        ),
        hf_case("cfg_heads", Config, &["num_attention_heads"], |d| {
            edit_json(&d.join("config.json"), |v| {
                v["num_attention_heads"] = json!(5)
            })
        }),
        hf_case("cfg_kv_heads", Config, &["num_key_value_heads"], |d| {
            edit_json(&d.join("config.json"), |v| {
                v["num_key_value_heads"] = json!(4)
            })
        }),
        hf_case("cfg_zero_width", Config, &["hidden_size"], |d| {
            edit_json(&d.join("config.json"), |v| v["hidden_size"] = json!(0))
        }),
        hf_case(
            "cfg_huge_vocab",
            Config,
            &["vocab_size", "larger than"],
            |d| {
                edit_json(&d.join("config.json"), |v| {
                    v["vocab_size"] = json!(1u64 << 40)
                })
            },
        ),
        hf_case("cfg_wrong_type", Config, &["`hidden_size` must be"], |d| {
            edit_json(&d.join("config.json"), |v| v["hidden_size"] = json!("48"))
        }),
        hf_case(
            "cfg_vocab_vs_embedding",
            Config,
            &["model.embed_tokens.weight", "shape"],
            |d| edit_json(&d.join("config.json"), |v| v["vocab_size"] = json!(600)),
        ),
        hf_case(
            "cfg_vocab_vs_tokenizer",
            Config,
            &["tokenizer has", "embedding only 256"],
            |d| edit_json(&d.join("config.json"), |v| v["vocab_size"] = json!(256)),
        ),
        hf_case(
            "cfg_huge_context",
            Config,
            &["max_position_embeddings", "larger than"],
            |d| {
                edit_json(&d.join("config.json"), |v| {
                    v["max_position_embeddings"] = json!(1u64 << 40)
                })
            },
        ),
        // ---- tokenizer files ----
        hf_case("tok_missing", Load, &["tokenizer.json", "not found"], |d| {
            std::fs::remove_file(d.join("tokenizer.json")).unwrap();
        }),
        hf_case("tok_broken_json", Load, &["tokenizer.json"], |d| {
            std::fs::write(d.join("tokenizer.json"), "{\"model\": [").unwrap();
        }),
        hf_case("tok_bad_merges", Load, &["tokenizer.json"], |d| {
            edit_json(&d.join("tokenizer.json"), |v| {
                v["model"]["merges"] = json!([["no-such-token", "other"]]);
            })
        }),
        hf_case(
            "tok_config_not_object",
            Load,
            &["tokenizer_config.json"],
            |d| {
                std::fs::write(d.join("tokenizer_config.json"), "[1, 2]").unwrap();
            },
        ),
        // ---- chat templates ----
        other_case("tpl_syntax", Template, &["syntax error"], || {
            render("{% for m in messages %}{{ m.content }")
        }),
        other_case("tpl_endless", Template, &["fuel"], || {
            render(
                "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
            )
        }),
        other_case("tpl_recursion", Template, &["recursion"], || {
            render("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")
        }),
        other_case("tpl_raise", Template, &["roles must alternate"], || {
            render("{{ raise_exception('roles must alternate') }}")
        }),
        // ---- generation ----
        other_case(
            "gen_prompt_too_long",
            Generation,
            &["20 tokens", "context holds"],
            || generate_with(8, &[5; 20]),
        ),
        other_case(
            "gen_token_past_vocab",
            Generation,
            &["token id 4000"],
            || generate_with(16, &[1, 4000]),
        ),
        other_case(
            "gen_context_overflows",
            Usage,
            &["too large to address"],
            || generate_with(usize::MAX / 2, &[1, 2]),
        ),
        other_case(
            "gen_context_does_not_fit",
            Device,
            &["does not fit"],
            || generate_with(1 << 40, &[1, 2]),
        ),
        // ---- device memory ----
        other_case(
            "mem_tensor_over_max_buffer",
            Device,
            &["larger than the largest buffer"],
            || {
                let files = ModelFiles::open(&common::fixtures().join("hf/tiny-chat"))?;
                let plan = files.memory_plan(16, DType::F16, 8)?;
                let limits = MemoryLimits {
                    max_buffer: Some(1024),
                    ..Default::default()
                };
                plan.check(&limits, &files.name(), "a small device")
            },
        ),
        other_case(
            "mem_model_over_available",
            Device,
            &["does not fit"],
            || {
                let files = ModelFiles::open(&common::fixtures().join("hf/tiny-chat"))?;
                let plan = files.memory_plan(256, DType::F32, 8)?;
                let limits = MemoryLimits {
                    available: Some(64 << 10),
                    ..Default::default()
                };
                plan.check(&limits, &files.name(), "a small device")
            },
        ),
    ]
}

#[test]
fn the_base_inputs_are_valid() {
    // Every case changes one thing in these; they must load, or the cases prove nothing.
    open_and_load(&write_gguf("valid_tiny", &Gguf::tiny())).expect("tiny GGUF loads");
    open_and_load(&hf_copy("valid_hf", |_| {})).expect("tiny-chat copy loads");
    SafetensorsSource::open(&sharded_copy("valid_sharded", |_| {})).expect("sharded copy opens");
    render("{{ messages[0].content }}").expect("a template renders");
    generate_with(16, &[1, 2, 3]).expect("generation runs");
}

#[test]
fn every_hostile_input_is_refused_clearly() {
    let cases = catalogue();
    assert!(cases.len() >= 30, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        PEAK.store(LIVE.load(Ordering::SeqCst), Ordering::SeqCst);
        let before = LIVE.load(Ordering::SeqCst);
        let t0 = Instant::now();
        let (path, result) = (case.run)(case.name);
        let took = t0.elapsed();
        let peak = PEAK.load(Ordering::SeqCst).saturating_sub(before);
        let err = match result {
            Ok(()) => {
                failures.push(format!("{}: accepted", case.name));
                continue;
            }
            Err(e) => e,
        };
        let msg = err.to_string();
        if kind(&err) != case.kind {
            failures.push(format!(
                "{}: {:?} error, expected {:?}: {msg}",
                case.name,
                kind(&err),
                case.kind
            ));
        }
        if msg.contains("panicked") {
            failures.push(format!("{}: a library panicked: {msg}", case.name));
        }
        for s in case.says {
            if !msg.contains(s) {
                failures.push(format!("{}: message lacks {s:?}: {msg}", case.name));
            }
        }
        if case.names_file {
            // The message names the file, or the model folder it belongs to.
            let p = path.expect("file cases return their path");
            let named = msg.contains(&p.display().to_string())
                || p.parent()
                    .is_some_and(|d| msg.contains(&d.display().to_string()));
            if !named {
                failures.push(format!(
                    "{}: message does not name {}: {msg}",
                    case.name,
                    p.display()
                ));
            }
        }
        if took > Duration::from_secs(5) {
            failures.push(format!("{}: took {took:?}", case.name));
        }
        if peak > 64 << 20 {
            failures.push(format!("{}: allocated {peak} bytes", case.name));
        }
        eprintln!(
            "{:<28} {:?} {:>6.0?} peak {:>5} KiB  {msg}",
            case.name,
            kind(&err),
            took,
            peak >> 10
        );
    }
    let _ = std::fs::remove_dir_all(
        std::env::temp_dir().join(format!("anyllama-hostile-{}", std::process::id())),
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// The command line: one `error: <what>: <why>` line, a non-zero exit, no panic, no hang, under
// an address-space limit.

fn anyllama_limited(args: &[&str]) -> (Option<i32>, String, String) {
    let bin =
        std::env::var_os("ANYLLAMA_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_anyllama").into());
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 4194304; exec \"$0\" \"$@\"")
        .arg(bin)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run anyllama");
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("anyllama {args:?} hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_reports_hostile_files_in_one_error_line() {
    let huge = write_gguf(
        "cli_huge",
        &tiny().tensor("blk.0.attn_q.weight", |t| t.dims = vec![1 << 20, 1 << 20]),
    );
    let mut counts = tiny();
    counts.kv_count = Some(u64::MAX);
    let counts = write_gguf("cli_counts", &counts);
    let vocab = write_gguf(
        "cli_vocab",
        &tiny().set("tokenizer.ggml.bos_token_id", V::U32(999)),
    );
    let traversal = sharded_copy("cli_traversal", |d| {
        edit_json(&index_path(d), |v| {
            let map = v["weight_map"].as_object_mut().unwrap();
            let k = map.keys().next().unwrap().clone();
            map[&k] = json!("../../x.safetensors");
        })
    });
    // The sharded fixture has no tokenizer: copy tiny-chat's, so the index is what fails.
    let tiny_chat = common::fixtures().join("hf/tiny-chat");
    std::fs::copy(
        tiny_chat.join("tokenizer.json"),
        traversal.join("tokenizer.json"),
    )
    .unwrap();
    let long = "hello ".repeat(100);
    let model = tiny_chat.display().to_string();
    let cases: Vec<(Vec<String>, &str, Option<&str>)> = vec![
        (
            vec!["info".into(), "-m".into(), huge.display().to_string()],
            "error: loading ",
            Some("hint:"),
        ),
        (
            vec!["info".into(), "-m".into(), counts.display().to_string()],
            "metadata count",
            Some("hint:"),
        ),
        (
            vec!["info".into(), "-m".into(), vocab.display().to_string()],
            "error: tokenizer: ",
            None,
        ),
        (
            vec!["info".into(), "-m".into(), traversal.display().to_string()],
            "not a plain file name",
            None,
        ),
        (
            [
                "generate",
                "-m",
                &model,
                "-p",
                &long,
                "-c",
                "16",
                "--backend",
                "cpu",
            ]
            .map(String::from)
            .to_vec(),
            "error: generation: ",
            Some("--truncate"),
        ),
    ];
    for (args, want, hint) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stdout, stderr) = anyllama_limited(&args);
        assert_eq!(code, Some(1), "{args:?}: exit {code:?}, stderr: {stderr}");
        assert!(stdout.is_empty(), "{args:?} wrote to stdout: {stdout}");
        let first = stderr.lines().find(|l| l.starts_with("error: "));
        let first = first.unwrap_or_else(|| panic!("{args:?}: no error line in {stderr}"));
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(
            first.matches(": ").count() >= 2,
            "not `error: what: why`: {first}"
        );
        if let Some(h) = hint {
            assert!(stderr.contains(h), "{args:?}: no hint {h:?}: {stderr}");
        }
    }
    // With --truncate the same prompt runs, keeping its end.
    let (code, _, stderr) = anyllama_limited(&[
        "generate",
        "-m",
        &model,
        "-p",
        &long,
        "-c",
        "16",
        "-n",
        "2",
        "--backend",
        "cpu",
        "--truncate",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("--truncate kept the last"), "{stderr}");
}
