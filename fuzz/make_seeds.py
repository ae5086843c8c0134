"""Writes the fuzz seed corpus (fuzz/corpus/<target>/seed-*): a few tiny valid inputs per target
plus broken variants of them. Run from the repository root with the project venv:
    /work/venv/bin/python fuzz/make_seeds.py
The GGUF files are written with the `gguf` package (llama.cpp's own writer), so the valid seeds
follow the format definition, not our reader."""

import json
import os
import struct

import numpy as np
import gguf

ROOT = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(ROOT, "corpus")
FIXTURES = os.path.join(ROOT, "..", "tests", "fixtures")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def tiny_gguf(path, with_tensors=True):
    """A whole Llama model: dim 8, 2 heads, 1 layer, 16 tokens of a byte-level BPE vocabulary."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(32)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_block_count(1)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    tokens = ["<s>", "</s>", "h", "e", "l", "o", "Ġ", "w", "r", "d", "he", "ll", "hell", "hello", "!", "<|im_end|>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * 13 + [3])
    w.add_token_merges(["h e", "l l", "he ll", "hell o"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_chat_template("{% for m in messages %}{{ m.role }}: {{ m.content }}<|im_end|>{% endfor %}")
    if with_tensors:
        rng = np.random.default_rng(0)
        f = lambda *s: rng.standard_normal(s).astype(np.float32)
        w.add_tensor("token_embd.weight", f(16, 8))
        w.add_tensor("output_norm.weight", f(8))
        w.add_tensor("blk.0.attn_norm.weight", f(8))
        for n in ["attn_q", "attn_k", "attn_v", "attn_output"]:
            w.add_tensor(f"blk.0.{n}.weight", f(8, 8))
        w.add_tensor("blk.0.ffn_norm.weight", f(8))
        w.add_tensor("blk.0.ffn_gate.weight", f(16, 8))
        w.add_tensor("blk.0.ffn_up.weight", f(16, 8))
        w.add_tensor("blk.0.ffn_down.weight", f(8, 16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(path, "rb") as fh:
        return fh.read()


def safetensors_file(tensors):
    header, blobs, off = {}, [], 0
    for name, arr in tensors.items():
        b = arr.tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def main():
    tmp = os.path.join(CORPUS, ".tmp.gguf")
    os.makedirs(CORPUS, exist_ok=True)
    model = tiny_gguf(tmp)
    vocab_only = tiny_gguf(tmp, with_tensors=False)
    os.remove(tmp)
    put("gguf", "tiny-model.gguf", model)
    put("gguf", "truncated.gguf", model[: len(model) // 2])
    put("gguf", "huge-count.gguf", model[:8] + struct.pack("<Q", 1 << 60) + model[16:])
    put("gguf", "v2-header.gguf", model[:4] + struct.pack("<I", 2) + model[8:])
    put("gguf_tokenizer", "vocab.gguf", vocab_only)
    put("gguf_tokenizer", "truncated.gguf", vocab_only[: len(vocab_only) * 2 // 3])
    with open(os.path.join(FIXTURES, "gguf", "tok_spm.gguf"), "rb") as fh:
        put("gguf_tokenizer", "spm.gguf", fh.read())

    f = np.arange(4, dtype=np.float32)
    good = safetensors_file({"a": f, "b": f.reshape(2, 2)})
    put("safetensors", "single", b"\x00" + good)
    put("safetensors", "single-truncated", b"\x00" + good[:-3])
    put("safetensors", "single-bad-len", b"\x00" + struct.pack("<Q", 1 << 40) + good[8:])
    index = {"metadata": {"total_size": 16}, "weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}
    put("safetensors", "index", b"\x01" + json.dumps(index).encode())
    index["weight_map"]["y"] = "../b.safetensors"
    put("safetensors", "index-traversal", b"\x01" + json.dumps(index).encode())

    for name in ["default-mha-f32-v4", "llama3-bias-headdim-f32-v5", "longrope-mha-bf16-v5",
                 "yarn-gqa2-f16-sharded-v4"]:
        with open(os.path.join(FIXTURES, "hf", name, "config.json")) as fh:
            put("config", name + ".json", fh.read())
    put("config", "bad-rope.json", '{"rope_scaling": {"rope_type": "su", "factor": 2}}')

    with open(os.path.join(FIXTURES, "hf", "tiny-chat", "tokenizer_config.json")) as fh:
        chatml = json.load(fh)["chat_template"]
    put("chat_template", "chatml", chatml + "\0hello\0hi there\0bye")
    put("chat_template", "loops",
        "{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
        "{{ m['role'] | upper }}{{ m.content | trim | tojson }}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}\0a\0b")
    put("chat_template", "raise", "{{ raise_exception('no system role') }}\0x")


if __name__ == "__main__":
    main()
