"""Merges the JSON of one bench/run_device.sh run into OUT/bench.json (every row, plus the
machine) and OUT/bench.md (one markdown table: our backends, the transformers peer, ratios).

Usage: python merge.py WORK_DIR OUT_DIR
WORK_DIR holds cases.tsv (kind, shape, dtype, backend, exit code or "skipped", file stem), the
JSON each case printed (<stem>.json) and its stderr (<stem>.log), and gpu.txt (nvidia-smi).
A case without valid JSON becomes a row whose `error` says why (exit code, last log line).
"""
import datetime
import json
import os
import sys

TIMEOUT_CODES = {"124": "timed out", "137": "killed (time or memory)"}


def load_case(work, kind, shape, dtype, backend, rc, stem):
    path = os.path.join(work, stem + ".json")
    rows, err = [], None
    if rc == "skipped":
        err = "skipped: not enough time left in the run"
    else:
        try:
            with open(path) as f:
                rows = json.load(f)["rows"]
        except (OSError, ValueError, KeyError) as e:
            err = f"no JSON ({type(e).__name__})"
        if rc != "0" and not rows:
            last = ""
            try:
                with open(os.path.join(work, stem + ".log")) as f:
                    lines = [l.strip() for l in f if l.strip()]
                last = lines[-1] if lines else ""
            except OSError:
                pass
            err = f"exit {rc} ({TIMEOUT_CODES.get(rc, 'failed')}): {last}"[:300]
    if rows:
        for r in rows:
            r["case"] = stem
        return rows
    return [{
        "harness": kind, "backend": backend, "model": shape, "dtype": dtype, "error": err,
        "case": stem, "prefill_tok_s": {}, "notes": [],
    }]


def fmt(v, digits=1):
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def ratio(a, b):
    return a / b if a is not None and b else None


def main():
    work, out = sys.argv[1], sys.argv[2]
    rows = []
    with open(os.path.join(work, "cases.tsv")) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 6:
                rows += load_case(work, *parts)
    gpu = open(os.path.join(work, "gpu.txt")).read().strip()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump({"schema": 1, "gpu": gpu, "date": now, "rows": rows}, f, indent=2)

    def find(harness, backend, model, dtype):
        for r in rows:
            if r.get("harness") == harness and r.get("model") == model and r.get("dtype") == dtype \
                    and (backend is None or r.get("backend") == backend):
                return r
        return None

    def our(backend, model, dtype):
        # a failed case is recorded under the backend name it was asked for
        return find("anyllama", backend, model, dtype)

    prefills = sorted({int(k) for r in rows for k in (r.get("prefill_tok_s") or {})})
    long_ctx = max((r.get("long_ctx_tokens") or 0 for r in rows), default=0)
    # (label, value of a row, digits, whether a peer ratio makes sense)
    metrics = [
        ("decode tok/s", lambda r: r.get("decode_tok_s"), 1, True),
        ("TTFT ms (128-token prompt)", lambda r: r.get("ttft_ms"), 1, True),
    ]
    for n in prefills:
        metrics.append((f"prefill {n} tok/s", lambda r, n=n: (r.get("prefill_tok_s") or {}).get(str(n)), 0, True))
    metrics += [
        (f"decode tok/s at {long_ctx} context", lambda r: r.get("long_ctx_decode_tok_s"), 1, True),
        (f"decode {long_ctx} ctx / 128 ctx",
         lambda r: ratio(r.get("long_ctx_decode_tok_s"), r.get("decode_tok_s")), 2, False),
        ("peak memory GiB", lambda r: r["peak_mem_bytes"] / 2**30 if r.get("peak_mem_bytes") else None, 2, True),
        ("decode bandwidth / copy bandwidth", lambda r: r.get("bandwidth_fraction"), 2, False),
        ("copy bandwidth GB/s", lambda r: r.get("bandwidth_gbps"), 0, False),
    ]
    cases = []
    for r in rows:
        key = (r.get("model"), r.get("dtype"))
        if r.get("harness") == "anyllama" and key not in cases:
            cases.append(key)
    lines = [
        f"# anyllama bench, {now}",
        "",
        f"GPU: {gpu} (name, memory, driver). Synthetic models of the named shapes, random weights; "
        "batch 1, decode after a 128-token prompt, 256 tokens generated, EOS ignored; medians after a warm-up. "
        "Peer: HF transformers, bf16, SDPA, static cache (eager; `compile` = its compiled decoding). "
        "For quantized rows the peer column is its bf16 model. Ratios are ours / peer (or wgpu / cuda): "
        "above 1 is better for tok/s, below 1 for ms and memory; the peer side of a ratio is the better of its two columns.",
        "",
        "| row | wgpu | cuda | HF eager | HF compile | wgpu/HF | cuda/HF | wgpu/cuda |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, dtype in cases:
        w, c = our("wgpu", model, dtype), our("cuda", model, dtype)
        he = find("transformers", None, model, "bf16")
        hc = find("transformers+compile", None, model, "bf16")
        for label, get, digits, peer_ratio in metrics:
            vals = [get(r) if r and not r.get("error") else None for r in (w, c, he, hc)]
            if all(v is None for v in vals):
                continue
            wv, cv, hev, hcv = vals
            best_hf = hev if hcv is None else (hcv if hev is None else max(hev, hcv))
            if "ms" in label or "memory" in label:
                best_hf = hev if hcv is None else (hcv if hev is None else min(hev, hcv))
            cells = [
                f"{model} {dtype} {label}",
                fmt(wv, digits), fmt(cv, digits), fmt(hev, digits), fmt(hcv, digits),
                fmt(ratio(wv, best_hf), 2) if peer_ratio else "",
                fmt(ratio(cv, best_hf), 2) if peer_ratio else "",
                fmt(ratio(wv, cv), 2),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    problems = [r for r in rows if r.get("error")] + [r for r in rows if r.get("notes")]
    if problems:
        lines.append("Errors and notes:")
        lines.append("")
        for r in rows:
            what = f"{r.get('harness')} {r.get('backend')} {r.get('model')} {r.get('dtype')}"
            if r.get("error"):
                lines.append(f"- {what}: **{r['error']}**")
            for n in r.get("notes") or []:
                lines.append(f"- {what}: {n}")
        lines.append("")
    devices = sorted({f"{r.get('backend')}: {r.get('device')}" for r in rows if r.get("device")})
    lines.append("Devices: " + "; ".join(devices))
    with open(os.path.join(out, "bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
