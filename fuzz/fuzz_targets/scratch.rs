//! A per-process scratch file: the loaders under test open paths (they memory-map files and
//! resolve shard names), so each input is written to disk first.

use std::path::PathBuf;

pub fn dir() -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("anyllama-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Writes `data` to `name` in the scratch folder and returns its path.
pub fn write(name: &str, data: &[u8]) -> PathBuf {
    let path = dir().join(name);
    std::fs::write(&path, data).expect("write scratch file");
    path
}
