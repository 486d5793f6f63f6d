#!/usr/bin/env bash
# The demo, on CPU, with nothing downloaded: a tiny random Qwen2.5-VL checkpoint built locally,
# then the three stages chained through their Hugging Face exports, as with the 7B configs:
# stage 1 (packed text: this Python's standard-library sources) -> outputs/tiny-stage1/hf,
# stage 2 (chat: questions on standard-library functions answered by their docstrings), which
# starts from it -> outputs/tiny-stage2/hf, and stage 3 (video SFT on short generated videos),
# which starts from that -> outputs/tiny-stage3/hf. Extra arguments go to every stage.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python tools/make_tiny_checkpoint.py --output outputs/tiny-qwen2_5_vl
.venv/bin/python tools/make_tiny_videos.py --output outputs/tiny-videos
rm -rf outputs/tiny-stage1 outputs/tiny-stage2 outputs/tiny-stage3
for config in stage1_text stage2_text_sft stage3_video_sft; do
  .venv/bin/tune run omnilong_full --config "configs/tiny/$config.yaml" "$@"
done
.venv/bin/python - <<'PY'
import json
for stage in ("stage1", "stage2", "stage3"):
    rows = [json.loads(line) for line in open(f"outputs/tiny-{stage}/metrics.jsonl")]
    print(f"demo {stage}: {len(rows)} steps, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}, "
          f"model in outputs/tiny-{stage}/hf")
PY
