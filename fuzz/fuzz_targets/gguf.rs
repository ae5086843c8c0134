//! A GGUF file from arbitrary bytes: header, metadata, tensor infos, the model config derived
//! from them, the memory plan, and every tensor handed out (with Q/K rows un-permuted).
#![no_main]

#[path = "cap.rs"]
mod cap;

#[path = "scratch.rs"]
mod scratch;

use anyllama::weights::gguf::GgufFile;
use anyllama::weights::TensorSource;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = scratch::write("model.gguf", data);
    let Ok(g) = GgufFile::open(&path) else {
        return;
    };
    let _ = g.model_config();
    for name in g.names().iter().take(64) {
        let _ = g.get(name);
    }
    // The whole open path: config, tokenizer, vocabulary check, weight shapes, memory.
    if let Ok(files) = anyllama::loader::ModelFiles::open(&path) {
        let _ = files.memory_plan(64, anyllama::dtype::DType::F16, 8);
        let _ = files.describe();
    }
});
