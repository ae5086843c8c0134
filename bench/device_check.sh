#!/usr/bin/env bash
# One run on the GPU machine (see ../shared/device/README.md): the whole test suite on every
# backend, then a synthetic Llama-3.2-1B-shaped model in f16 (HF folder) and Q8_0 (GGUF made by
# `anyllama convert`) through wgpu, with decode speed and GPU memory. Writes logs under $OUT.
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p "$out"
export PIP_NO_INDEX=1   # no network there: the real-model tests skip instead of retrying pip
anyllama devices | tee "$out/devices.txt"

ANYLLAMA_BIN=$(command -v anyllama) run-tests 2>&1 | tee "$out/tests.log" | grep -E '^== |test result|SKIPPED|FAILED|panicked|executables failed'

shape=${SHAPE:-llama-3.2-1b}
python3 bench/make_synthetic.py "$shape" /tmp/synth-f16 >/dev/null 2>&1 || { echo "synthetic model failed"; exit 1; }
anyllama convert /tmp/synth-f16 /tmp/synth-q8_0.gguf --dtype q8_0 2>&1 | tail -1
ls -la /tmp/synth-f16 /tmp/synth-q8_0.gguf | tee -a "$out/speed.txt"
for m in /tmp/synth-f16 /tmp/synth-q8_0.gguf; do
  for backend in wgpu; do
    (while sleep 0.5; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; done) > /tmp/mem.txt &
    mon=$!
    echo "== $shape $(basename $m) on $backend" | tee -a "$out/speed.txt"
    anyllama generate -m "$m" -p "Hello world, this is a speed run." -n 256 --temp 0 --ignore-eos \
      --backend $backend --verbose -c 1024 2>&1 >/dev/null | grep -E 'loaded|decode' | tee -a "$out/speed.txt"
    kill $mon
    echo "peak GPU memory used (MiB, whole device): $(sort -n /tmp/mem.txt | tail -1)" | tee -a "$out/speed.txt"
  done
done
