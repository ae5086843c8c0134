//! config.json and generation_config.json text.
#![no_main]

#[path = "cap.rs"]
mod cap;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = anyllama::config::ModelConfig::from_hf_json(text) {
        // What the loader does next with a config: sizes of the cache and scratch.
        let _ = anyllama::loader::runtime_bytes(&cfg, 4096, anyllama::dtype::DType::F16, 512);
        let _ = anyllama::rope::rope_freqs(&cfg, cfg.max_seq_len.min(1 << 16));
    }
    let _ = anyllama::generation_config::GenerationConfig::from_json(text);
});
