#!/usr/bin/env python3
"""Two builds of anyllama on one GPU in one run: which of them decodes faster.

A kernel change is judged by its decode tok/s against the build before it, on the same GPU in
the same run (clocks, driver and neighbours drift between runs by more than many changes
move). This runs `anyllama bench` of the OLD and NEW binaries on each (shape, backend) case,
alternating old, new, old, new for --rounds rounds so that drift lands on both, and writes
ab.md (one row per case: old, new, new / old for decode, and for long-context decode and
prefill where asked) and ab.json (every run) under $OUT.

On the GPU machine, with the new build staged and the old binary carried along:
    bash .device/on-device.sh python3 bench/ab.py path/to/anyllama-old anyllama
--check runs the tiny shape on the CPU backend with small counts (no GPU needed).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from merge import fmt, ratio  # noqa: E402  (the run_device.sh table's number formatting)

SHAPES = ["smollm2-135m", "llama-3.2-1b", "llama-3.1-8b"]


def bench(binary, shape, dtype, backend, args):
    """One `anyllama bench` call; returns its row (with `error` set when it failed)."""
    cmd = [binary, "bench", "--synthetic", shape, "--dtype", dtype, "--backend", backend,
           "--runs", str(args.runs), "--gen", str(args.gen), "--prefill", str(args.prefill),
           "--long-ctx", str(args.long_ctx), "--max-seconds", str(args.max_seconds), "--json"]
    if args.check:
        cmd += ["--copy-mib", "16"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=args.max_seconds + 60)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {done.returncode}: {tail[0]}"}
    try:
        return json.loads(done.stdout)["rows"][0]
    except (ValueError, KeyError, IndexError) as e:
        return {"error": f"unreadable output: {e}"}


def median_of(rows, key):
    """Median over every timed run of the rows (decode_tok_s_all), or of the single figures."""
    values = []
    for r in rows:
        if r.get("error"):
            continue
        if key == "decode_tok_s":
            values += r.get("decode_tok_s_all") or []
        elif key == "prefill_tok_s":
            values += list((r.get(key) or {}).values())
        elif r.get(key):
            values.append(r[key])
    return statistics.median(values) if values else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", help="the anyllama binary before the change")
    ap.add_argument("new", help="the anyllama binary with the change")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--backends", default="wgpu,cuda")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--rounds", type=int, default=2, help="old/new alternations per case")
    ap.add_argument("--runs", type=int, default=3, help="timed decode runs per bench call")
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--long-ctx", type=int, default=0, help="8192 adds long-context decode")
    ap.add_argument("--prefill", type=int, default=0, help="2048 adds prefill tok/s")
    ap.add_argument("--max-seconds", type=int, default=40, help="per bench call")
    ap.add_argument("--check", action="store_true", help="tiny shape on the CPU, small counts")
    args = ap.parse_args()
    if args.check:
        args.shapes, args.backends, args.rounds, args.runs, args.gen = "tiny", "cpu", 1, 1, 8
        args.long_ctx, args.prefill = args.long_ctx and 256, args.prefill and 64
    out = os.environ.get("OUT", "/tmp/out")
    os.makedirs(out, exist_ok=True)

    cases = []
    start = time.time()
    for shape in args.shapes.split(","):
        for backend in args.backends.split(","):
            runs = {"old": [], "new": []}
            for _ in range(args.rounds):
                for tag, binary in (("old", args.old), ("new", args.new)):
                    row = bench(binary, shape, args.dtype, backend, args)
                    runs[tag].append(row)
                    print(f"{time.time() - start:6.0f}s {shape} {backend} {tag}: "
                          f"{row.get('error') or fmt(row.get('decode_tok_s'))}", flush=True)
            cases.append({"shape": shape, "backend": backend, "dtype": args.dtype, **runs})

    keys = [("decode", "decode_tok_s")]
    if args.long_ctx:
        keys.append(("long-ctx", "long_ctx_decode_tok_s"))
    if args.prefill:
        keys.append((f"prefill {args.prefill}", "prefill_tok_s"))
    lines = ["| shape | backend |" + "".join(f" {k} old | {k} new | new / old |" for k, _ in keys),
             "|---|---|" + "---:|---:|---:|" * len(keys)]
    for c in cases:
        cells = [c["shape"], f"{c['backend']} {c['dtype']}"]
        for _, key in keys:
            o, n = median_of(c["old"], key), median_of(c["new"], key)
            cells += [fmt(o), fmt(n), fmt(ratio(n, o), 3)]
        errors = {r["error"] for r in c["old"] + c["new"] if r.get("error")}
        lines.append("| " + " | ".join(cells) + " |" + (f" {'; '.join(errors)}" if errors else ""))
    device = next((r.get("device") for c in cases for r in c["new"] if r.get("device")), "?")
    head = (f"A/B tok/s (median over every timed run), {args.rounds} alternating "
            f"rounds of {args.runs} runs, {args.gen} tokens after a 128-token prompt; "
            f"device: {device}\nold: {args.old}\nnew: {args.new}\n")
    table = head + "\n" + "\n".join(lines) + "\n"
    with open(os.path.join(out, "ab.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out, "ab.json"), "w") as f:
        json.dump({"old": args.old, "new": args.new, "cases": cases}, f, indent=1)
    print(table)
    failed = any(r.get("error") for c in cases for r in c["old"] + c["new"])
    return 1 if failed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
