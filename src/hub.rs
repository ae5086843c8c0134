//! Resolving a model argument to a folder: a path as given, or an `org/name` repository id looked
//! up offline in the Hugging Face cache (the layout `huggingface_hub` downloads into). Nothing here
//! touches the network.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// A path that exists is returned as is; otherwise `org/name` is found in the HF cache, in the
/// snapshot that `refs/main` names (or the only snapshot when there is no ref).
pub fn resolve_model_path(arg: &str) -> Result<PathBuf> {
    resolve_in(arg, &hf_cache_dirs())
}

/// The hub cache folders to search, in `huggingface_hub`'s order of precedence: HF_HUB_CACHE,
/// then HF_HOME/hub, then $XDG_CACHE_HOME/huggingface/hub, then ~/.cache/huggingface/hub.
pub fn hf_cache_dirs() -> Vec<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let mut dirs = Vec::new();
    dirs.extend(var("HF_HUB_CACHE"));
    dirs.extend(var("HF_HOME").map(|h| h.join("hub")));
    dirs.extend(var("XDG_CACHE_HOME").map(|x| x.join("huggingface").join("hub")));
    dirs.extend(var("HOME").map(|h| h.join(".cache").join("huggingface").join("hub")));
    dirs.dedup();
    dirs
}

/// `resolve_model_path` over an explicit list of cache folders.
pub fn resolve_in(arg: &str, cache_dirs: &[PathBuf]) -> Result<PathBuf> {
    let as_path = Path::new(arg);
    if as_path.exists() {
        return Ok(as_path.to_path_buf());
    }
    let Some((org, name)) = repo_id(arg) else {
        return Err(Error::load(
            arg,
            "neither an existing path nor a Hugging Face repo id (org/name)",
        ));
    };
    let folder = format!("models--{org}--{name}");
    let mut looked = Vec::new();
    for cache in cache_dirs {
        let repo = cache.join(&folder);
        looked.push(repo.display().to_string());
        if repo.is_dir() {
            return snapshot(&repo);
        }
    }
    let list = if looked.is_empty() {
        "(no cache folder known)".to_string()
    } else {
        looked.join(", ")
    };
    Err(Error::load(
        arg,
        format!(
            "not a path and not in the Hugging Face cache (looked in: {list}); download it \
             first (e.g. `hf download {arg}`) or pass a local folder"
        ),
    ))
}

/// Splits `org/name`, accepting only characters the Hub allows so nothing escapes the cache.
fn repo_id(arg: &str) -> Option<(&str, &str)> {
    let (org, name) = arg.split_once('/')?;
    let ok = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    (ok(org) && ok(name)).then_some((org, name))
}

/// The snapshot folder of a cached repo: `snapshots/<content of refs/main>`, else the only one.
fn snapshot(repo: &Path) -> Result<PathBuf> {
    let snapshots = repo.join("snapshots");
    let ref_file = repo.join("refs").join("main");
    if ref_file.is_file() {
        let rev = std::fs::read_to_string(&ref_file)
            .map_err(|e| Error::load(&ref_file, e.to_string()))?;
        let rev = rev.trim();
        let plain = !rev.is_empty() && rev.chars().all(|c| c.is_ascii_alphanumeric());
        if !plain {
            return Err(Error::load(
                &ref_file,
                format!("`{rev}` is not a revision hash"),
            ));
        }
        let dir = snapshots.join(rev);
        if !dir.is_dir() {
            return Err(Error::load(
                &ref_file,
                format!("names snapshot {rev}, but {} is missing", dir.display()),
            ));
        }
        return Ok(dir);
    }
    let entries =
        std::fs::read_dir(&snapshots).map_err(|e| Error::load(&snapshots, e.to_string()))?;
    let mut dirs = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| Error::load(&snapshots, e.to_string()))?
            .path();
        if path.is_dir() {
            dirs.push(path);
        }
    }
    match dirs.len() {
        1 => Ok(dirs.remove(0)),
        0 => Err(Error::load(&snapshots, "no snapshot downloaded")),
        n => Err(Error::load(
            &snapshots,
            format!(
                "{n} snapshots and no refs/main to choose one; pass the snapshot folder itself"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch folder removed on drop.
    struct Scratch(PathBuf);
    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("anyllama-hub-{tag}-{}", std::process::id()));
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

    fn mkdir(p: &Path) {
        std::fs::create_dir_all(p).unwrap();
    }

    #[test]
    fn existing_path_is_returned_as_is() {
        let s = Scratch::new("path");
        let arg = s.0.to_str().unwrap();
        assert_eq!(resolve_in(arg, &[]).unwrap(), s.0);
    }

    #[test]
    fn follows_refs_main_in_first_cache_that_has_the_repo() {
        let s = Scratch::new("refs");
        let (first, second) = (s.0.join("a"), s.0.join("b"));
        let repo = second.join("models--org--tiny-model.v2");
        mkdir(&repo.join("snapshots/abc123"));
        mkdir(&repo.join("snapshots/def456"));
        mkdir(&repo.join("refs"));
        std::fs::write(repo.join("refs/main"), "def456\n").unwrap();
        mkdir(&first);
        let got = resolve_in("org/tiny-model.v2", &[first, second]).unwrap();
        assert_eq!(got, repo.join("snapshots/def456"));
    }

    #[test]
    fn without_ref_takes_the_only_snapshot() {
        let s = Scratch::new("only");
        let repo = s.0.join("models--org--name");
        mkdir(&repo.join("snapshots/0123abcd"));
        assert_eq!(
            resolve_in("org/name", std::slice::from_ref(&s.0)).unwrap(),
            repo.join("snapshots/0123abcd")
        );
        mkdir(&repo.join("snapshots/4567"));
        let err = resolve_in("org/name", std::slice::from_ref(&s.0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("2 snapshots"), "{err}");
    }

    #[test]
    fn errors_say_where_they_looked() {
        let s = Scratch::new("missing");
        let err = resolve_in("org/absent", std::slice::from_ref(&s.0))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("models--org--absent") && err.contains("looked in"),
            "{err}"
        );
        assert!(resolve_in("not-a-repo-or-path", &[]).is_err());
        assert!(resolve_in("../escape", std::slice::from_ref(&s.0)).is_err());
        // A ref that tries to leave the snapshots folder is refused.
        let repo = s.0.join("models--org--evil");
        mkdir(&repo.join("refs"));
        std::fs::write(repo.join("refs/main"), "../../etc").unwrap();
        let err = resolve_in("org/evil", std::slice::from_ref(&s.0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a revision"), "{err}");
    }
}
