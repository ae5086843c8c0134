"""The peer of `anyllama bench` in HF transformers: the same shapes with random weights, the same
prompt and generation lengths, the same timing rules, the same JSON fields (see
src/bench/report.rs).

The model is built from its config directly on the device in the chosen dtype (nothing is
allocated on the host), with SDPA attention and a static KV cache. Timings are wall time around
`generate` with a device synchronize at both ends; a streamer stamps the time each token reaches
the host (generate copies every token to the host, as a streaming user would), so:
  decode tok/s  = (generated - 1) / (time of last token - time of first token),
  TTFT          = time of first token - start (prefill of the prompt plus one sample),
  prefill tok/s = prompt tokens / TTFT for a prompt of that length.
One warm-up run before each measurement, then the median of --runs runs.

With --compile a second row measures transformers' own compiled decoding (a static cache on CUDA
turns it on unless disable_compile is set); a failure to compile is reported in that row.

Usage: python hf_transformers.py --shape llama-3.1-8b [--compile] [--runs 5] > peer.json
       python hf_transformers.py --shape tiny --device cpu --dtype float32 --runs 1 --gen 8 \
           --prefill 64 --long-ctx 256       (a quick check without a GPU)
"""
import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from make_synthetic import SHAPES, config_for  # noqa: E402  (one table of shapes for both)

DTYPE_NAMES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


class Budget:
    """A soft time limit: repetitions stop once it is spent (a measurement always gets one run)."""

    def __init__(self, seconds):
        self.end = time.perf_counter() + seconds if seconds > 0 else None

    def exhausted(self):
        return self.end is not None and time.perf_counter() >= self.end

    def remaining(self):
        return None if self.end is None else max(self.end - time.perf_counter(), 0.0)


class TokenClock:
    """A streamer that notes when each batch of tokens reaches the host (the prompt first)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def build(shape, dtype, device):
    cfg = LlamaConfig(**config_for(shape))
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def one_run(model, prompt, gen, compile_):
    """Generates `gen` tokens greedily after `prompt`; returns (decode tok/s, ttft s)."""
    device = prompt.device.type
    clock = TokenClock()
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=gen,
            min_new_tokens=gen,  # EOS ignored
            do_sample=False,
            cache_implementation="static",
            disable_compile=not compile_,
            pad_token_id=0,
            streamer=clock,
        )
    sync(device)
    t_end = time.perf_counter()
    new = out.shape[1] - prompt.shape[1]
    if new != gen:
        raise RuntimeError(f"generate made {new} of {gen} tokens")
    stamps = clock.times[1:]  # times[0] is the prompt being handed over
    ttft = stamps[0] - t0 if stamps else t_end - t0
    decode = (gen - 1) / (stamps[-1] - stamps[0]) if gen > 1 and len(stamps) >= gen else None
    return decode, ttft


def runs_of(model, prompt, gen, runs, warm_up, compile_, budget):
    if warm_up:
        one_run(model, prompt, gen if compile_ else min(gen, 32), compile_)
    out = []
    while len(out) < max(runs, 1) and (not out or not budget.exhausted()):
        out.append(one_run(model, prompt, gen, compile_))
    return out


def bytes_per_token(model, tied):
    """Weight bytes one decode step reads: everything but the embedding table, plus the output
    projection (the table itself when tied) and one embedding row."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    row = emb.shape[1] * emb.element_size()
    emb_bytes = emb.numel() * emb.element_size()
    return total, (total if tied else total - emb_bytes) + row


def copy_bandwidth(device, nbytes, samples=5):
    """Device copy bandwidth in GB/s, read + write bytes, median of `samples`."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    out = []
    for _ in range(samples):
        sync(device)
        t = time.perf_counter()
        for i in range(8):
            (y if i % 2 == 0 else x).copy_(x if i % 2 == 0 else y)
        sync(device)
        out.append(2 * 8 * nbytes / (time.perf_counter() - t) / 1e9)
    del x, y
    return statistics.median(out)


def measure(a, model, compile_, device_name, weights_bytes, per_token):
    device = a.device
    vocab = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(a.seed)

    def prompt(n):
        return torch.randint(0, vocab, (1, n), generator=g).to(device)

    row = {
        "harness": "transformers+compile" if compile_ else "transformers",
        "backend": f"torch-{device}",
        "device": device_name,
        "model": a.shape,
        "dtype": DTYPE_NAMES[a.dtype],
        "kv_dtype": DTYPE_NAMES[a.dtype],
        "weights_bytes": weights_bytes,
        "bytes_per_token": per_token,
        "prompt_tokens": a.prompt,
        "gen_tokens": a.gen,
        "decode_runs": 0,
        "decode_tok_s": None,
        "decode_tok_s_all": [],
        "ttft_ms": None,
        "prefill_tok_s": {},
        "long_ctx_tokens": None,
        "long_ctx_gen_tokens": None,
        "long_ctx_decode_tok_s": None,
        "peak_mem_bytes": None,
        "bandwidth_gbps": None,
        "bandwidth_source": None,
        "achieved_gbps": None,
        "bandwidth_fraction": None,
        "error": None,
        "notes": ["sdpa attention, static cache" + (", torch.compile" if compile_ else ", eager")
                  + ("" if device == "cuda" or not compile_ else " (transformers compiles on CUDA only: eager here)")],
    }
    budget = Budget(a.max_seconds)
    try:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        runs = runs_of(model, prompt(a.prompt), a.gen, a.runs, True, compile_, budget)
        if device == "cuda":
            row["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
        row["decode_runs"] = len(runs)
        row["decode_tok_s_all"] = [r[0] for r in runs]
        row["decode_tok_s"] = median(row["decode_tok_s_all"])
        row["ttft_ms"] = median([r[1] * 1e3 for r in runs])
    except Exception as e:  # reported in the row: the other rows still run
        row["error"] = f"decode failed: {type(e).__name__}: {e}"
        traceback.print_exc(file=sys.stderr)
        return row
    for n in a.prefill:
        if budget.exhausted():
            row["notes"].append(f"prefill {n} skipped: time budget spent")
            continue
        try:
            runs = runs_of(model, prompt(n), 1, a.runs, True, compile_, budget)
            row["prefill_tok_s"][str(n)] = median([n / r[1] for r in runs])
        except Exception as e:
            row["notes"].append(f"prefill {n} failed: {type(e).__name__}: {e}")
    if a.long_ctx > 0:
        gen = max(a.long_ctx_gen, 2)
        row["long_ctx_tokens"], row["long_ctx_gen_tokens"] = a.long_ctx, gen
        # skip when the prefill speed so far (halved: attention grows) says it would overrun
        slowest = min(row["prefill_tok_s"].values(), default=None)
        estimate = 2 * a.long_ctx / slowest if slowest else 0.0
        if compile_:
            estimate *= 2  # a warm-up run first
        left = budget.remaining()
        if budget.exhausted() or (left is not None and estimate > left):
            row["notes"].append(f"long-context decode at {a.long_ctx} skipped: time budget spent "
                                f"or too short (estimate {estimate:.0f} s)")
        else:
            try:
                # compiled decoding recompiles for a new cache length: warm it up first
                runs = runs_of(model, prompt(a.long_ctx), gen, 1, compile_, compile_, budget)
                row["long_ctx_decode_tok_s"] = median([r[0] for r in runs])
            except Exception as e:
                row["notes"].append(f"long-context decode failed: {type(e).__name__}: {e}")
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", required=True, choices=SHAPES)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPE_NAMES))
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prefill", default="512,2048", help="comma-separated prompt lengths")
    ap.add_argument("--long-ctx", type=int, default=8192, help="0 skips the long-context decode")
    ap.add_argument("--long-ctx-gen", type=int, default=32)
    ap.add_argument("--compile", action="store_true", help="also measure compiled decoding")
    ap.add_argument("--no-eager", action="store_true", help="only the compiled row")
    ap.add_argument("--copy-mib", type=int, default=1024)
    ap.add_argument("--max-seconds", type=float, default=300.0, help="soft limit per row (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    a.prefill = [int(n) for n in a.prefill.split(",") if n.strip() and int(n) > 0]
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --device cpu")
    torch.manual_seed(a.seed)
    dtype = getattr(torch, a.dtype)
    device_name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    model = build(a.shape, dtype, a.device)
    weights_bytes, per_token = bytes_per_token(model, model.config.tie_word_embeddings)
    variants = ([] if a.no_eager else [False]) + ([True] if a.compile else [])
    rows = []
    for compile_ in variants:
        print(f"peer: transformers {a.shape} {'compiled' if compile_ else 'eager'}", file=sys.stderr)
        rows.append(measure(a, model, compile_, device_name, weights_bytes, per_token))
    del model
    if a.device == "cuda":
        torch.cuda.empty_cache()
    try:
        bw = copy_bandwidth(a.device, a.copy_mib << 20)
    except Exception as e:
        bw = None
        for r in rows:
            r["notes"].append(f"copy bandwidth failed: {e}")
    for r in rows:
        r["bandwidth_gbps"], r["bandwidth_source"] = bw, ("copy" if bw else None)
        if r["decode_tok_s"] is not None:
            r["achieved_gbps"] = per_token * r["decode_tok_s"] / 1e9
            if bw:
                r["bandwidth_fraction"] = r["achieved_gbps"] / bw
    print(json.dumps({
        "schema": 1,
        "tool": "bench/peers/hf_transformers.py",
        "version": f"transformers {transformers.__version__}, torch {torch.__version__}",
        "unix_time": int(time.time()),
        "rows": rows,
    }, indent=2))


if __name__ == "__main__":
    main()
