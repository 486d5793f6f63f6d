#!/usr/bin/env bash
# The demo: a tiny random Qwen2.5-VL checkpoint built locally, trained on stage 1 (packed text:
# this Python's standard library sources) on CPU. Metrics land in outputs/tiny-stage1/metrics.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python tools/make_tiny_checkpoint.py --output outputs/tiny-qwen2_5_vl
rm -f outputs/tiny-stage1/metrics.jsonl
.venv/bin/tune run omnilong_full --config configs/tiny/stage1_text.yaml "$@"
.venv/bin/python - <<'PY'
import json
rows = [json.loads(line) for line in open("outputs/tiny-stage1/metrics.jsonl")]
first, last = rows[0]["loss"], rows[-1]["loss"]
print(f"demo: {len(rows)} steps, loss {first:.3f} -> {last:.3f} (outputs/tiny-stage1/metrics.jsonl)")
PY
