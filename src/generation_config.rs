//! GenerationConfig: the sampling defaults a model folder ships in `generation_config.json`.
//! Every field is optional; a caller layers its own settings over whatever is present here.

use crate::config::Json;
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerationConfig {
    /// Tokens that end generation (`eos_token_id`: one id or a list). Empty when unset.
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub max_new_tokens: Option<usize>,
    /// Prompt plus generated tokens, an older way of bounding generation.
    pub max_length: Option<usize>,
}

impl GenerationConfig {
    /// Reads `generation_config.json` from an HF model folder; Ok(None) when the folder has none.
    pub fn from_hf_dir(dir: &Path) -> Result<Option<GenerationConfig>> {
        let path = dir.join("generation_config.json");
        let text = match crate::weights::read_text_file(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::load(&path, e.to_string())),
        };
        Self::from_json(&text).map(Some).map_err(|e| match e {
            Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses the text of a `generation_config.json`.
    pub fn from_json(text: &str) -> Result<GenerationConfig> {
        let root: Value = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("generation_config.json is not valid JSON: {e}")))?;
        let obj = root.as_object().ok_or_else(|| {
            Error::Config("generation_config.json must hold a JSON object".into())
        })?;
        let j = Json(obj);
        let g = GenerationConfig {
            eos_token_ids: j.token_ids("eos_token_id")?,
            bos_token_id: j.token_id("bos_token_id")?,
            pad_token_id: j.token_id("pad_token_id")?,
            do_sample: j.bool("do_sample")?,
            temperature: j.f64("temperature")?,
            top_k: j.usize("top_k")?,
            top_p: j.f64("top_p")?,
            min_p: j.f64("min_p")?,
            repetition_penalty: j.f64("repetition_penalty")?,
            max_new_tokens: j.usize("max_new_tokens")?,
            max_length: j.usize("max_length")?,
        };
        // Values no sampler can use are rejected here, where the file can still be named.
        let check = |key: &str, v: Option<f64>, ok: fn(f64) -> bool, what: &str| match v {
            Some(x) if !(x.is_finite() && ok(x)) => {
                Err(Error::Config(format!("`{key}` ({x}) must be {what}")))
            }
            _ => Ok(()),
        };
        check("temperature", g.temperature, |x| x >= 0.0, ">= 0")?;
        check("top_p", g.top_p, |x| x > 0.0 && x <= 1.0, "in (0, 1]")?;
        check("min_p", g.min_p, |x| (0.0..=1.0).contains(&x), "in [0, 1]")?;
        check(
            "repetition_penalty",
            g.repetition_penalty,
            |x| x > 0.0,
            "> 0",
        )?;
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_field() {
        let g = GenerationConfig::from_json(
            r#"{"bos_token_id": 1, "eos_token_id": [2, 7], "pad_token_id": null, "do_sample": true,
                "temperature": 0.2, "top_k": 40, "top_p": 0.9, "min_p": 0.05,
                "repetition_penalty": 1.1, "max_new_tokens": 64, "transformers_version": "4.42"}"#,
        )
        .unwrap();
        assert_eq!(g.eos_token_ids, vec![2, 7]);
        assert_eq!(
            (g.bos_token_id, g.pad_token_id, g.do_sample),
            (Some(1), None, Some(true))
        );
        assert_eq!(
            (g.temperature, g.top_k, g.top_p),
            (Some(0.2), Some(40), Some(0.9))
        );
        assert_eq!((g.min_p, g.repetition_penalty), (Some(0.05), Some(1.1)));
        assert_eq!((g.max_new_tokens, g.max_length), (Some(64), None));
        let g = GenerationConfig::from_json(r#"{"eos_token_id": 2}"#).unwrap();
        assert_eq!(g.eos_token_ids, vec![2]);
        assert_eq!(
            GenerationConfig::from_json("{}").unwrap(),
            GenerationConfig::default()
        );
    }

    #[test]
    fn rejects_bad_values() {
        for bad in [
            r#"{"temperature": -1}"#,
            r#"{"top_p": 1.5}"#,
            r#"{"top_k": 0.5}"#,
            r#"{"do_sample": "yes"}"#,
            r#"{"eos_token_id": ["a"]}"#,
            r#"{"repetition_penalty": 0}"#,
        ] {
            assert!(GenerationConfig::from_json(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn missing_file_is_none() {
        let dir = std::env::temp_dir().join(format!("anyllama-genconf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(GenerationConfig::from_hf_dir(&dir).unwrap(), None);
        std::fs::write(
            dir.join("generation_config.json"),
            r#"{"temperature": "hot"}"#,
        )
        .unwrap();
        let err = GenerationConfig::from_hf_dir(&dir).unwrap_err().to_string();
        assert!(
            err.contains("generation_config.json") && err.contains("temperature"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
