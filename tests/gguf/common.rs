//! Shared pieces of the GGUF tests: fixture paths, a byte-level GGUF writer for hand-made (and
//! deliberately broken) files, and an allocator that records the largest single allocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("tests/fixtures/gguf")
    .join(name)
}

pub fn load_json(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(name)).expect("fixture json");
    serde_json::from_str(&text).expect("fixture json parses")
}

pub fn f32_list(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

pub fn u32_list(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

pub fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The real SmolLM2 file: `ANYLLAMA_SMOLLM2_GGUF`, else the default model, fetched into the cache
/// once if needed. When it cannot be had the test is skipped with a printed reason, except under
/// CI, where that is a failure.
pub fn smollm2() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ANYLLAMA_SMOLLM2_GGUF").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    match anyllama::default_model::ensure_default_model() {
        Ok(p) => Some(p),
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("CI is set but the SmolLM2 GGUF is unavailable: {e}")
        }
        Err(e) => {
            eprintln!("skipped: SmolLM2 GGUF unavailable ({e}); set ANYLLAMA_SMOLLM2_GGUF");
            None
        }
    }
}

/// Writes bytes to a fresh file under the temp dir and returns its path.
pub fn temp_file(bytes: &[u8]) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!(
        "anyllama-gguf-test-{}-{n}.gguf",
        std::process::id()
    ));
    std::fs::write(&path, bytes).expect("write temp file");
    path
}

/// Little-endian GGUF byte writer; nothing is validated, so tests can write broken files.
#[derive(Default)]
pub struct Bytes(pub Vec<u8>);

impl Bytes {
    pub fn header(version: u32, n_tensors: u64, n_kv: u64) -> Bytes {
        let mut b = Bytes::default();
        b.raw(b"GGUF").u32(version).u64(n_tensors).u64(n_kv);
        b
    }
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }
    pub fn string(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64).raw(s.as_bytes())
    }
    pub fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.string(key).u32(4).u32(v)
    }
    pub fn kv_f32(&mut self, key: &str, v: f32) -> &mut Self {
        self.string(key).u32(6).raw(&v.to_le_bytes())
    }
    pub fn kv_str(&mut self, key: &str, v: &str) -> &mut Self {
        self.string(key).u32(8).string(v)
    }
    pub fn tensor_info(
        &mut self,
        name: &str,
        dims: &[u64],
        ggml_type: u32,
        offset: u64,
    ) -> &mut Self {
        self.string(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ggml_type).u64(offset)
    }
    pub fn pad_to(&mut self, align: usize) -> &mut Self {
        while self.0.len() % align != 0 {
            self.0.push(0);
        }
        self
    }
}

/// A tensor for `write_gguf`: name, ggml dims (row length first), ggml type, bytes.
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub data: Vec<u8>,
}

/// A valid GGUF v3 file with alignment 32 from metadata (already encoded kv entries) and tensors.
pub fn write_gguf(n_kv: u64, kv_bytes: &[u8], tensors: &[TensorSpec]) -> Vec<u8> {
    let mut b = Bytes::header(3, tensors.len() as u64, n_kv);
    b.raw(kv_bytes);
    let mut offset = 0u64;
    let mut offsets = vec![];
    for t in tensors {
        offsets.push(offset);
        offset += (t.data.len() as u64).div_ceil(32) * 32;
    }
    for (t, &o) in tensors.iter().zip(&offsets) {
        b.tensor_info(&t.name, &t.dims, t.ggml_type, o);
    }
    b.pad_to(32);
    for t in tensors {
        b.raw(&t.data).pad_to(32);
    }
    b.0
}

// ---- allocation tracking ----

pub struct TrackingAllocator;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|m| {
        if size > m.get() {
            m.set(size)
        }
    });
}

unsafe impl GlobalAlloc for TrackingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Runs `f` and returns its result with the largest single allocation it made on this thread.
pub fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|m| m.set(0));
    let out = f();
    (out, LARGEST.with(|m| m.get()))
}
