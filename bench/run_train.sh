#!/usr/bin/env bash
# The training benchmark on a GPU machine in one command (under 10 minutes), most important first:
#  (a) the loss curve: SmolLM2 (the GGUF at $SMOLLM2_GGUF, default /tmp/smollm2.gguf) converted to
#      an f32 HF folder by `anyllama convert`, bench/train_curve.py prepare (300 steps of 4 x 256
#      tokens, LoRA r 16 alpha 32, cosine lr 5e-4), the HF + PEFT reference (f32) and our
#      `train_curve` example on CUDA from the same adapter_init, then train_curve.py compare;
#  (b) training speed: `anyllama bench --train` against bench/peers/hf_peft_train.py, the same
#      shape, mode, batch, sequence length and checkpointing, on synthetic bf16 models;
#  (c) bench/merge_train.py: $OUT/train.md (one table, then the curve) and $OUT/train.json.
# Also in $OUT: curve.md, curve.svg, hf.json, ours.json and logs.tar.gz (every log and row).
# Run from anywhere; e.g. on the project's GPU machine: bash bench/run_train.sh
# Binaries: $ANYLLAMA_BIN and $TRAIN_CURVE_BIN if set, else ${CARGO_TARGET_DIR:-target}/release/
# {anyllama,examples/train_curve}, built with `cargo build --release --features cuda` when missing
# or older than a file under src/ or examples/ (BENCH_NO_BUILD=1: never build; a build counts
# against the deadline), else `anyllama` on PATH.
# A stage or case that fails or runs out of time gets a row or line saying so; the script goes on.
# BENCH_CHECK=1 runs a quick CPU version (tiny-chat for the curve, through a GGUF and back; the
# tiny shape for speed) to check the scripts. BENCH_DEADLINE_S (default 540) bounds the whole
# run; every stage and case has a soft budget (--max-seconds) and a hard `timeout` above it.
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
deadline=${BENCH_DEADLINE_S:-540}
start=$SECONDS
python=${PYTHON:-python3}
check=${BENCH_CHECK:-0}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

left() { echo $((deadline - (SECONDS - start))); }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$work/gpu.txt" 2>/dev/null \
  || echo "unknown GPU (no nvidia-smi)" > "$work/gpu.txt"
: > "$work/cases.tsv"
: > "$work/curve.tsv"

# ---- binaries
target=${CARGO_TARGET_DIR:-$root/target}
bin=${ANYLLAMA_BIN:-$target/release/anyllama}
curve_bin=${TRAIN_CURVE_BIN:-$target/release/examples/train_curve}
stale() { [ ! -x "$1" ] || [ -n "$(find "$root/src" "$root/examples" "$root/Cargo.toml" -newer "$1" -print -quit 2>/dev/null)" ]; }
if [ -z "${ANYLLAMA_BIN:-}${TRAIN_CURVE_BIN:-}" ] && [ "${BENCH_NO_BUILD:-0}" != 1 ] \
    && { stale "$bin" || stale "$curve_bin"; } && command -v cargo > /dev/null; then
  echo "== cargo build --release --features cuda (anyllama, example train_curve)"
  t=$SECONDS
  (cd "$root" && CARGO_TARGET_DIR="$target" cargo build --release --features cuda --bin anyllama --example train_curve) \
    > "$work/build.log" 2>&1 || echo "   build failed: $(tail -n 1 "$work/build.log")"
  echo "   $((SECONDS - t))s"
fi
if [ ! -x "$bin" ] && command -v anyllama > /dev/null; then bin=$(command -v anyllama); fi
echo "== anyllama: $bin; train_curve: $curve_bin"

# ---- (a) the loss curve
dir=$work/curve
mkdir -p "$dir"
curve_failed=""

# stage NAME SECONDS CMD...: one curve stage under a hard timeout of SECONDS (cut to the time
# left), recorded in curve.tsv; skipped when an earlier stage it needs failed ($curve_failed).
stage() {
  local name=$1 secs=$2 l rc t; shift 2
  l=$(left)
  if [ -n "$curve_failed" ] || ((l < 20)); then
    local why=${curve_failed:+skipped: $curve_failed failed}
    printf '%s\t%s\t%s\t%s\n' "$name" "${why:-skipped: no time left}" "curve-$name" "" >> "$work/curve.tsv"
    echo "== curve $name: ${why:-skipped (${l}s left)}"
    return 1
  fi
  ((secs > l - 10)) && secs=$((l - 10))
  echo "== curve $name (limit ${secs}s, ${l}s left)"
  t=$SECONDS
  timeout "$secs" "$@" > "$work/curve-$name.log" 2>&1
  rc=$?
  tail -n 3 "$work/curve-$name.log" | sed 's/^/   /'
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "curve-$name" "$((SECONDS - t))" >> "$work/curve.tsv"
  return $rc
}

if [ "$check" = 1 ]; then
  gguf=$work/tiny-chat.gguf
  stage to-gguf 60 "$bin" convert "$root/tests/fixtures/hf/tiny-chat" "$gguf" --dtype f32 || curve_failed=to-gguf
  model=$work/tiny-chat-hf
  prep=(--steps 8 --batch 2 --seq 32 --warmup 2)
  device=cpu every=2 hf_secs=120 ours_secs=120
else
  gguf=${SMOLLM2_GGUF:-/tmp/smollm2.gguf}
  model=$work/smollm2-hf
  prep=()
  device=cuda every=25 hf_secs=200 ours_secs=200
fi
# f32: the GGUF's values exactly (also for a quantized file: its dequantized values), the same for both sides
stage convert 90 "$bin" convert "$gguf" "$model" --dtype f32 || curve_failed=${curve_failed:-convert}
stage prepare 120 "$python" "$here/train_curve.py" prepare --model "$model" --out "$dir" "${prep[@]}" \
  || curve_failed=${curve_failed:-prepare}
stage hf "$hf_secs" "$python" "$here/train_curve.py" hf --model "$model" --dir "$dir" --device "$device" \
  --max-seconds $((hf_secs - 40))
stage ours "$ours_secs" "$curve_bin" --model "$model" --dir "$dir" --backend "$device"
if [ -f "$dir/hf.json" ] && [ -f "$dir/ours.json" ]; then
  stage compare 60 "$python" "$here/train_curve.py" compare --dir "$dir" --every "$every"
else
  printf '%s\t%s\t%s\t%s\n' compare "skipped: hf.json or ours.json missing" curve-compare "" >> "$work/curve.tsv"
  echo "== curve compare: skipped (hf.json or ours.json missing)"
fi
for f in curve.md curve.svg hf.json ours.json; do [ -f "$dir/$f" ] && cp "$dir/$f" "$out/$f"; done

# ---- (b) speed rows

# run SIDE SHAPE MODE BATCH SEQ CKPT SECONDS CMD...: one case with a soft budget of SECONDS (cut
# to the time left) passed as --max-seconds, recorded in cases.tsv for the merge step.
run() {
  local side=$1 shape=$2 mode=$3 batch=$4 seq=$5 ckpt=$6 secs=$7; shift 7
  local name="$side-$shape-$mode-b$batch-s$seq-ckpt$ckpt" l rc
  l=$(left)
  if ((l < secs / 2 + 15)); then
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$side" "$shape" "$mode" "$batch" "$seq" "$ckpt" skipped "$name" >> "$work/cases.tsv"
    echo "== $name: skipped (${l}s left)"
    return
  fi
  ((secs > l - 15)) && secs=$((l - 15))
  echo "== $name (budget ${secs}s, ${l}s left)"
  timeout $((secs + 30)) "$@" --max-seconds "$secs" > "$work/$name.json" 2> "$work/$name.log"
  rc=$?
  tail -n 2 "$work/$name.log" | sed 's/^/   /'
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$side" "$shape" "$mode" "$batch" "$seq" "$ckpt" "$rc" "$name" >> "$work/cases.tsv"
}

# both SHAPE MODE BATCH SEQ CKPT(on|off) SECONDS [extra flags for both]: ours, then the peer
both() {
  local shape=$1 mode=$2 batch=$3 seq=$4 ckpt=$5 secs=$6; shift 6
  local full=() ours_ckpt=layer
  [ "$mode" = full ] && full=(--full)
  [ "$ckpt" = off ] && ours_ckpt=off
  run ours "$shape" "$mode" "$batch" "$seq" "$ckpt" "$secs" \
    "$bin" bench --train --synthetic "$shape" --dtype bf16 --backend "$device" --batch "$batch" --seq "$seq" \
    --checkpointing "$ours_ckpt" "${full[@]}" --json "$@"
  run peer "$shape" "$mode" "$batch" "$seq" "$ckpt" "$((secs + 5))" \
    "$python" "$here/peers/hf_peft_train.py" --shape "$shape" --mode "$mode" --batch "$batch" --seq "$seq" \
    --checkpointing "$ckpt" --device "$device" "$@"
}

if [ "$check" = 1 ]; then
  both tiny lora 2 64 on 30 --steps 2
  both tiny lora 2 64 off 30 --steps 2
  both tiny full 2 64 on 30 --steps 2
else
  both llama-3.2-1b lora 4 2048 on 40 --steps 10
  both llama-3.2-1b lora 4 2048 off 40 --steps 10
  both llama-3.1-8b lora 1 2048 on 50 --steps 8
  both llama-3.2-1b full 4 2048 on 40 --steps 10
  both llama-3.2-1b lora 1 2048 on 30 --steps 10
  both llama-3.2-1b lora 8 2048 on 45 --steps 8
fi

# ---- (c) merge
echo "== merge ($((SECONDS - start))s so far)"
"$python" "$here/merge_train.py" "$work" "$out"
rm -rf "$dir/batches.json" "$work/smollm2-hf" "$work/tiny-chat-hf" "$work/tiny-chat.gguf"
tar -C "$work" -czf "$out/logs.tar.gz" . 2>/dev/null
echo "total $((SECONDS - start))s; wrote $out/train.md and $out/train.json"
