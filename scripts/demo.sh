#!/usr/bin/env bash
# The demo, on CPU, with nothing downloaded: a tiny random Qwen2.5-VL checkpoint built locally,
# trained on stage 1 (packed text: this Python's standard-library sources), then on stage 3
# (video SFT on short generated videos). Metrics land in outputs/tiny-stage{1,3}/metrics.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python tools/make_tiny_checkpoint.py --output outputs/tiny-qwen2_5_vl
.venv/bin/python tools/make_tiny_videos.py --output outputs/tiny-videos
rm -rf outputs/tiny-stage1 outputs/tiny-stage3
.venv/bin/tune run omnilong_full --config configs/tiny/stage1_text.yaml "$@"
.venv/bin/tune run omnilong_full --config configs/tiny/stage3_video_sft.yaml
.venv/bin/python - <<'PY'
import json
for stage in ("stage1", "stage3"):
    rows = [json.loads(line) for line in open(f"outputs/tiny-{stage}/metrics.jsonl")]
    print(f"demo {stage}: {len(rows)} steps, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f} "
          f"(outputs/tiny-{stage}/metrics.jsonl)")
PY
