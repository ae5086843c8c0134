#!/usr/bin/env bash
# The serving load benchmark on a GPU machine: synthetic Llama-3.2-1B and Llama-3.1-8B shapes in
# bf16 (random weights; the embedding sized to SmolLM2's 49,152-token tokenizer so that every
# id the random model emits streams as text), served by `anyllama serve` on each backend, loaded
# by serve_load.py with 1, 8, 32 and 64 concurrent streams of 128-token prompts and 256-token
# answers; beside each, `anyllama bench` decode on the same folder (128-token prompt, 256 tokens)
# for the one-stream comparison. Writes $OUT/serve.md and $OUT/serve.json.
#
# Env: ANYLLAMA_BIN (default: anyllama on PATH), TOKENIZER (an HF folder with tokenizer.json,
# e.g. `anyllama convert` of the SmolLM2 GGUF), WORK (scratch, default /tmp/serve-bench),
# BACKENDS (default "cuda wgpu"), SHAPES (default "llama-3.2-1b llama-3.1-8b"), STREAMS.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${ANYLLAMA_BIN:-anyllama}
work=${WORK:-/tmp/serve-bench}
out=${OUT:?set OUT}
streams=${STREAMS:-1,8,32,64}
mkdir -p "$work" "$out"
port=18123
for shape in ${SHAPES:-llama-3.2-1b llama-3.1-8b}; do
  [ -f "$work/$shape/config.json" ] ||
    python3 "$here/make_synthetic.py" "$shape" "$work/$shape" --dtype bfloat16 \
      --tokenizer "${TOKENIZER:?set TOKENIZER}" --vocab 49152 >"$work/make-$shape.log" 2>&1 ||
      { tail -5 "$work/make-$shape.log"; exit 1; }
  for backend in ${BACKENDS:-cuda wgpu}; do
    label="$backend $shape"
    "$bin" bench -m "$work/$shape" --backend "$backend" --prefill 0 --long-ctx 0 --prompt 128 \
      --gen 256 --runs 3 --json >"$work/bench-$backend-$shape.json" 2>"$work/bench-$backend-$shape.log" ||
      { echo "bench failed: $label"; tail -5 "$work/bench-$backend-$shape.log"; }
    "$bin" serve -m "$work/$shape" --backend "$backend" --port $port --max-seqs 64 --ctx 1024 \
      2>"$work/serve-$backend-$shape.log" &
    pid=$!
    for _ in $(seq 600); do
      grep -q "listening on" "$work/serve-$backend-$shape.log" && break
      kill -0 $pid 2>/dev/null || break
      sleep 0.2
    done
    python3 "$here/serve_load.py" --url "http://127.0.0.1:$port" --streams "$streams" \
      --label "$label" --json "$work/load-$backend-$shape.json" ||
      { echo "load failed: $label"; tail -5 "$work/serve-$backend-$shape.log"; }
    kill $pid 2>/dev/null || true
    wait $pid 2>/dev/null || true
    port=$((port + 1))
  done
done
python3 - "$work" "$out" <<'PY'
import glob, json, os, sys
work, out = sys.argv[1:]
rows = []
for f in sorted(glob.glob(f"{work}/load-*.json")):
    backend, shape = os.path.basename(f)[5:-5].split("-", 1)
    load = json.load(open(f))
    bench = f"{work}/bench-{backend}-{shape}.json"
    decode = None
    if os.path.exists(bench) and os.path.getsize(bench):
        decode = json.load(open(bench))["rows"][0]["decode_tok_s"]
    rows.append(dict(backend=backend, shape=shape, load=load, bench_decode_tok_s=decode,
                     bench_raw=bench))
json.dump(rows, open(f"{out}/serve.json", "w"), indent=1)
with open(f"{out}/serve.md", "w") as md:
    md.write("| backend | shape | streams | tok/s | x 1 stream | TTFT median / p99 ms | ITL median / p99 ms |\n")
    md.write("|---|---|---|---|---|---|---|\n")
    for r in rows:
        one = r["load"][0]["tok_s"]
        for l in r["load"]:
            md.write(f"| {r['backend']} | {r['shape']} | {l['streams']} | {l['tok_s']:.1f} | "
                     f"{l['tok_s'] / one:.1f} | {l['ttft_median_ms']:.0f} / {l['ttft_p99_ms']:.0f} | "
                     f"{l['itl_median_ms']:.2f} / {l['itl_p99_ms']:.2f} |\n")
    md.write("\n| backend | shape | 1 stream through the server | anyllama bench decode | ratio |\n|---|---|---|---|---|\n")
    for r in rows:
        d = r["bench_decode_tok_s"]
        one = r["load"][0]["tok_s"]
        md.write(f"| {r['backend']} | {r['shape']} | {one:.1f} | {d if d is None else f'{d:.1f}'} | "
                 f"{'-' if not d else f'{one / d:.2f}'} |\n")
print(open(f"{out}/serve.md").read())
PY
