"""Merges the JSON of one bench/run_train.sh run into OUT/train.json (every row, the machine, the
curve stages) and OUT/train.md (the speed table: ours against the HF peer, one line per case; then
the loss-curve comparison, OUT/curve.md, when there is one).

Usage: python merge_train.py WORK_DIR OUT_DIR
WORK_DIR holds
  cases.tsv   side (ours | peer), shape, mode, batch, seq, checkpointing (on | off), exit code or
              "skipped", file stem: one line per speed case;
  <stem>.json what the case printed (one row object, a list of rows, or {"rows": [...]}) and
  <stem>.log  its stderr;
  curve.tsv   stage, exit code or "skipped: why", log stem, seconds: one line per curve stage;
  gpu.txt     nvidia-smi's name, memory and driver.
A case without a valid row becomes a row whose `error` says why (exit code, last log line).
Rows are matched on (shape, mode, batch, seq, checkpointing); our "layer" checkpointing is "on".
"""
import datetime
import json
import os
import sys

TIMEOUT_CODES = {"124": "timed out", "137": "killed (time or memory)"}


def last_line(path):
    try:
        with open(path, errors="replace") as f:
            lines = [l.strip() for l in f if l.strip()]
        return lines[-1] if lines else ""
    except OSError:
        return ""


def parse_rows(path):
    with open(path) as f:
        v = json.load(f)
    if isinstance(v, dict) and "rows" in v:
        v = v["rows"]
    return v if isinstance(v, list) else [v]


def normal_ckpt(c):
    return {"layer": "on"}.get(c, c)


def load_case(work, side, shape, mode, batch, seq, ckpt, rc, stem):
    base = {"kind": "train", "side": side, "shape": shape, "mode": mode, "batch": int(batch), "seq": int(seq),
            "checkpointing": ckpt, "case": stem}
    rows, err = [], None
    if rc == "skipped":
        err = "skipped: not enough time left in the run"
    else:
        try:
            rows = [r for r in parse_rows(os.path.join(work, stem + ".json")) if isinstance(r, dict)]
        except (OSError, ValueError) as e:
            err = f"no JSON ({type(e).__name__})"
        if not rows:
            why = TIMEOUT_CODES.get(rc, "failed") if rc != "0" else "no row"
            err = f"exit {rc} ({why}): {last_line(os.path.join(work, stem + '.log'))}"[:400]
    if not rows:
        return [dict(base, error=err)]
    out = []
    for r in rows:
        r = dict(r)
        r["side"], r["case"] = side, stem
        r["checkpointing"] = normal_ckpt(r.get("checkpointing", ckpt))
        for k in ("shape", "mode", "batch", "seq"):
            r.setdefault(k, base[k])
        out.append(r)
    return out


def fmt(v, digits=1):
    return "-" if v is None else f"{v:,.{digits}f}"


def ratio(a, b):
    return a / b if a is not None and b else None


def gib(b):
    return b / 2 ** 30 if b else None


def short(e, n=70):
    e = " ".join(str(e).split())
    return e if len(e) <= n else e[:n - 3] + "..."


def main():
    work, out = sys.argv[1], sys.argv[2]
    rows = []
    path = os.path.join(work, "cases.tsv")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) == 8:
                    rows += load_case(work, *parts)
    stages = []
    path = os.path.join(work, "curve.tsv")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) == 4:
                    name, rc, stem, secs = parts
                    st = {"stage": name, "status": rc, "seconds": int(secs) if secs.isdigit() else None}
                    if rc != "0":
                        st["last_log_line"] = last_line(os.path.join(work, stem + ".log"))[:400]
                    stages.append(st)
    try:
        gpu = open(os.path.join(work, "gpu.txt")).read().strip()
    except OSError:
        gpu = "unknown GPU"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    curve_md = None
    if os.path.exists(os.path.join(out, "curve.md")):
        with open(os.path.join(out, "curve.md")) as f:
            curve_md = f.read()
    with open(os.path.join(out, "train.json"), "w") as f:
        json.dump({"schema": 1, "gpu": gpu, "date": now, "rows": rows, "curve_stages": stages,
                   "curve_md": curve_md}, f, indent=2)

    keys = []
    for r in rows:
        k = (r.get("shape"), r.get("mode"), r.get("batch"), r.get("seq"), normal_ckpt(r.get("checkpointing")))
        if k not in keys:
            keys.append(k)

    def find(side, k):
        for r in rows:
            if r.get("side") == side and (r.get("shape"), r.get("mode"), r.get("batch"), r.get("seq"),
                                          normal_ckpt(r.get("checkpointing"))) == k:
                return r
        return None

    def cell(r, get, digits):
        if r is None:
            return "-"
        if r.get("error"):
            return f"error: {short(r['error'])}"
        return fmt(get(r), digits)

    def ok(r, get):
        return get(r) if r is not None and not r.get("error") else None

    tok = lambda r: r.get("tokens_per_s")  # noqa: E731
    mem = lambda r: gib(r.get("peak_mem_bytes"))  # noqa: E731
    mfu = lambda r: r["mfu"] * 100 if r.get("mfu") is not None else None  # noqa: E731
    lines = [
        f"# anyllama training benchmark, {now}",
        "",
        f"GPU: {gpu} (name, memory, driver). Synthetic models of the named shapes, random weights, bf16; "
        "each step one batch of random sequences (forward, loss, backward, AdamW lr 1e-4); median step "
        "after 2 warm-up steps. LoRA: r 16, alpha 16, all seven projections. Checkpointing on = per layer "
        "(ours `--checkpointing layer`; HF gradient checkpointing, use_reentrant False). Peer: HF transformers "
        "(+ PEFT for LoRA), SDPA, fused AdamW. Peak memory: the largest device allocation total over the "
        "measured steps. MFU: model FLOPs per step (bench/peers/hf_peft_train.py's docstring) / step time / "
        "a bf16 8192^3 GEMM rate measured by each side. Ratios are ours / HF: above 1 is better for tok/s, "
        "below 1 for memory.",
        "",
        "| shape | mode | batch | seq | ckpt | ours tok/s | HF tok/s | ours/HF | ours peak GiB | HF peak GiB "
        "| mem ours/HF | ours MFU % | HF MFU % |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in keys:
        o, p = find("ours", k), find("peer", k)
        shape, mode, batch, seq, ck = k
        lines.append("| " + " | ".join([
            str(shape), str(mode), str(batch), str(seq), str(ck),
            cell(o, tok, 0), cell(p, tok, 0), fmt(ratio(ok(o, tok), ok(p, tok)), 2),
            cell(o, mem, 2), cell(p, mem, 2), fmt(ratio(ok(o, mem), ok(p, mem)), 2),
            cell(o, mfu, 1), cell(p, mfu, 1),
        ]) + " |")
    lines.append("")
    gemm = {}
    for side in ("ours", "peer"):
        vals = sorted(r["gemm_tflops"] for r in rows if r.get("side") == side and r.get("gemm_tflops"))
        gemm[side] = vals[len(vals) // 2] if vals else None
    if any(gemm.values()):
        lines += [f"GEMM rate (median over rows): ours {fmt(gemm['ours'], 0)} TFLOP/s, "
                  f"HF {fmt(gemm['peer'], 0)} TFLOP/s.", ""]
    errs = [r for r in rows if r.get("error")]
    if errs:
        lines += ["Errors:", ""]
        for r in errs:
            lines.append(f"- {r.get('side')} {r.get('shape')} {r.get('mode')} batch {r.get('batch')} seq "
                         f"{r.get('seq')} ckpt {normal_ckpt(r.get('checkpointing'))}: **{short(r['error'], 400)}**")
        lines.append("")
    if stages:
        lines += ["Loss-curve stages: " + "; ".join(
            f"{s['stage']} " + ("ok" if s["status"] == "0" else s["status"] if s["status"].startswith("skipped")
                                else f"exit {s['status']} ({TIMEOUT_CODES.get(s['status'], 'failed')})")
            + (f" ({s['seconds']} s)" if s.get("seconds") is not None else "") for s in stages) + ".", ""]
        for s in stages:
            if s.get("last_log_line"):
                lines.append(f"- {s['stage']}: {short(s['last_log_line'], 400)}")
        lines.append("")
    if curve_md:
        lines += ["---", "", curve_md.replace("# Loss curve", "## Loss curve", 1)]
    text = "\n".join(lines).rstrip("\n") + "\n"
    with open(os.path.join(out, "train.md"), "w") as f:
        f.write(text)
    print(text, end="")


if __name__ == "__main__":
    main()
