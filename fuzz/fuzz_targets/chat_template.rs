//! Chat-template rendering: the input is a template, then (after a NUL byte) message contents
//! separated by NUL bytes, rendered as alternating user / assistant turns.
#![no_main]

#[path = "cap.rs"]
mod cap;

use anyllama::chat_template::{render_chat_template, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.split('\0');
    let template = parts.next().unwrap_or_default();
    let mut messages: Vec<Message> = parts
        .take(16)
        .enumerate()
        .map(|(i, c)| Message::new(if i % 2 == 0 { "user" } else { "assistant" }, c))
        .collect();
    if messages.is_empty() {
        messages.push(Message::new("user", "hi"));
    }
    let specials = [
        ("bos_token".to_string(), "<s>".to_string()),
        ("eos_token".to_string(), "</s>".to_string()),
    ];
    let _ = render_chat_template(template, &messages, true, &specials);
});
