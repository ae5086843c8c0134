"""The peer of `anyllama bench --train` in HF transformers (+ PEFT for LoRA): training speed on a
random-weight model of a real shape, with the same row of JSON fields (src/bench/train.rs,
`TrainRow`).

The model is built from config_for(shape) (bench/make_synthetic.py) directly on the device in the
chosen dtype, SDPA attention. LoRA: PEFT on all seven projections (q, k, v, o, gate, up, down),
rank --lora-r, alpha = rank, dropout 0, the base frozen (PEFT keeps the adapters in f32 over a
bf16 base). Full: every parameter trained in the model's dtype. Checkpointing "on" is
`gradient_checkpointing_enable(use_reentrant=False)` (per decoder layer), plus
`enable_input_require_grads()` with LoRA, as PEFT users do.

One step: a fixed random token batch [batch, seq] (seeded), labels = the inputs (transformers
shifts them: batch * (seq - 1) labelled rows, the mean cross-entropy), forward with labels,
backward, torch.optim.AdamW over the trainable parameters (lr 1e-4, fused on CUDA), step,
zero_grad, then a device synchronize and the loss read back; the wall time of each step.
Two warm-up steps, then up to --steps measured steps within --max-seconds (at least one);
step_ms is their median, tokens_per_s = batch * seq / median step.

peak_mem_bytes: torch.cuda.max_memory_allocated over the measured steps (the peak statistics are
reset after the warm-up, when the weights, gradients and optimizer state are all allocated, as
our side resets its pool's peak); 0 on the CPU.

gemm_tflops: the median of 5 timed torch.matmul of two bf16 [8192, 8192] matrices on the device
(after one untimed), 2 * 8192^3 / s / 1e12; on the CPU [1024, 1024] in f32.

model_flops_per_step (our side computes the identical number):
  P        = values of the seven projection matrices of every layer
             (q: hidden x heads*head_dim, k and v: hidden x kv_heads*head_dim each,
              o: heads*head_dim x hidden, gate, up, down: hidden x intermediate each)
             + the classifier, vocab x hidden (counted even when tied to the embedding);
  tokens   = batch * seq;
  attn_fwd = layers * batch * 2 * 2 * (seq * seq / 2) * heads * head_dim
             (the causal halves of QK^T and PV, 2 FLOPs per multiply-add);
  full:  6 * P * tokens + 3 * attn_fwd;
  lora:  4 * P * tokens + 3 * attn_fwd (a frozen base has no weight gradients; the adapters'
         own small products are not counted).
mfu = model_flops_per_step / (step_ms / 1000) / (gemm_tflops * 1e12).

Output: one JSON object on stdout (keys in KEYS). Any exception (an out-of-memory, say) gives
the same object with the measured numbers null and `error` set; the exit status is 0 then too.

Usage: python hf_peft_train.py --shape llama-3.2-1b --mode lora --batch 4 --seq 2048 \
           --checkpointing on > row.json
       python hf_peft_train.py --shape tiny --device cpu --batch 2 --seq 64 --steps 2
           (a quick check without a GPU)
"""
import argparse
import json
import os
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames; noise here
import traceback

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from make_synthetic import SHAPES, config_for  # noqa: E402  (one table of shapes for both)

DTYPE_NAMES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KEYS = ["kind", "shape", "dtype", "backend", "mode", "lora_r", "batch", "seq", "checkpointing",
        "steps", "step_ms", "tokens_per_s", "peak_mem_bytes", "model_flops_per_step",
        "gemm_tflops", "mfu", "loss_first", "loss_last", "error"]
WARM_UP = 2


class Budget:
    """A soft time limit: measured steps stop once it is spent (there is always one)."""

    def __init__(self, seconds):
        self.end = time.perf_counter() + seconds if seconds > 0 else None

    def exhausted(self):
        return self.end is not None and time.perf_counter() >= self.end


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def model_flops_per_step(shape, mode, batch, seq):
    """The model FLOPs of one training step (the formula of this file's docstring)."""
    c = SHAPES[shape]
    d, f, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim") or d // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f
    p = layers * per_layer + c["vocab_size"] * d
    tokens = batch * seq
    attn_fwd = layers * batch * 2.0 * 2.0 * (seq * seq / 2.0) * heads * head_dim
    return (6.0 if mode == "full" else 4.0) * p * tokens + 3.0 * attn_fwd


def gemm_tflops(device, samples=5):
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    g = torch.Generator(device="cpu").manual_seed(7)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    torch.matmul(a, b)
    times = []
    for _ in range(samples):
        sync(device)
        t = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        times.append(time.perf_counter() - t)
    del a, b
    return 2.0 * n ** 3 / statistics.median(times) / 1e12


def build(a, dtype):
    kw = config_for(a.shape)
    kw["attn_implementation"] = a.attn
    cfg = LlamaConfig(**kw)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(a.device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    if a.checkpointing == "on":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if a.mode == "lora":
            model.enable_input_require_grads()
    if a.mode == "lora":
        from peft import LoraConfig, get_peft_model
        lc = LoraConfig(r=a.lora_r, lora_alpha=a.lora_r, lora_dropout=0.0, target_modules=TARGETS,
                        bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lc)
    model.train()
    return model


def measure(a, row):
    device = a.device
    dtype = getattr(torch, a.dtype)
    budget = Budget(a.max_seconds)
    torch.manual_seed(a.seed)
    row["gemm_tflops"] = gemm_tflops(device)
    if device == "cuda":
        torch.cuda.empty_cache()
    model = build(a, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    kinds = sorted({str(p.dtype).replace("torch.", "") for p in params})
    print(f"peer train: {a.shape} {a.mode}, {sum(p.numel() for p in params):,} trainable values "
          f"({', '.join(kinds)}), batch {a.batch} x seq {a.seq}, checkpointing {a.checkpointing}",
          file=sys.stderr)
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if device == "cuda" else {}))
    vocab = SHAPES[a.shape]["vocab_size"]
    g = torch.Generator(device="cpu").manual_seed(a.seed)
    x = torch.randint(0, vocab, (a.batch, a.seq), generator=g).to(device)
    times, losses = [], []
    for i in range(WARM_UP + a.steps):
        if i == WARM_UP and device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t = time.perf_counter()
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        losses.append(loss.item())
        dt = time.perf_counter() - t
        if i >= WARM_UP:
            times.append(dt)
            print(f"peer train: step {i - WARM_UP + 1} of {a.steps}: {dt * 1e3:.1f} ms, "
                  f"loss {losses[-1]:.4f}", file=sys.stderr)
            if budget.exhausted():
                break
        else:
            print(f"peer train: warm-up {i + 1}: {dt * 1e3:.1f} ms, loss {losses[-1]:.4f}",
                  file=sys.stderr)
    s = statistics.median(times)
    row["steps"] = len(times)
    row["step_ms"] = s * 1e3
    row["tokens_per_s"] = a.batch * a.seq / s
    row["peak_mem_bytes"] = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    row["mfu"] = row["model_flops_per_step"] / s / (row["gemm_tflops"] * 1e12)
    row["loss_first"], row["loss_last"] = losses[0], losses[-1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", required=True, choices=SHAPES)
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPE_NAMES))
    ap.add_argument("--mode", default="lora", choices=["lora", "full"])
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--checkpointing", default="on", choices=["on", "off"])
    ap.add_argument("--steps", type=int, default=10, help="most measured steps, after 2 warm-up steps")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="soft time limit (0: none)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    a.steps = max(a.steps, 1)
    row = dict.fromkeys(KEYS)
    row.update(kind="train", shape=a.shape, dtype=DTYPE_NAMES[a.dtype],
               backend="hf+peft" if a.mode == "lora" else "hf", mode=a.mode,
               lora_r=a.lora_r if a.mode == "lora" else None, batch=a.batch, seq=a.seq,
               checkpointing=a.checkpointing, steps=0,
               model_flops_per_step=model_flops_per_step(a.shape, a.mode, a.batch, a.seq))
    try:
        if a.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device; use --device cpu")
        if a.batch < 1 or a.seq < 2:
            raise ValueError("--batch must be at least 1 and --seq at least 2")
        measure(a, row)
    except Exception as e:  # reported in the row, which still gets printed
        traceback.print_exc(file=sys.stderr)
        for k in ["steps"]:
            row[k] = 0
        for k in ["step_ms", "tokens_per_s", "peak_mem_bytes", "gemm_tflops", "mfu", "loss_first", "loss_last"]:
            row[k] = None
        row["error"] = f"{type(e).__name__}: {e}"[:500]
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
