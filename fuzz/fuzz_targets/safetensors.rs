//! safetensors from arbitrary bytes. The first byte picks what the rest is: a single
//! `.safetensors` file, or a sharded index (`model.safetensors.index.json`) next to two small
//! valid shards, so that the index's names, links and coverage rules are what gets exercised.
#![no_main]

#[path = "cap.rs"]
mod cap;

#[path = "scratch.rs"]
mod scratch;

use anyllama::weights::safetensors::SafetensorsSource;
use anyllama::weights::TensorSource;
use libfuzzer_sys::fuzz_target;

/// A valid one-tensor safetensors file: `name` is F32 [2] = [1.0, 2.0].
fn shard(name: &str) -> Vec<u8> {
    let header = format!(r#"{{"{name}":{{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}}}"#);
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&1f32.to_le_bytes());
    out.extend_from_slice(&2f32.to_le_bytes());
    out
}

fn read_all(src: &SafetensorsSource) {
    for name in src.names().iter().take(64) {
        let _ = src.get(name);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let path = scratch::write("single.safetensors", rest);
        if let Ok(src) = SafetensorsSource::open(&path) {
            read_all(&src);
        }
    } else {
        let dir = scratch::dir().join("sharded");
        std::fs::create_dir_all(&dir).expect("scratch dir");
        std::fs::write(dir.join("a.safetensors"), shard("x")).expect("shard");
        std::fs::write(dir.join("b.safetensors"), shard("y")).expect("shard");
        std::fs::write(dir.join("model.safetensors.index.json"), rest).expect("index");
        if let Ok(src) = SafetensorsSource::open(&dir) {
            read_all(&src);
        }
    }
});
