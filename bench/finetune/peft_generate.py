#!/usr/bin/env python3
"""Greedy replies of an HF model, with or without a PEFT LoRA adapter: the reference side of
bench/finetune (run_task.sh compares them with `anyllama chat --lora`).

    python3 peft_generate.py --base HF_DIR --adapter DIR --prompts heldout.jsonl --out replies.jsonl
    python3 peft_generate.py --base HF_DIR --no-adapter --prompts heldout.jsonl --out base.jsonl

- The base loads in f32 (AutoModelForCausalLM), on cuda when available, else the CPU
  (--device to choose). The adapter loads with `PeftModel.from_pretrained(model, DIR)`,
  unchanged and unmerged, exactly as a PEFT user would load it.
- --prompts: JSONL; each line's "prompt" (heldout.jsonl has it), else the last user turn of
  its "messages". --limit N keeps the first N.
- Each prompt is one user message rendered by the tokenizer's chat template with
  add_generation_prompt=True (no system turn: SmolLM2's template adds its default one, as
  `anyllama chat -p` does), then generate(do_sample=False, max_new_tokens=N, default 64) one
  prompt at a time (no padding, so nothing differs from a lone chat). The reply is the new
  tokens decoded with skip_special_tokens=True, stopped at the model's EOS tokens
  (generation_config), so it is what `anyllama chat` prints.
- --out: JSONL lines {"prompt", "reply"} (check.py's input), in the prompts' order.
"""

import argparse
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def read_prompts(path, limit):
    prompts = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" in row:
                prompts.append(row["prompt"])
            elif "messages" in row:
                users = [m["content"] for m in row["messages"] if m["role"] == "user"]
                if not users:
                    sys.exit(f"{path}:{i}: no user message")
                prompts.append(users[-1])
            else:
                sys.exit(f'{path}:{i}: neither "prompt" nor "messages"')
    return prompts[:limit] if limit else prompts


def main():
    ap = argparse.ArgumentParser(description="greedy HF (+ PEFT) replies to held-out prompts")
    ap.add_argument("--base", required=True, help="HF model folder")
    ap.add_argument("--adapter", help="PEFT adapter folder")
    ap.add_argument("--no-adapter", action="store_true", help="the base model alone")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args()
    if bool(args.adapter) == args.no_adapter:
        ap.error("give exactly one of --adapter DIR and --no-adapter")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        # f32 matmuls in f32, not TF32: the reference should be the exact model.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.to(device).eval()
    prompts = read_prompts(args.prompts, args.limit)
    print(f"loaded {args.base}" + (f" + {args.adapter}" if args.adapter else "")
          + f" on {device} in {time.time() - t0:.1f}s; {len(prompts)} prompts", file=sys.stderr)

    t0 = time.time()
    with open(args.out, "w", encoding="utf-8") as out:
        for p in prompts:
            ids = tok.apply_chat_template([{"role": "user", "content": p}],
                                          add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)
            ids = {k: v.to(device) for k, v in ids.items()}
            with torch.no_grad():
                gen = model.generate(**ids, do_sample=False, max_new_tokens=args.max_new_tokens,
                                     temperature=None, top_p=None, top_k=None)
            new = gen[0, ids["input_ids"].shape[1]:]
            reply = tok.decode(new, skip_special_tokens=True)
            out.write(json.dumps({"prompt": p, "reply": reply}, ensure_ascii=False) + "\n")
            out.flush()
    print(f"{len(prompts)} replies in {time.time() - t0:.1f}s -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
