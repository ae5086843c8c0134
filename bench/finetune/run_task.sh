#!/usr/bin/env bash
# The "real task" run of our fine-tuning, on a CUDA machine (an H200: about 4-5 minutes):
# teach SmolLM2-135M-Instruct to answer every question as exactly one JSON object
# {"answer": "...", "topic": "..."} (the task: make_dataset.py; the check: check.py), with
# `anyllama train` (LoRA on the f32 HF folder, and QLoRA on the Q4_1 GGUF itself), and compare
# what `anyllama chat` and transformers + PEFT answer on 28 held-out prompts.
#
#   MODEL_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf OUT=/tmp/out bash bench/finetune/run_task.sh
#
# Needs: `anyllama` with the cuda feature (on PATH, or $ANYLLAMA_BIN), python3 with torch,
# transformers and peft ($PYTHON), no network. Steps (each timed; summary.md has the table):
#  a convert   anyllama convert "$MODEL_GGUF" WORK/smollm2-hf --dtype f32
#  b base-ours anyllama chat -m WORK/smollm2-hf --backend cuda -p PROMPT --temp 0 -n 64, per prompt
#  c train     anyllama train -m WORK/smollm2-hf --data train.jsonl --out WORK/lora --backend cuda
#              --lora-r 16 --lora-alpha 32 --lr $LR --epochs $EPOCHS --batch 8 --seq 512
#              --save-every 0 --eval heldout.jsonl --eval-every 60 --log-every 10 --progress lines
#              (+ $TRAIN_FLAGS). No --packing: it would put batch*seq = 4096 tokens (~77 of these
#              ~53-token samples) in each step, 7 steps an epoch; unpacked, 8 samples a step is
#              60 steps an epoch, 180 in all, the setting HF + PEFT learns this task with
#              (peft_train.py on an H200: 28/28 held-out replies in the format, base 0/28).
#  d lora-ours same chat as b with --lora WORK/lora
#  e *-hf      peft_generate.py (transformers + PeftModel.from_pretrained, f32, cuda greedy)
#              with our adapter and without one
#  f           check.py rates for every run; identical greedy replies ours vs HF (in summary)
#  g qlora     the same train with -m "$MODEL_GGUF" --out WORK/qlora --epochs $QLORA_EPOCHS,
#              then chat -m "$MODEL_GGUF" --lora WORK/qlora (qlora-ours), and PEFT with that
#              adapter on the f32 folder (qlora-hf: the same base weights, dequantized)
#  - hfref     only with HF_TRAIN=1 (about +90 s): peft_train.py's reference adapter, answered
#              by PEFT (lora-hfref) and by anyllama chat --lora (hfref-ours)
#  h           $OUT: summary.md, replies.jsonl (every run's reply per prompt), loss.png and
#              log.jsonl (LoRA run), qlora-loss.png, qlora-log.jsonl, logs.txt (7 files)
# Chat start-up is about 1 s a call: 28 prompts x 3 chat runs is ~1.5-2 min of the total; the
# first cuda call also compiles the kernels once (NVRTC, cached on disk), counted in base-ours.
# On a failure the script stops, says which step failed with the end of its log, and still
# writes $OUT from what ran (summary.md names the failed step). WORK (default: a new
# /tmp/finetune.XXXXXX, kept) holds everything else.
# Env: MODEL_GGUF (required), OUT (default /tmp/finetune-out), WORK, ANYLLAMA_BIN, PYTHON,
# EPOCHS (3), LR (2e-4), QLORA_EPOCHS (3), TRAIN_FLAGS (extra `anyllama train` flags), HF_TRAIN,
# LIMIT (only the first N held-out prompts: a quick check of the script).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
: "${MODEL_GGUF:?set MODEL_GGUF to the SmolLM2-135M-Instruct Q4_1 .gguf file}"
OUT=${OUT:-/tmp/finetune-out}
WORK=${WORK:-$(mktemp -d /tmp/finetune.XXXXXX)}
BIN=${ANYLLAMA_BIN:-anyllama}
PY=${PYTHON:-python3}
EPOCHS=${EPOCHS:-3}
LR=${LR:-2e-4}
QLORA_EPOCHS=${QLORA_EPOCHS:-3}
read -r -a train_flags <<< "${TRAIN_FLAGS:-}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" "$WORK/replies" "$WORK/logs"
: > "$WORK/timings.tsv"
start=$SECONDS
step_name="setup"
step_log=""
step_t=$SECONDS

# step NAME LOG: start a timed step whose output goes to LOG (shown when it fails).
step() {
  step_name=$1 step_log=$2 step_t=$SECONDS
  echo "== $step_name ($((SECONDS - start))s in)"
}
step_done() {
  printf '%s\t%s\n' "$step_name" "$((SECONDS - step_t))" >> "$WORK/timings.tsv"
  echo "   $step_name: $((SECONDS - step_t))s"
}

finish() {
  local rc=$? failed=""
  set +e
  if [ "$rc" -ne 0 ]; then
    failed=$step_name
    echo "!! FAILED in step '$step_name' (exit $rc)"
    [ -n "$step_log" ] && [ -f "$step_log" ] && tail -n 20 "$step_log" | sed 's/^/!! /'
  fi
  # h: what goes to $OUT (at most 8 files)
  "$PY" "$here/summarize.py" --work "$WORK" --out "$OUT" --heldout "$here/heldout.jsonl" \
    --timings "$WORK/timings.tsv" ${failed:+--failed "$failed"} \
    || echo "!! summarize.py failed too"
  cp "$WORK/lora/loss.png" "$OUT/loss.png" 2>/dev/null
  cp "$WORK/lora/log.jsonl" "$OUT/log.jsonl" 2>/dev/null
  cp "$WORK/qlora/loss.png" "$OUT/qlora-loss.png" 2>/dev/null
  cp "$WORK/qlora/log.jsonl" "$OUT/qlora-log.jsonl" 2>/dev/null
  for f in "$WORK"/logs/*; do
    [ -f "$f" ] && { echo "==== ${f##*/}"; cat "$f"; }
  done > "$OUT/logs.txt" 2>/dev/null
  echo "== total $((SECONDS - start))s; $OUT: $(cd "$OUT" && ls | tr '\n' ' ')(work: $WORK)"
  exit "$rc"
}
trap finish EXIT

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  echo "anyllama: $(command -v "$BIN" || echo "$BIN (not found)")"
  "$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "cuda", torch.cuda.is_available())'
} > "$WORK/logs/env.txt" 2>&1 || true
cat "$WORK/logs/env.txt"
command -v "$BIN" > /dev/null || { echo "no anyllama binary: put it on PATH or set ANYLLAMA_BIN"; exit 1; }
[ -f "$MODEL_GGUF" ] || { echo "MODEL_GGUF=$MODEL_GGUF: no such file"; exit 1; }
"$PY" -c 'import json, sys
rows = [json.loads(l) for l in open(sys.argv[1], encoding="utf-8") if l.strip()]
for r in rows[: int(sys.argv[2]) or None]:
    assert "\n" not in r["prompt"]
    print(r["prompt"])' "$here/heldout.jsonl" "${LIMIT:-0}" > "$WORK/prompts.txt"
echo "   $(wc -l < "$WORK/prompts.txt") held-out prompts, $(wc -l < "$here/train.jsonl") training lines"

# chat_all NAME MODEL [FLAGS...]: `anyllama chat` once per held-out prompt -> replies/NAME.jsonl
chat_all() {
  local name=$1 model=$2 i=0 prompt
  shift 2
  local dir=$WORK/chat/$name
  mkdir -p "$dir"
  while IFS= read -r prompt; do
    i=$((i + 1))
    if ! "$BIN" chat -m "$model" "$@" --backend cuda -p "$prompt" --temp 0 -n 64 \
        < /dev/null > "$dir/$i.txt" 2> "$dir/$i.err"; then
      cp "$dir/$i.err" "$step_log"
      echo "anyllama chat failed on prompt $i: $prompt" >> "$step_log"
      return 1
    fi
  done < "$WORK/prompts.txt"
  { echo "-- $name, prompt 1's stderr:"; cat "$dir/1.err"; } > "$step_log"
  "$PY" - "$WORK/prompts.txt" "$dir" > "$WORK/replies/$name.jsonl" <<'PY'
import json, sys
prompts = open(sys.argv[1], encoding="utf-8").read().split("\n")[:-1]
for i, p in enumerate(prompts, 1):
    reply = open(f"{sys.argv[2]}/{i}.txt", encoding="utf-8", errors="replace").read()
    print(json.dumps({"prompt": p, "reply": reply}, ensure_ascii=False))
PY
  "$PY" "$here/check.py" "$WORK/replies/$name.jsonl" --label "$name" --quiet | grep -v '^RESULT' | sed 's/^/   /'
}

# peft_all NAME ADAPTER|--no-adapter: transformers (+ PEFT) greedy replies -> replies/NAME.jsonl
peft_all() {
  local name=$1 adapter=$2
  local args=(--adapter "$adapter")
  [ "$adapter" = --no-adapter ] && args=(--no-adapter)
  "$PY" "$here/peft_generate.py" --base "$WORK/smollm2-hf" "${args[@]}" \
    --prompts "$here/heldout.jsonl" --out "$WORK/replies/$name.jsonl" --max-new-tokens 64 --limit "${LIMIT:-0}" \
    > "$step_log" 2>&1
  tail -n 1 "$step_log" | sed 's/^/   /'
  "$PY" "$here/check.py" "$WORK/replies/$name.jsonl" --label "$name" --quiet | grep -v '^RESULT' | sed 's/^/   /'
}

# train_run NAME MODEL OUTDIR EPOCHS: anyllama train, its log's tail printed and kept
train_run() {
  local name=$1 model=$2 dir=$3 epochs=$4
  "$BIN" train -m "$model" --data "$here/train.jsonl" --out "$dir" --backend cuda \
    --lora-r 16 --lora-alpha 32 --lr "$LR" --epochs "$epochs" --batch 8 --seq 512 \
    --save-every 0 --eval "$here/heldout.jsonl" --eval-every 60 --log-every 10 \
    --progress lines "${train_flags[@]}" > "$step_log" 2>&1
  tail -n 12 "$step_log" > "$WORK/$name-train.tail"
  sed 's/^/   /' "$WORK/$name-train.tail"
  for f in adapter_model.safetensors adapter_config.json; do
    [ -f "$dir/$f" ] || { echo "no $dir/$f after training" >> "$step_log"; return 1; }
  done
}

step convert "$WORK/logs/a-convert.log"
"$BIN" convert "$MODEL_GGUF" "$WORK/smollm2-hf" --dtype f32 > "$step_log" 2>&1
step_done

step base-ours "$WORK/logs/b-base-ours.log"
chat_all base-ours "$WORK/smollm2-hf"
step_done

step train-lora "$WORK/logs/c-train-lora.log"
train_run lora "$WORK/smollm2-hf" "$WORK/lora" "$EPOCHS"
step_done

step lora-ours "$WORK/logs/d-lora-ours.log"
chat_all lora-ours "$WORK/smollm2-hf" --lora "$WORK/lora"
step_done

step lora-hf "$WORK/logs/e-lora-hf.log"
peft_all lora-hf "$WORK/lora"
step_done

step base-hf "$WORK/logs/e-base-hf.log"
peft_all base-hf --no-adapter
step_done

step train-qlora "$WORK/logs/g-train-qlora.log"
train_run qlora "$MODEL_GGUF" "$WORK/qlora" "$QLORA_EPOCHS"
step_done

step qlora-ours "$WORK/logs/g-qlora-ours.log"
chat_all qlora-ours "$MODEL_GGUF" --lora "$WORK/qlora"
step_done

step qlora-hf "$WORK/logs/g-qlora-hf.log"
peft_all qlora-hf "$WORK/qlora"
step_done

if [ "${HF_TRAIN:-0}" = 1 ]; then
  step train-hfref "$WORK/logs/x-train-hfref.log"
  "$PY" "$here/peft_train.py" --base "$WORK/smollm2-hf" --data "$here/train.jsonl" \
    --out "$WORK/hfref" --epochs "$EPOCHS" --lr "$LR" --batch 8 > "$step_log" 2>&1
  tail -n 6 "$step_log" > "$WORK/hfref-train.tail"
  sed 's/^/   /' "$WORK/hfref-train.tail"
  step_done
  step lora-hfref "$WORK/logs/x-lora-hfref.log"
  peft_all lora-hfref "$WORK/hfref"
  step_done
  step hfref-ours "$WORK/logs/x-hfref-ours.log"
  chat_all hfref-ours "$WORK/smollm2-hf" --lora "$WORK/hfref"
  step_done
fi
step summary ""
