#!/usr/bin/env bash
# The whole pipeline on the bundled defaults: train -> evaluate -> export -> serve -> load test.
# Everything lands in output/demo (see README, "What make demo leaves behind").
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=${DEMO_OUT:-output/demo}
PORT=${DEMO_PORT:-50151}
HTTP_PORT=${DEMO_HTTP_PORT:-50152}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

rm -rf "$OUT"
mkdir -p "$OUT"
step() { printf '\n==> %s\n' "$*"; }

step "train: bundled all-MiniLM-L6-v2 on the bundled cooking pairs (3 epochs, 60 steps)"
$BIN/embedforge train --num-epochs 3 --save-steps 20 --warmup-steps 6 --save-path "$OUT/model"

step "evaluate: every checkpoint on the bundled test set, best by validation loss"
$BIN/embedforge evaluate --save-path "$OUT/model" --select-best \
    --test-path embedforge/sample_data/test.jsonl
$BIN/embedforge evaluate --model-name all-MiniLM-L6-v2 --test-path embedforge/sample_data/test.jsonl \
    --output "$OUT/base_model_report.json" | tail -n 3

step "export: best checkpoint to ONNX fp32 + int8, parity against PyTorch"
$BIN/embedforge export --save-path "$OUT/model" --precision fp32 --precision int8

step "serve: gRPC on 127.0.0.1:$PORT, the OpenAI-compatible HTTP API on 127.0.0.1:$HTTP_PORT (background)"
$BIN/embedforge serve --save-path "$OUT/model" --port "$PORT" --http-port "$HTTP_PORT" > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT

step "embed: one call from the command line"
$BIN/embedforge embed --target "127.0.0.1:$PORT" --wait-ready 60 "how long to boil an egg" | cut -c1-160

step "openai SDK: one call to POST /v1/embeddings"
$BIN/python - "$HTTP_PORT" <<'PY'
import sys

import openai

client = openai.OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="unused")
model = client.models.list().data[0].id
response = client.embeddings.create(model=model, input=["how long to boil an egg", "eggs boil in 7 minutes"])
for item in response.data:
    print(f"model {response.model}  input {item.index}  dim {len(item.embedding)}  "
          f"[{', '.join(f'{x:.4f}' for x in item.embedding[:5])}, ...]")
print(f"usage: {response.usage.prompt_tokens} tokens")
PY

step "loadtest: 8 concurrent callers, 8 texts a call, 5 s"
$BIN/embedforge loadtest --target "127.0.0.1:$PORT" --concurrency 8 --batch 8 --duration 5 --warmup 1 \
    --data embedforge/sample_data/test.jsonl --output "$OUT/loadtest.json" --plot "$OUT/loadtest.png"

step "summary"
$BIN/python scripts/demo_summary.py "$OUT"
