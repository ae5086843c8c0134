//! Merging a PEFT LoRA adapter into its base model: every target projection W [out, in]
//! becomes W + scale * s * B A (s the adapter's own alpha / r, or alpha / sqrt(r) with rsLoRA),
//! written as an HF folder or a GGUF file through the convert pipeline (the same planning,
//! encoding, layout, side files and atomic rename as `convert`), the product added by its
//! per-tensor transform. The base may be stored in any type the loader reads (GGUF blocks
//! included): each weight is decoded to f32, the product is computed in f64 on the host and
//! added before the sum is rounded to f32 and encoded in the output type.

use crate::convert::{
    check_dtype, check_output, is_gguf_path, write_gguf, write_hf, HfFolder, Input, Planned,
    SHARD_LIMIT,
};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::loader::ModelFiles;
use crate::train::lora::Proj;
use crate::train::peft::{self, HostAdapter};
use std::path::Path;

/// Merges the PEFT adapter folder `adapter` into the model `base` (an HF folder or a .gguf
/// file) and writes the result to `out`: a GGUF file when `out` ends in `.gguf` (`dtype` f32,
/// f16, bf16, q8_0, q4_0 or q4_1), else an HF folder (f32, f16 or bf16). `scale` multiplies the
/// adapter's own scale (1 merges it as PEFT's `merge_and_unload` does). `out` must not exist
/// (an empty folder is fine); it is built under `<out>.partial` and renamed when complete.
/// `progress(done, total)` is told the bytes of tensor data written so far.
pub fn merge(
    base: &Path,
    adapter: &Path,
    scale: f32,
    out: &Path,
    dtype: DType,
    progress: &dyn Fn(usize, usize),
) -> Result<()> {
    if !scale.is_finite() {
        return Err(Error::Usage(format!(
            "adapter scale {scale} is not a finite number"
        )));
    }
    let to_gguf = is_gguf_path(out);
    check_dtype(dtype, to_gguf)?;
    check_output(base, out)?;
    check_output(adapter, out)?;
    if !adapter.is_dir() {
        let why = if adapter.exists() {
            "not a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)"
        } else {
            "no such adapter folder"
        };
        return Err(Error::load(adapter, why));
    }

    // The base, opened as convert opens it: an HF folder (a tokenizer is optional) or a GGUF file.
    let hf: HfFolder;
    let files: ModelFiles;
    let input = if base.is_dir() {
        hf = HfFolder::open(base)?;
        hf.input()
    } else if is_gguf_path(base) && base.is_file() {
        files = ModelFiles::open(base)?;
        Input::of_files(&files)
    } else if !base.exists() {
        return Err(Error::load(base, "no such file or folder"));
    } else {
        return Err(Error::load(
            base,
            "not a model folder (config.json + *.safetensors) or a .gguf file",
        ));
    };
    let lora = peft::read(adapter, input.cfg)?;
    let factor = scale as f64 * lora.cfg.scale() as f64;
    let transform = |p: &Planned, values: &mut [f32]| add_adapter(&lora, factor, p, values);
    if to_gguf {
        write_gguf(&input, out, dtype, &transform, progress)
    } else {
        write_hf(&input, out, dtype, &transform, progress, SHARD_LIMIT)
    }
}

/// The projection a tensor role of `weights::load`'s table is, if it is one.
fn proj_of(role: &str) -> Option<Proj> {
    Some(match role {
        "wq" => Proj::Q,
        "wk" => Proj::K,
        "wv" => Proj::V,
        "wo" => Proj::O,
        "w1" => Proj::Gate,
        "w3" => Proj::Up,
        "w2" => Proj::Down,
        _ => return None,
    })
}

/// The merge's per-tensor transform: W += factor * B A where `p` is an adapted projection.
fn add_adapter(lora: &HostAdapter, factor: f64, p: &Planned, w: &mut [f32]) -> Result<()> {
    let Some((a, b)) = proj_of(p.role).and_then(|proj| lora.get(p.layer, proj)) else {
        return Ok(());
    };
    let (rows, cols, r) = (p.shape[0], p.shape[1], lora.cfg.r);
    if w.len() != rows * cols || a.len() != r * cols || b.len() != rows * r {
        // peft::read checked the adapter against the config, plan the weight against it too.
        return Err(Error::Config(format!(
            "tensor {}: weight {rows}x{cols}, adapter A {} and B {} values for rank {r} disagree",
            p.src,
            a.len(),
            b.len()
        )));
    }
    add_product(w, cols, a, b, r, factor);
    Ok(())
}

/// w [rows, cols] += factor * b [rows, r] . a [r, cols], each row's product summed in f64 and
/// added before rounding; rows are split over the host's threads.
fn add_product(w: &mut [f32], cols: usize, a: &[f32], b: &[f32], r: usize, factor: f64) {
    let rows = w.len() / cols.max(1);
    if rows == 0 || cols == 0 {
        return;
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(rows);
    let rows_per = rows.div_ceil(threads);
    std::thread::scope(|s| {
        for (t, part) in w.chunks_mut(rows_per * cols).enumerate() {
            s.spawn(move || {
                let mut acc = vec![0f64; cols];
                for (j, row) in part.chunks_mut(cols).enumerate() {
                    let o = t * rows_per + j;
                    acc.fill(0.0);
                    for (k, &bk) in b[o * r..(o + 1) * r].iter().enumerate() {
                        if bk == 0.0 {
                            continue;
                        }
                        let bk = bk as f64;
                        for (x, &av) in acc.iter_mut().zip(&a[k * cols..(k + 1) * cols]) {
                            *x += bk * av as f64;
                        }
                    }
                    for (v, &x) in row.iter_mut().zip(&acc) {
                        *v = (*v as f64 + factor * x) as f32;
                    }
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_product_is_added_row_by_row() {
        // w [3, 2], b [3, 2], a [2, 2]: w + 0.5 * b a.
        let mut w = vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let a = [1.0f32, 2.0, 3.0, 4.0];
        let b = [1.0f32, 0.0, 0.0, 1.0, 1.0, -1.0];
        add_product(&mut w, 2, &a, &b, 2, 0.5);
        assert_eq!(w, vec![1.5, 3.0, 4.5, 6.0, 4.0, 5.0]);
    }
}
