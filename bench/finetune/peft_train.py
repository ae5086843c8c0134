#!/usr/bin/env python3
"""Reference LoRA fine-tune of the bench/finetune task with transformers + PEFT: what a PEFT
user would run, with `anyllama train`'s settings, to tell "the task cannot be learned at these
settings" apart from "our trainer does not learn it". Optional in run_task.sh (HF_TRAIN=1).

    python3 peft_train.py --base HF_DIR --data train.jsonl --out DIR [--epochs 3] [--lr 2e-4]

Matches `anyllama train --lora-r 16 --lora-alpha 32 --batch 8 (no --packing)`: LoRA on all
seven projections, dropout 0, f32 weights; chat lines rendered by the tokenizer's template with
loss on the assistant turn only (its tokens past the prompt rendered with the generation
prompt, the closing <|im_end|> included); shuffled each epoch, BATCH samples per step (right
padding, masked); AdamW (betas 0.9/0.999, eps 1e-8, no weight decay), grad-norm clip 1.0,
cosine decay to 0 over all steps with no warm-up. Writes the adapter (PeftModel.save_pretrained)
and log.jsonl ({"step", "loss", "lr"} every --log-every steps) to --out.
"""

import argparse
import json
import math
import os
import random
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def encode(tok, messages, seq):
    """Token ids and labels of one chat sample: loss on the last assistant turn."""
    assert messages[-1]["role"] == "assistant"
    prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(messages, tokenize=False)
    assert full.startswith(prompt), "template renders earlier turns differently"
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = tok(full, add_special_tokens=False)["input_ids"]
    k = next((i for i, (a, b) in enumerate(zip(p_ids, ids)) if a != b), len(p_ids))
    labels = [-100] * k + ids[k:]
    return ids[:seq], labels[:seq]


def main():
    ap = argparse.ArgumentParser(description="HF + PEFT reference LoRA fine-tune")
    ap.add_argument("--base", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32)
    ap.add_argument("--seed", type=int, default=3407)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    tok = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                                             lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    model.to(device).train()
    with open(args.data, encoding="utf-8") as f:
        samples = [encode(tok, json.loads(l)["messages"], args.seq) for l in f if l.strip()]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    steps_per_epoch = math.ceil(len(samples) / args.batch)
    total = steps_per_epoch * args.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "log.jsonl"), "w")
    print(f"{len(samples)} samples, {steps_per_epoch} steps/epoch, {total} steps on {device}",
          file=sys.stderr)
    t0, step, tokens = time.time(), 0, 0
    for epoch in range(args.epochs):
        order = list(range(len(samples)))
        rng.shuffle(order)
        for b in range(0, len(order), args.batch):
            batch = [samples[i] for i in order[b:b + args.batch]]
            n = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([s[0] + [pad] * (n - len(s[0])) for s in batch], device=device)
            lab = torch.tensor([s[1] + [-100] * (n - len(s[1])) for s in batch], device=device)
            mask = torch.tensor([[1] * len(s[0]) + [0] * (n - len(s[0])) for s in batch],
                                device=device)
            loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens += int(mask.sum())
            if step % args.log_every == 0 or step == total:
                line = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": lr}
                log.write(json.dumps(line) + "\n")
                log.flush()
                print(f"step {step}/{total} loss {loss.item():.4f} lr {lr:.2e} "
                      f"({tokens / (time.time() - t0):.0f} tok/s)", file=sys.stderr)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"trained {total} steps in {time.time() - t0:.1f}s -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
