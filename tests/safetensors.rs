//! SafetensorsSource on hand-made checkpoints: single file, sharded with an index, and the ways
//! a file or an index can be wrong. Every bad case must be a Load error naming the problem.

use anyllama::dtype::DType;
use anyllama::weights::safetensors::SafetensorsSource;
use anyllama::weights::TensorSource;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::path::{Path, PathBuf};

/// A scratch folder, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("anyllama-st-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a safetensors file with the given (name, dtype, shape, bytes) tensors.
fn write(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn err_of(path: &Path) -> String {
    match SafetensorsSource::open(path) {
        Ok(_) => panic!("{} opened but should not", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn single_file_round_trip() {
    let s = Scratch::new("single");
    let a = f32_bytes(&[1.0, -2.0, 3.5, 0.25, 8.0, 9.0]);
    let b: Vec<u8> = [half::f16::from_f32(1.5), half::f16::from_f32(-0.5)]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let c: Vec<u8> = [half::bf16::from_f32(3.0)]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    write(
        &s.0.join("model.safetensors"),
        &[
            ("w.a", Dtype::F32, vec![2, 3], a.clone()),
            ("w.b", Dtype::F16, vec![2], b.clone()),
            ("w.c", Dtype::BF16, vec![1], c.clone()),
        ],
    );
    for path in [s.0.clone(), s.0.join("model.safetensors")] {
        let src = SafetensorsSource::open(&path).unwrap();
        assert_eq!(src.names(), vec!["w.a", "w.b", "w.c"]);
        let t = src.get("w.a").unwrap().unwrap();
        assert_eq!(
            (t.dtype, t.shape.clone(), t.data.as_ref()),
            (DType::F32, vec![2, 3], &a[..])
        );
        assert!(
            matches!(t.data, std::borrow::Cow::Borrowed(_)),
            "must borrow the mapping"
        );
        let t = src.get("w.b").unwrap().unwrap();
        assert_eq!(
            (t.dtype, t.shape.clone(), t.data.as_ref()),
            (DType::F16, vec![2], &b[..])
        );
        let t = src.get("w.c").unwrap().unwrap();
        assert_eq!((t.dtype, t.data.as_ref()), (DType::BF16, &c[..]));
        assert!(src.get("absent").unwrap().is_none());
    }
}

fn write_index(dir: &Path, entries: &[(&str, &str)]) {
    let map: serde_json::Map<String, serde_json::Value> = entries
        .iter()
        .map(|(t, f)| (t.to_string(), serde_json::Value::from(*f)))
        .collect();
    let doc = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), doc.to_string()).unwrap();
}

fn two_shards(dir: &Path) {
    write(
        &dir.join("s-1.safetensors"),
        &[("x", Dtype::F32, vec![2], f32_bytes(&[1.0, 2.0]))],
    );
    write(
        &dir.join("s-2.safetensors"),
        &[
            ("y", Dtype::F32, vec![1], f32_bytes(&[3.0])),
            ("z", Dtype::F32, vec![], f32_bytes(&[4.0])),
        ],
    );
}

#[test]
fn sharded_with_index() {
    let s = Scratch::new("sharded");
    two_shards(&s.0);
    write_index(
        &s.0,
        &[
            ("x", "s-1.safetensors"),
            ("y", "s-2.safetensors"),
            ("z", "s-2.safetensors"),
        ],
    );
    let src = SafetensorsSource::open(&s.0).unwrap();
    assert_eq!(src.names(), vec!["x", "y", "z"]);
    assert_eq!(src.files().len(), 2);
    assert_eq!(
        src.get("y").unwrap().unwrap().data.as_ref(),
        &f32_bytes(&[3.0])[..]
    );
    let z = src.get("z").unwrap().unwrap();
    assert_eq!((z.shape.len(), z.numel()), (0, 1));
}

/// (case tag, index entries tensor -> shard, text the error must contain)
type IndexCase<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);

#[test]
fn index_and_shards_must_agree() {
    let cases: &[IndexCase] = &[
        (
            "wrong-shard",
            &[
                ("x", "s-2.safetensors"),
                ("y", "s-2.safetensors"),
                ("z", "s-2.safetensors"),
            ],
            "does not hold it",
        ),
        (
            "misplaced",
            &[
                ("x", "s-1.safetensors"),
                ("y", "s-1.safetensors"),
                ("z", "s-2.safetensors"),
            ],
            "puts in",
        ),
        (
            "unlisted",
            &[("x", "s-1.safetensors"), ("y", "s-2.safetensors")],
            "does not list",
        ),
        (
            "missing",
            &[
                ("x", "s-1.safetensors"),
                ("y", "s-2.safetensors"),
                ("z", "s-2.safetensors"),
                ("q", "s-1.safetensors"),
            ],
            "`q`",
        ),
        ("escape", &[("x", "../s-1.safetensors")], "plain file name"),
        (
            "absent-shard",
            &[("x", "s-9.safetensors")],
            "s-9.safetensors",
        ),
    ];
    for (tag, entries, needle) in cases {
        let s = Scratch::new(tag);
        two_shards(&s.0);
        write_index(&s.0, entries);
        let err = err_of(&s.0);
        assert!(err.contains(needle), "{tag}: {err}");
    }
    // The same tensor in two shards.
    let s = Scratch::new("dup");
    two_shards(&s.0);
    write(
        &s.0.join("s-3.safetensors"),
        &[("x", Dtype::F32, vec![1], f32_bytes(&[5.0]))],
    );
    write_index(
        &s.0,
        &[
            ("x", "s-1.safetensors"),
            ("y", "s-2.safetensors"),
            ("z", "s-2.safetensors"),
            ("w", "s-3.safetensors"),
        ],
    );
    let err = err_of(&s.0);
    assert!(err.contains("`x`"), "{err}");
    std::fs::write(
        s.0.join("model.safetensors.index.json"),
        "{\"weight_map\": 3}",
    )
    .unwrap();
    assert!(err_of(&s.0).contains("weight_map"));
}

#[test]
fn bad_files_are_load_errors() {
    let s = Scratch::new("bad");
    let path = s.0.join("model.safetensors");
    // Unsupported dtype, named with its tensor.
    write(&path, &[("ids", Dtype::I32, vec![2], vec![0; 8])]);
    let err = err_of(&s.0);
    assert!(err.contains("`ids`") && err.contains("I32"), "{err}");

    // Truncated data, header claiming a huge length, garbage, empty file.
    write(&path, &[("w", Dtype::F32, vec![4], f32_bytes(&[1.0; 4]))]);
    let good = std::fs::read(&path).unwrap();
    std::fs::write(&path, &good[..good.len() - 3]).unwrap();
    assert!(err_of(&s.0).contains("model.safetensors"));
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &huge).unwrap();
    err_of(&s.0);
    std::fs::write(&path, b"not a safetensors file at all").unwrap();
    err_of(&s.0);
    std::fs::write(&path, b"").unwrap();
    err_of(&s.0);

    // Offsets in the header that disagree with the shape.
    let header = br#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0; 16]);
    std::fs::write(&path, &bytes).unwrap();
    err_of(&s.0);

    // A folder with neither file.
    std::fs::remove_file(&path).unwrap();
    assert!(err_of(&s.0).contains("model.safetensors.index.json"));
}
