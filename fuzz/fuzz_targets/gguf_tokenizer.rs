//! A tokenizer rebuilt from GGUF metadata (`tokenizer.ggml.*`), then used: encode and decode.
#![no_main]

#[path = "cap.rs"]
mod cap;

#[path = "scratch.rs"]
mod scratch;

use anyllama::weights::gguf::GgufFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = scratch::write("tokenizer.gguf", data);
    let Ok(g) = GgufFile::open(&path) else {
        return;
    };
    let Ok((tok, _special)) = anyllama::tokenizer_gguf::tokenizer_from_gguf(&g) else {
        return;
    };
    let tok = anyllama::tokenizer::Tokenizer::from_parts(tok, Default::default(), None);
    if let Ok(ids) = tok.encode("Hello world! <s> 123 ünï 🙂\n\tend", true) {
        let _ = tok.decode(&ids, false);
        let mut dec = tok.stream_decoder(true);
        for id in ids {
            let _ = dec.push(id);
        }
        let _ = dec.finish();
    }
    let _ = tok.decode(&[0, 1, 2, 3, u32::MAX], true);
});
