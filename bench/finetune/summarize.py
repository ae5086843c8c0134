#!/usr/bin/env python3
"""run_task.sh's last step: one replies file and a markdown summary from the per-run replies.

    python3 summarize.py --work WORK --out OUT [--timings WORK/timings.tsv] [--failed STEP]

Reads WORK/replies/NAME.jsonl ({"prompt", "reply"} lines, check.py's input) for the runs that
exist among RUNS, scores each with check.py's rules and writes:
- OUT/replies.jsonl: one line per held-out prompt: {"prompt", "expected", NAME: reply...}.
- OUT/summary.md: the table (format pass, topic right, answer right per run), how many
  greedy replies are the same text in ours and HF (base and adapted), step timings, the
  training stderr tails (WORK/*-train.tail), and the failed step if there was one.
Prints summary.md too.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check  # noqa: E402

RUNS = [  # (name, what it is)
    ("base-ours", "base model, `anyllama chat` (HF folder, f32, cuda)"),
    ("base-hf", "base model, transformers greedy generate (f32)"),
    ("lora-ours", "base + our LoRA, `anyllama chat --lora`"),
    ("lora-hf", "base + our LoRA, `PeftModel.from_pretrained` + generate"),
    ("qlora-ours", "Q4_1 GGUF + QLoRA adapter, `anyllama chat -m GGUF --lora`"),
    ("qlora-hf", "f32 base + our QLoRA adapter, PEFT + generate"),
    ("lora-hfref", "base + HF/PEFT-trained reference adapter (peft_train.py, HF_TRAIN=1), PEFT"),
    ("hfref-ours", "base + that reference adapter, `anyllama chat --lora`"),
]
PAIRS = [("base-ours", "base-hf"), ("lora-ours", "lora-hf"), ("qlora-ours", "qlora-hf"),
         ("hfref-ours", "lora-hfref")]


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--heldout", default=os.path.join(os.path.dirname(__file__), "heldout.jsonl"))
    ap.add_argument("--timings", default=None)
    ap.add_argument("--failed", default="")
    args = ap.parse_args()
    held = read(args.heldout)
    runs = {}
    for name, _ in RUNS:
        path = os.path.join(args.work, "replies", name + ".jsonl")
        if os.path.exists(path):
            runs[name] = {r["prompt"]: r["reply"] for r in read(path)}

    md = ["# bench/finetune: the JSON-answer task", ""]
    if args.failed:
        md += [f"**FAILED in step {args.failed}**: the rows below are what ran before it.", ""]
    md += [f"{len(held)} held-out prompts (a run may have answered fewer: LIMIT); a reply passes when it is exactly "
           '`{"answer": "...", "topic": "<one of six>"}` (check.py).', "",
           "| run | what | format pass | topic right | answer right |",
           "| --- | --- | --- | --- | --- |"]
    for name, what in RUNS:
        if name not in runs:
            continue
        n = k = t = a = 0
        for h in held:
            if h["prompt"] not in runs[name]:
                continue
            ok, t_ok, a_ok, _ = check.check(runs[name][h["prompt"]], h)
            n, k, t, a = n + 1, k + ok, t + t_ok, a + a_ok
        pct = lambda x: f"{x}/{n} ({100 * x / n:.0f}%)" if n else "-"
        md.append(f"| {name} | {what} | {pct(k)} | {pct(t)} | {pct(a)} |")
    md.append("")
    for ours, hf in PAIRS:
        if ours in runs and hf in runs:
            common = [p for p in runs[ours] if p in runs[hf]]
            same = sum(runs[ours][p].strip() == runs[hf][p].strip() for p in common)
            md.append(f"- {ours} vs {hf}: {same}/{len(common)} greedy replies identical "
                      "(text, whitespace at the ends ignored)")
    md.append("")
    if args.timings and os.path.exists(args.timings):
        md += ["| step | seconds |", "| --- | --- |"]
        total = 0
        with open(args.timings) as f:
            for line in f:
                step, secs = line.rstrip("\n").split("\t")
                total += int(secs)
                md.append(f"| {step} | {secs} |")
        md += [f"| total | {total} |", ""]
    for tail in ("lora-train.tail", "qlora-train.tail", "hfref-train.tail"):
        path = os.path.join(args.work, tail)
        if os.path.exists(path):
            md += [f"`{tail}` (last lines of its stderr):", "```",
                   open(path, encoding="utf-8", errors="replace").read().rstrip(), "```", ""]

    with open(os.path.join(args.out, "replies.jsonl"), "w", encoding="utf-8") as f:
        for h in held:
            row = {"prompt": h["prompt"], "expected": {"answer": h["answer"], "topic": h["topic"]}}
            for name in runs:
                row[name] = runs[name].get(h["prompt"])
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    text = "\n".join(md) + "\n"
    with open(os.path.join(args.out, "summary.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
