"""Writes a random-weight Llama checkpoint of a real model's shape as an HF folder (for speed runs
on machines without the real weights). The tokenizer files of tests/fixtures/hf/tiny-chat are
copied in so the CLI can run it (its 512 ids all exist in the larger embedding).

Usage: python make_synthetic.py {smollm2-135m|llama-3.2-1b|llama-3.1-8b|tiny} OUT_DIR [--dtype float16]
           [--tokenizer DIR --vocab N]

--tokenizer takes the tokenizer files of another HF folder instead, and --vocab sets the
embedding's rows to that tokenizer's size, so that every id the random model emits decodes to
text (serve_load.py counts streamed chunks; the rest of the shape is unchanged).

SHAPES is the one table of shapes for the Python side (bench/peers/hf_transformers.py imports it);
src/bench/synthetic.rs holds the same numbers for `anyllama bench --synthetic`.
"""
import argparse
import os
import shutil

import torch
from transformers import LlamaConfig, LlamaForCausalLM

def LLAMA3_ROPE(factor):
    return dict(rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)


SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                         max_position_embeddings=8192),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                         max_position_embeddings=131072, rope_scaling=LLAMA3_ROPE(32.0)),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                         max_position_embeddings=131072, rope_scaling=LLAMA3_ROPE(8.0)),
    # for quick checks without a GPU; rows are whole blocks of every quantized format
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True, rope_theta=10000.0,
                 max_position_embeddings=16384),
}


def config_for(shape):
    """LlamaConfig keyword arguments of a shape."""
    return dict(SHAPES[shape], rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", choices=SHAPES)
    ap.add_argument("out")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--tokenizer", help="HF folder whose tokenizer files to copy")
    ap.add_argument("--vocab", type=int, help="embedding rows (the tokenizer's size)")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    kw = config_for(a.shape)
    if a.vocab:
        kw["vocab_size"] = a.vocab
    cfg = LlamaConfig(**kw)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(a.out)
    here = os.path.dirname(os.path.abspath(__file__))
    tok = a.tokenizer or os.path.join(here, "..", "tests", "fixtures", "hf", "tiny-chat")
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(os.path.join(tok, f), a.out)


if __name__ == "__main__":
    main()
