//! Fine-tuning datasets (src/train/data.rs) on SmolLM2's real tokenizer and ChatML template
//! (tests/fixtures/tokenizer/smollm2) and the JSONL files in tests/fixtures/train_data: each
//! format's tokens and loss mask (checked by decoding the labelled tokens against the rendered
//! text), LossOn::All, truncation and dropping, every bad line's `file:line` error, skipping,
//! the epochs' batching (packed or not: the same samples, deterministic per seed and epoch)
//! and the token cache (hit, stale, damaged).

mod common;

use anyllama::tokenizer::{Message, Tokenizer};
use anyllama::train::data::{CacheStatus, DataOptions, Dataset, LossOn, Sample, IGNORE};
use anyllama::train::step::MicroBatch;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn data_dir() -> PathBuf {
    common::fixtures().join("train_data")
}

fn data(name: &str) -> PathBuf {
    data_dir().join(name)
}

fn smollm2() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        Tokenizer::from_hf_dir(&common::fixtures().join("tokenizer/smollm2")).expect("smollm2")
    })
}

/// SmolLM2's tokenizer with another chat template from tests/fixtures/train_data.
fn smollm2_with_template(jinja: &str) -> Tokenizer {
    let dir = common::fixtures().join("tokenizer/smollm2");
    Tokenizer::from_hf_files(
        &dir.join("tokenizer.json"),
        Some(&dir.join("tokenizer_config.json")),
        Some(&data(jinja)),
    )
    .expect("smollm2 with a test template")
}

fn opts(seq: usize, loss_on: LossOn, skip_bad_lines: bool) -> DataOptions {
    DataOptions {
        seq,
        loss_on,
        skip_bad_lines,
    }
}

fn load(name: &str, o: &DataOptions) -> Dataset {
    Dataset::load(&data(name), smollm2(), o).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A fresh, empty folder for one test's files.
fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("train_data")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn decode(ids: &[u32]) -> String {
    smollm2().decode(ids, false).unwrap()
}

/// The labelled targets of `s` as runs of consecutive target tokens, each decoded.
fn labelled_runs(s: &Sample) -> Vec<String> {
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut last_row = None;
    for (row, &label) in s.labels.iter().enumerate() {
        if label < 0 {
            continue;
        }
        assert_eq!(
            label as u32,
            s.tokens[row + 1],
            "row {row} must predict the next token"
        );
        match runs.last_mut() {
            Some(run) if last_row == Some(row - 1) => run.push(label as u32),
            _ => runs.push(vec![label as u32]),
        }
        last_row = Some(row);
    }
    runs.iter().map(|r| decode(r)).collect()
}

fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
    pairs.iter().map(|(r, c)| Message::new(*r, *c)).collect()
}

const EOS: &str = "<|im_end|>";

#[test]
fn each_format_is_masked_as_documented() {
    let ds = load("formats.jsonl", &opts(512, LossOn::Answers, false));
    let r = ds.report();
    assert_eq!(
        (r.text, r.chat, r.prompt_completion, r.alpaca),
        (1, 2, 1, 2),
        "{r}"
    );
    assert_eq!((r.samples, r.truncated, r.dropped, r.skipped), (6, 0, 0, 0));
    let s = ds.samples();
    assert_eq!(r.tokens, s.iter().map(|s| s.tokens.len()).sum::<usize>());
    assert_eq!(r.labelled, s.iter().map(|s| s.labelled()).sum::<usize>());
    for sample in s {
        assert_eq!(sample.labels.len(), sample.tokens.len());
        assert_eq!(
            *sample.labels.last().unwrap(),
            IGNORE,
            "the last row predicts nothing"
        );
    }

    // Text: every token after the first is a target, EOS included.
    let text = "The quick brown fox jumps over the lazy dog.";
    assert_eq!(decode(&s[0].tokens), format!("{text}{EOS}"));
    assert_eq!(labelled_runs(&s[0]), [decode(&s[0].tokens[1..])]);

    // Chat: the whole conversation is the template's rendering; the loss covers exactly each
    // assistant content and the end-of-turn the template writes after it.
    let conversation = msgs(&[
        ("system", "You are terse."),
        ("user", "What is 2+2?"),
        ("assistant", "4."),
        ("user", "And 3+3?"),
        ("assistant", "6, of course."),
    ]);
    let rendered = smollm2().apply_chat_template(&conversation, false).unwrap();
    assert_eq!(decode(&s[1].tokens), rendered);
    assert_eq!(
        labelled_runs(&s[1]),
        ["4.<|im_end|>\n", "6, of course.<|im_end|>\n"]
    );
    // A conversation ending with a user turn: the trailing turn has no loss, and the template's
    // default system prompt is rendered (and not learned).
    let last = &s[5];
    assert!(decode(&last.tokens).starts_with("<|im_start|>system\nYou are a helpful AI"));
    assert!(decode(&last.tokens).ends_with("<|im_start|>user\nNothing, thanks.<|im_end|>\n"));
    assert_eq!(labelled_runs(last), ["Hello! How can I help?<|im_end|>\n"]);

    // Prompt + completion: plain concatenation, loss on the completion and EOS.
    assert_eq!(
        decode(&s[2].tokens),
        format!("The capital of France is Paris.{EOS}")
    );
    assert_eq!(labelled_runs(&s[2]), [format!(" Paris.{EOS}")]);
    let prompt_len = smollm2()
        .encode("The capital of France is", false)
        .unwrap()
        .len();
    assert_eq!(
        s[2].labels.iter().position(|&l| l >= 0),
        Some(prompt_len - 1)
    );

    // Alpaca: the Stanford template, without and with an input.
    let no_input = "Below is an instruction that describes a task. Write a response that \
                    appropriately completes the request.\n\n### Instruction:\nName a primary \
                    colour.\n\n### Response:\n";
    assert_eq!(decode(&s[3].tokens), format!("{no_input}Red.{EOS}"));
    assert_eq!(labelled_runs(&s[3]), [format!("Red.{EOS}")]);
    let with_input = "Below is an instruction that describes a task, paired with an input that \
                      provides further context. Write a response that appropriately completes \
                      the request.\n\n### Instruction:\nTranslate to French.\n\n### Input:\n\
                      Good morning\n\n### Response:\n";
    assert_eq!(decode(&s[4].tokens), format!("{with_input}Bonjour{EOS}"));
    assert_eq!(labelled_runs(&s[4]), [format!("Bonjour{EOS}")]);
}

#[test]
fn bos_is_added_as_the_tokenizer_adds_it() {
    // The SentencePiece Llama fixture adds <s>; SmolLM2 adds nothing.
    let sp = Tokenizer::from_hf_dir(&common::fixtures().join("tokenizer/sp_llama")).unwrap();
    let bos = sp.bos_id().unwrap();
    let eos = sp.eos_ids()[0];
    let ds = Dataset::load(
        &data("formats.jsonl"),
        &sp,
        &opts(512, LossOn::Answers, false),
    )
    .unwrap();
    let text = &ds.samples()[0];
    let body = sp
        .encode("The quick brown fox jumps over the lazy dog.", false)
        .unwrap();
    assert_eq!(text.tokens, [vec![bos], body, vec![eos]].concat());
    let pc = &ds.samples()[2];
    assert_eq!(pc.tokens[0], bos);
    assert_eq!(*pc.tokens.last().unwrap(), eos);
    assert_eq!(
        pc.labels[pc.labels.len() - 2],
        eos as i32,
        "EOS carries loss"
    );
    let prompt = sp.encode("The capital of France is", false).unwrap();
    assert_eq!(
        pc.labels[..prompt.len()]
            .iter()
            .filter(|&&l| l >= 0)
            .count(),
        0,
        "no loss on the prompt's tokens"
    );
    assert_eq!(ds.samples()[0].tokens[0], bos);
    let smol = load("formats.jsonl", &opts(512, LossOn::Answers, false));
    assert_eq!(
        smol.samples()[0].tokens[0],
        smollm2().encode("The", false).unwrap()[0]
    );
}

#[test]
fn loss_on_all_labels_every_row() {
    let answers = load("formats.jsonl", &opts(512, LossOn::Answers, false));
    let all = load("formats.jsonl", &opts(512, LossOn::All, false));
    assert_eq!(all.samples().len(), 6);
    for (a, s) in answers.samples().iter().zip(all.samples()) {
        assert_eq!(a.tokens, s.tokens, "the tokens do not depend on the loss");
        let n = s.tokens.len();
        let expected: Vec<i32> = (0..n)
            .map(|i| s.tokens.get(i + 1).map_or(IGNORE, |&t| t as i32))
            .collect();
        assert_eq!(s.labels, expected);
    }
    let r = all.report();
    assert_eq!(r.labelled, r.tokens - r.samples);
    assert!(answers.report().labelled < r.labelled);
}

#[test]
fn long_samples_are_truncated_and_unlabelled_ones_dropped() {
    let seq = 32;
    let full = load("lengths.jsonl", &opts(4096, LossOn::Answers, false));
    let cut = load("lengths.jsonl", &opts(seq, LossOn::Answers, false));
    let lens: Vec<usize> = full.samples().iter().map(|s| s.tokens.len()).collect();
    // Untruncated: the user-only chat is dropped already; the long chat and prompt survive.
    assert_eq!(full.report().dropped, 1, "{}", full.report());
    assert_eq!(lens.len(), 5);
    assert!(lens[1] > seq && lens[2] > seq && lens[3] > seq, "{lens:?}");
    assert!(lens[0] <= seq && lens[4] <= seq, "{lens:?}");

    // Cut to 32: the long text keeps its start; the chat whose answer starts past the limit and
    // the prompt longer than it have nothing left to learn.
    let r = cut.report();
    assert_eq!((r.samples, r.truncated, r.dropped), (3, 3, 3), "{r}");
    let kept = cut.samples();
    assert_eq!(kept[0], full.samples()[0]);
    assert_eq!(kept[1].tokens, full.samples()[1].tokens[..seq]);
    assert_eq!(
        kept[1].labels[..seq - 1],
        full.samples()[1].labels[..seq - 1]
    );
    assert_eq!(kept[1].labels[seq - 1], IGNORE);
    assert_eq!(kept[2], full.samples()[4]);
    assert_eq!(
        r.to_string(),
        format!(
            "data: {}: 3 samples (chat 2, prompt/completion 2, alpaca 0, text 2), {} tokens, \
             {} labelled ({:.1}%)\n\
             data: warning: 3 samples longer than 32 tokens were truncated (their start is kept)\n\
             data: 3 samples dropped: no labelled token left after masking and truncation",
            data("lengths.jsonl").display(),
            r.tokens,
            r.labelled,
            100.0 * r.labelled as f64 / r.tokens as f64
        )
    );
}

/// (line, why) of every bad line in bad_lines.jsonl.
const BAD_LINES: &[(usize, &str)] = &[
    (2, "not valid JSON: expected ident at column 2"),
    (3, "not a JSON object (found an array)"),
    (4, "\"text\" is not a string (found a number)"),
    (5, "has \"prompt\" but no \"completion\""),
    (6, "\"messages\" is empty"),
    (
        7,
        "messages[0] has the unknown role \"bot\" (known: system, user, assistant, tool)",
    ),
    (8, "messages[0] has no \"content\""),
    (9, "messages[0].content is not a string (found an array)"),
    (10, "\"messages\" is not an array (found a string)"),
    (
        11,
        "no known format: expected \"messages\", \"prompt\" + \"completion\", \"instruction\" + \
         \"output\" or \"text\" (found keys \"foo\", \"bar\")",
    ),
    (12, "\"output\" is not a string (found a number)"),
    (
        13,
        "messages[0] is an assistant turn: there is no prompt before it to find where it starts",
    ),
    (14, "has \"output\" but no \"instruction\""),
    (15, "not valid JSON: trailing characters at column 16"),
    (17, "messages[1] is not an object (found a number)"),
    (
        18,
        "no known format: expected \"messages\", \"prompt\" + \"completion\", \"instruction\" + \
         \"output\" or \"text\" (found an empty object)",
    ),
];

#[test]
fn every_bad_line_is_an_error_naming_its_line() {
    let source = std::fs::read_to_string(data("bad_lines.jsonl")).unwrap();
    let lines: Vec<&str> = source.lines().collect();
    let dir = scratch("bad_lines");
    let o = opts(512, LossOn::Answers, false);
    for &(line, why) in BAD_LINES {
        // The fixture with every other bad line blanked: line numbers stay, blank lines are
        // skipped silently, so this line is the first error.
        let text: String = lines
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let bad_elsewhere = BAD_LINES.iter().any(|&(n, _)| n == i + 1 && n != line);
                format!("{}\n", if bad_elsewhere { "" } else { l })
            })
            .collect();
        let path = dir.join(format!("line{line}.jsonl"));
        std::fs::write(&path, text).unwrap();
        let err = Dataset::load(&path, smollm2(), &o).unwrap_err();
        assert_eq!(err.to_string(), format!("{}:{line}: {why}", path.display()));
    }
    // The whole file fails on its first bad line.
    let err = Dataset::load(&data("bad_lines.jsonl"), smollm2(), &o).unwrap_err();
    let (line, why) = BAD_LINES[0];
    let name = data("bad_lines.jsonl").display().to_string();
    assert_eq!(err.to_string(), format!("{name}:{line}: {why}"));
}

#[test]
fn skip_bad_lines_counts_them_and_keeps_the_first_reasons() {
    let ds = load("bad_lines.jsonl", &opts(512, LossOn::Answers, true));
    let r = ds.report();
    assert_eq!((r.samples, r.skipped), (2, BAD_LINES.len()), "{r}");
    let first: Vec<(usize, String)> = BAD_LINES[..5]
        .iter()
        .map(|&(n, w)| (n, w.to_string()))
        .collect();
    assert_eq!(r.skip_reasons, first);
    let shown = r.to_string();
    let name = data("bad_lines.jsonl").display().to_string();
    assert!(shown.contains(&format!("\ndata: {} bad lines skipped\n", BAD_LINES.len())));
    assert!(shown.contains(&format!("\ndata:   {name}:2: not valid JSON")));
    assert!(shown.ends_with("\ndata:   ..."), "{shown}");
}

#[test]
fn odd_bytes_and_empty_files() {
    let dir = scratch("odd_bytes");
    let o = opts(512, LossOn::Answers, false);
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    // CRLF line ends and a UTF-8 byte order mark are accepted.
    let crlf = write(
        "crlf.jsonl",
        b"\xef\xbb\xbf{\"text\": \"a\"}\r\n\r\n{\"text\": \"b\"}\r\n",
    );
    let ds = Dataset::load(&crlf, smollm2(), &o).unwrap();
    assert_eq!(decode(&ds.samples()[1].tokens), format!("b{EOS}"));
    let latin1 = write(
        "latin1.jsonl",
        b"{\"text\": \"a\"}\n{\"text\": \"caf\xe9\"}\n",
    );
    let err = Dataset::load(&latin1, smollm2(), &o).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}:2: not UTF-8 text (bad byte at column 14)",
            latin1.display()
        )
    );
    // Nothing usable: blank lines only, or only samples without a labelled token.
    let blank = write("blank.jsonl", b"\n  \n");
    let err = Dataset::load(&blank, smollm2(), &o).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: no usable training sample (0 bad lines skipped, 0 samples without a labelled \
             token)",
            blank.display()
        )
    );
    let unlabelled = write(
        "unlabelled.jsonl",
        b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\nnot json\n",
    );
    let err = Dataset::load(&unlabelled, smollm2(), &opts(512, LossOn::Answers, true))
        .unwrap_err()
        .to_string();
    assert!(err.ends_with("(1 bad lines skipped, 1 samples without a labelled token)"));
    let missing = dir.join("missing.jsonl");
    let err = Dataset::load(&missing, smollm2(), &o)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with(&format!("{}: cannot read: ", missing.display())));
    let err = Dataset::load(&crlf, smollm2(), &opts(1, LossOn::All, false)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "a training sequence needs at least 2 tokens (seq is 1)"
    );
}

#[test]
fn templates_that_raise_or_are_not_prefix_stable_name_the_line() {
    let file = data("template_cases.jsonl");
    let name = file.display().to_string();
    let answers = opts(512, LossOn::Answers, false);

    let raising = smollm2_with_template("tool_raises.jinja");
    let err = Dataset::load(&file, &raising, &answers).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{name}:2: chat template: tool turns are not supported")
    );

    let unstable = smollm2_with_template("unstable.jinja");
    let err = Dataset::load(&file, &unstable, &answers).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{name}:3: the chat template is not prefix-stable: the conversation up to \
             messages[1] does not render as the start of the whole conversation, so its \
             assistant turns cannot be located (loss on all tokens does not need them)"
        )
    );
    // Single-answer conversations are fine with it, and loss on all tokens needs no prefixes.
    let ds = Dataset::load(&file, &unstable, &opts(512, LossOn::Answers, true)).unwrap();
    assert_eq!((ds.report().samples, ds.report().skipped), (2, 1));
    assert_eq!(labelled_runs(&ds.samples()[0]), ["Hello.<|im_end|>\n"]);
    let ds = Dataset::load(&file, &unstable, &opts(512, LossOn::All, false)).unwrap();
    assert_eq!(ds.report().samples, 3);
    assert_eq!(
        decode(&ds.samples()[2].tokens),
        "<|im_start|>user\nOne<|im_end|>\n<|im_start|>assistant\n...<|im_end|>\n\
         <|im_start|>user\nTwo<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
    );
}

/// The (tokens, labels) of every sequence of `mbs`, sorted.
fn sequences(mbs: &[MicroBatch]) -> Vec<(Vec<u32>, Vec<i32>)> {
    let mut out = Vec::new();
    for mb in mbs {
        assert_eq!(mb.tokens.len(), mb.labels.len());
        assert_eq!(mb.lens.iter().sum::<usize>(), mb.tokens.len());
        let mut at = 0;
        for &n in &mb.lens {
            assert!(n > 0);
            out.push((
                mb.tokens[at..at + n].to_vec(),
                mb.labels[at..at + n].to_vec(),
            ));
            at += n;
        }
    }
    out.sort();
    out
}

#[test]
fn packed_and_unpacked_epochs_hold_every_sample_once() {
    let seq = 48;
    let batch = 4;
    let ds = load("many.jsonl", &opts(seq, LossOn::Answers, false));
    assert_eq!(ds.samples().len(), 40);
    let mut all: Vec<(Vec<u32>, Vec<i32>)> = ds
        .samples()
        .iter()
        .map(|s| (s.tokens.clone(), s.labels.clone()))
        .collect();
    all.sort();
    let cap = batch * seq;
    for epoch in 0..3 {
        let packed = ds.epoch(epoch, 7, batch, true);
        let grouped = ds.epoch(epoch, 7, batch, false);
        assert_eq!(sequences(&packed), all, "packed, epoch {epoch}");
        assert_eq!(sequences(&grouped), all, "not packed, epoch {epoch}");
        for mb in packed.iter().chain(&grouped) {
            assert!(mb.tokens.len() <= cap && mb.labelled() > 0);
        }
        // Greedy packing: each micro-batch was closed because the next sample did not fit.
        for pair in packed.windows(2) {
            assert!(pair[0].tokens.len() + pair[1].lens[0] > cap);
        }
        assert!(packed.len() < grouped.len());
        // Not packed: `batch` samples each (one short remainder at most), of similar lengths:
        // the 40 samples fit one sorting window, so the micro-batches are consecutive runs of
        // the samples sorted by length.
        assert_eq!(grouped.len(), 10);
        assert!(grouped.iter().all(|mb| mb.lens.len() == batch));
        let mut ranges: Vec<(usize, usize)> = grouped
            .iter()
            .map(|mb| {
                (
                    *mb.lens.iter().min().unwrap(),
                    *mb.lens.iter().max().unwrap(),
                )
            })
            .collect();
        ranges.sort();
        for pair in ranges.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "{ranges:?}");
        }
    }
}

#[test]
fn epochs_are_a_function_of_seed_and_epoch() {
    let o = opts(48, LossOn::Answers, false);
    let ds = load("many.jsonl", &o);
    let again = load("many.jsonl", &o);
    for packing in [true, false] {
        let e0 = ds.epoch(0, 7, 4, packing);
        assert_eq!(
            e0,
            again.epoch(0, 7, 4, packing),
            "same (seed, epoch), same batches"
        );
        assert_ne!(
            e0,
            ds.epoch(1, 7, 4, packing),
            "another epoch, another order"
        );
        assert_ne!(
            e0,
            ds.epoch(0, 8, 4, packing),
            "another seed, another order"
        );
    }
    // The order itself is pinned: a resumed run from another build must recompute it.
    let order: Vec<usize> = ds
        .epoch(0, 1, 1, false)
        .iter()
        .map(|mb| {
            ds.samples()
                .iter()
                .position(|s| s.tokens == mb.tokens)
                .unwrap()
        })
        .collect();
    assert_eq!(order, PINNED_ORDER);
}

/// The sample order of epoch 0 with seed 1, one sample per micro-batch.
const PINNED_ORDER: &[usize] = &[
    1, 34, 5, 2, 0, 18, 39, 17, 32, 6, 22, 14, 28, 4, 36, 11, 9, 21, 31, 3, 8, 16, 7, 29, 19, 33,
    38, 23, 10, 20, 12, 35, 30, 15, 37, 26, 24, 13, 27, 25,
];

fn built(status: &CacheStatus) -> (&Path, Option<&str>, Option<&str>) {
    match status {
        CacheStatus::Built {
            path,
            rebuilt_because,
            write_error,
        } => (path, rebuilt_because.as_deref(), write_error.as_deref()),
        CacheStatus::Hit(p) => panic!("expected a rebuild, got a hit on {}", p.display()),
    }
}

#[test]
fn the_token_cache_is_used_only_when_it_matches() {
    let dir = scratch("cache");
    let cache = dir.join("cache");
    let file = dir.join("data.jsonl");
    std::fs::copy(data("formats.jsonl"), &file).unwrap();
    let o = opts(512, LossOn::Answers, false);
    let fresh = Dataset::load(&file, smollm2(), &o).unwrap();
    let load = |o: &DataOptions| Dataset::load_cached(&file, smollm2(), o, &cache).unwrap();

    // First run: built and written; second: read back, equal.
    let (ds, status) = load(&o);
    let (path, why, write_error) = built(&status);
    assert_eq!((why, write_error), (None, None));
    let path = path.to_path_buf();
    assert!(path.is_file());
    assert_eq!(ds.samples(), fresh.samples());
    let (hit, status) = load(&o);
    assert_eq!(status, CacheStatus::Hit(path.clone()));
    assert_eq!(hit.samples(), fresh.samples());
    assert_eq!(hit.report(), fresh.report());
    assert_eq!(
        status.to_string(),
        format!("data: tokens read from {}", path.display())
    );

    // Options that shape the tokens are part of the key.
    for other in [
        opts(16, LossOn::Answers, false),
        opts(512, LossOn::All, false),
        opts(512, LossOn::Answers, true),
    ] {
        let (_, status) = load(&other);
        assert_ne!(built(&status).0, path);
    }

    // A damaged file (one byte changed, or cut short) is rebuilt with a note.
    let good = std::fs::read(&path).unwrap();
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x10;
    let damages: [(&[u8], &str); 3] = [
        (&flipped, "its checksum does not match (damaged file)"),
        (
            &good[..good.len() - 3],
            "its checksum does not match (damaged file)",
        ),
        (b"{\"not\": \"a cache\"}", "it is not a token cache"),
    ];
    for (bytes, expected) in damages {
        std::fs::write(&path, bytes).unwrap();
        let (ds, status) = load(&o);
        assert_eq!(built(&status), (path.as_path(), Some(expected), None));
        assert!(status.to_string().starts_with(&format!(
            "data: note: the token cache was unusable ({expected}); rebuilt\n"
        )));
        assert_eq!(ds.samples(), fresh.samples());
        assert_eq!(
            std::fs::read(&path).unwrap(),
            good,
            "the rebuild rewrote it"
        );
    }

    // Changed data: another key, so a new file; a valid cache of the old data put under the
    // new name is refused by the key inside it.
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("{\"text\": \"One more line.\"}\n");
    std::fs::write(&file, text).unwrap();
    let (ds, status) = load(&o);
    let new_path = built(&status).0.to_path_buf();
    assert_ne!(new_path, path);
    assert_eq!(ds.samples().len(), fresh.samples().len() + 1);
    std::fs::copy(&path, &new_path).unwrap();
    let (ds, status) = load(&o);
    assert_eq!(
        built(&status).1,
        Some("it belongs to other data, tokenizer or options")
    );
    assert_eq!(ds.samples().len(), fresh.samples().len() + 1);

    // A cache that cannot be written is not an error.
    let blocked = dir.join("blocked");
    std::fs::write(&blocked, b"a file where the cache folder should be").unwrap();
    let (ds, status) = Dataset::load_cached(&file, smollm2(), &o, &blocked).unwrap();
    assert_eq!(built(&status).1, None);
    assert!(built(&status).2.is_some());
    assert!(status
        .to_string()
        .starts_with("data: warning: cannot write the token cache"));
    assert_eq!(ds.samples().len(), fresh.samples().len() + 1);
}
