#!/usr/bin/env bash
# The benchmark on a GPU machine in one command (well under 10 minutes): `anyllama bench` on the
# wgpu and CUDA backends and the HF transformers peer (bench/peers/hf_transformers.py) on
# synthetic models of real shapes, merged by bench/merge.py into $OUT/bench.md (one markdown
# table) and $OUT/bench.json (every row). Run from the project root with `anyllama` on PATH
# (built with --features cuda for the CUDA rows), e.g. on the project's GPU machine:
#   bash .device/on-device.sh bash bench/run_device.sh
# A backend or peer that fails or runs out of time gets a row saying so; the script goes on.
# BENCH_CHECK=1 runs a quick version on the tiny shape without a GPU (to check the script).
# BENCH_DEADLINE_S (default 520) bounds the whole run; each case has a soft time budget
# (--max-seconds) and a hard `timeout` a little above it.
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
here=$(cd "$(dirname "$0")" && pwd)
deadline=${BENCH_DEADLINE_S:-520}
start=$SECONDS
python=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$work/gpu.txt" 2>/dev/null || echo "unknown GPU" > "$work/gpu.txt"
: > "$work/cases.tsv"

left() { echo $((deadline - (SECONDS - start))); }

# run KIND SHAPE DTYPE BACKEND SECONDS CMD...: one case, with a soft budget of SECONDS (cut to the
# time left) passed as --max-seconds, recorded in cases.tsv for the merge step.
run() {
  local kind=$1 shape=$2 dtype=$3 backend=$4 secs=$5; shift 5
  local name="$kind-$shape-$dtype-$backend" l rc
  l=$(left)
  if ((l < secs / 2 + 15)); then
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$kind" "$shape" "$dtype" "$backend" "skipped" "$name" >> "$work/cases.tsv"
    echo "== $name: skipped (${l}s left)"
    return
  fi
  ((secs > l - 15)) && secs=$((l - 15))
  echo "== $name (budget ${secs}s, ${l}s left)"
  timeout $((secs + 30)) "$@" --max-seconds "$secs" > "$work/$name.json" 2> "$work/$name.log"
  rc=$?
  tail -n 3 "$work/$name.log" | sed 's/^/   /'
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$kind" "$shape" "$dtype" "$backend" "$rc" "$name" >> "$work/cases.tsv"
}

ours() { # SHAPE DTYPE BACKEND SECONDS [extra flags]
  local shape=$1 dtype=$2 backend=$3 secs=$4; shift 4
  run anyllama "$shape" "$dtype" "$backend" "$secs" \
    anyllama bench --synthetic "$shape" --dtype "$dtype" --backend "$backend" --json "$@"
}

peer() { # SHAPE VARIANT SECONDS [extra flags]
  local shape=$1 variant=$2 secs=$3; shift 3
  run transformers "$shape" bf16 "$variant" "$secs" \
    "$python" "$here/peers/hf_transformers.py" --shape "$shape" "$@"
}

if [ "${BENCH_CHECK:-0}" = 1 ]; then
  # A quick check of this script and merge.py without a GPU: the tiny shape, small counts.
  q=(--runs 1 --gen 8 --prefill 64 --long-ctx 256 --copy-mib 16)
  ours tiny bf16 cpu 20 "${q[@]}"
  ours tiny bf16 wgpu 20 "${q[@]}"
  ours tiny bf16 cuda 20 "${q[@]}"
  ours tiny q4_k wgpu 20 "${q[@]}"
  peer tiny eager 40 "${q[@]}" --device cpu
else
  # Most important first: the 8B rows carry most of the comparisons.
  ours llama-3.1-8b bf16 cuda 55 --runs 3
  ours llama-3.1-8b bf16 wgpu 55 --runs 3
  peer llama-3.1-8b eager 55 --runs 3
  ours llama-3.2-1b bf16 cuda 30
  ours llama-3.2-1b bf16 wgpu 30
  peer llama-3.2-1b eager 35
  ours smollm2-135m bf16 cuda 20
  ours smollm2-135m bf16 wgpu 20
  peer smollm2-135m eager 25
  ours llama-3.1-8b q8_0 cuda 30 --runs 3 --long-ctx 0
  ours llama-3.1-8b q8_0 wgpu 30 --runs 3 --long-ctx 0
  ours llama-3.1-8b q4_k cuda 30 --runs 3 --long-ctx 0
  ours llama-3.1-8b q4_k wgpu 30 --runs 3 --long-ctx 0
  # Compiled decoding last: compiling takes a while and is only worth it if time is left.
  peer llama-3.2-1b compile 70 --compile --no-eager --runs 3 --long-ctx 0
fi

echo "== merge ($(($SECONDS - start))s so far)"
"$python" "$here/merge.py" "$work" "$out"
cp "$work/cases.tsv" "$out/cases.tsv"
tar -C "$work" -czf "$out/logs.tar.gz" . 2>/dev/null
echo "total $((SECONDS - start))s; wrote $out/bench.md and $out/bench.json"
