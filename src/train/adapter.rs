//! `--lora DIR[:SCALE]`: a PEFT LoRA adapter applied to a loaded model, unmerged, for
//! generation (every backend runs the adapter's two small products beside each projection).

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::train::peft;
use std::path::PathBuf;
use std::str::FromStr;

/// An adapter folder and the factor its own scale (alpha / r) is multiplied by.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterSpec {
    pub dir: PathBuf,
    pub scale: f32,
}

impl FromStr for AdapterSpec {
    type Err = String;

    /// `DIR` or `DIR:SCALE`; a colon followed by something that is not a number belongs to
    /// the path (`C:\adapters\x`).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s.is_empty() {
            return Err("an empty adapter path".into());
        }
        let (dir, scale) = match s.rsplit_once(':') {
            Some((d, v)) if !d.is_empty() => match v.parse::<f32>() {
                Ok(x) if x.is_finite() => (d, x),
                Ok(_) => return Err(format!("scale {v:?} is not a finite number")),
                Err(_) => (s, 1.0),
            },
            _ => (s, 1.0),
        };
        Ok(AdapterSpec {
            dir: PathBuf::from(dir),
            scale,
        })
    }
}

impl AdapterSpec {
    /// Loads the adapter for `m`'s shape and puts it on the model.
    pub fn apply<B: Backend>(&self, b: &B, m: &mut Model<B>) -> Result<()> {
        if !self.dir.is_dir() {
            return Err(Error::load(&self.dir, "not an adapter folder"));
        }
        let mut lora = peft::load(b, &m.cfg, &self.dir)?;
        lora.scale *= self.scale;
        m.lora = Some(lora);
        Ok(())
    }

    /// "DIR (r 16, alpha 32, 7 targets, scale 2.000)" for the load line.
    pub fn describe<B: Backend>(&self, m: &Model<B>) -> String {
        match &m.lora {
            Some(l) => format!(
                "{} (r {}, alpha {}, {} target modules, scale {:.4})",
                self.dir.display(),
                l.cfg.r,
                l.cfg.alpha,
                l.cfg.targets.len(),
                l.scale
            ),
            None => self.dir.display().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::AdapterSpec;

    #[test]
    fn parses_dir_and_scale() {
        let p = |s: &str| s.parse::<AdapterSpec>();
        assert_eq!(p("out").unwrap().scale, 1.0);
        let a = p("runs/a:0.5").unwrap();
        assert_eq!((a.dir.to_str().unwrap(), a.scale), ("runs/a", 0.5));
        assert_eq!(p(r"C:\x").unwrap().dir.to_str().unwrap(), r"C:\x");
        assert_eq!(p("a:b:2").unwrap().dir.to_str().unwrap(), "a:b");
        assert!(p("a:inf").is_err());
        assert!(p("").is_err());
    }
}
