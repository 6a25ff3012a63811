#!/usr/bin/env bash
# lm-evaluation-harness against a running-here qalora server, offline.
#
# Scores a small local multiple-choice task (loglikelihood requests: echo +
# logprobs over /v1/completions, as lm-eval's `local-completions` model sends
# them) on the default model, then prints lm-eval's table and each question's
# per-choice loglikelihoods. lm_eval goes into its own virtualenv
# ($LM_EVAL_VENV, default /tmp/qalora-lm-eval-venv) on first use, from the
# package index; datasets come from a local JSONL file, so no hub access.
#
#   bash scripts/lm_eval_check.sh [--port 8011]
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=8011
if [[ "${1:-}" == "--port" ]]; then PORT="$2"; fi
VENV="${QALORA_VENV:-.venv}"
LM_EVAL_VENV="${LM_EVAL_VENV:-/tmp/qalora-lm-eval-venv}"
WORK="$(mktemp -d)"
trap 'if [[ -n "${SERVER_PID:-}" ]]; then kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; fi; rm -rf "$WORK"' EXIT

if [[ ! -x "$LM_EVAL_VENV/bin/lm_eval" ]]; then
  python3 -m venv "$LM_EVAL_VENV"
  "$LM_EVAL_VENV/bin/pip" install -q "lm_eval[api]" transformers
fi

MODEL_DIR="$("$VENV/bin/python" -c 'from qalora_runtime.formats.default_model import ensure_default_model as e; print(e())' | tail -1)"

# The task: lm-eval puts its target delimiter (" ") between question and choice.
cat > "$WORK/qalora_local_mc.yaml" <<EOF
task: qalora_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: $WORK/data.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
EOF
cat > "$WORK/data.jsonl" <<'EOF'
{"question": "The capital of France is", "choices": ["Paris", "London", "Berlin"], "answer": 0}
{"question": "The capital of Japan is", "choices": ["Madrid", "Tokyo", "Cairo"], "answer": 1}
{"question": "Water freezes at zero degrees", "choices": ["Fahrenheit", "Celsius", "Kelvin"], "answer": 1}
{"question": "One, two, three, four,", "choices": ["five", "seven", "nine"], "answer": 0}
{"question": "The sun rises in the", "choices": ["west", "north", "east"], "answer": 2}
{"question": "The opposite of hot is", "choices": ["cold", "tall", "blue"], "answer": 0}
{"question": "A week has seven", "choices": ["days", "months", "years"], "answer": 0}
EOF

"$VENV/bin/qalora" serve "$MODEL_DIR" --host 127.0.0.1 --port "$PORT" --served-model-name smollm2 \
  > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log"; exit 1; }
  sleep 1
done

HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 "$LM_EVAL_VENV/bin/lm_eval" --model local-completions \
  --model_args "model=smollm2,base_url=http://127.0.0.1:$PORT/v1/completions,tokenizer_backend=huggingface,tokenizer=$MODEL_DIR,num_concurrent=1,max_retries=1" \
  --tasks qalora_local_mc --include_path "$WORK" --log_samples --output_path "$WORK/out" 2>&1 | grep -E '^\|'

"$VENV/bin/python" - "$WORK/out" <<'EOF'
import glob, json, sys
for line in open(glob.glob(f"{sys.argv[1]}/*/samples_*.jsonl")[0]):
    d = json.loads(line)
    scores = ", ".join(f"{c}: {float(r[0][0]):.3f}" for c, r in zip(d["doc"]["choices"], d["resps"]))
    print(f"{d['doc']['question']!r:36} {scores}  (target {d['doc']['choices'][int(d['target'])]!r})")
EOF
