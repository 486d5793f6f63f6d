#!/usr/bin/env bash
# The demo, on CPU, with nothing downloaded: a tiny random Qwen2.5-VL checkpoint built locally,
# then the three stages chained through their Hugging Face exports, as with the 7B configs:
# stage 1 (packed text: this Python's standard-library sources) -> outputs/tiny-stage1/hf,
# stage 2 (chat: questions on standard-library functions answered by their docstrings), which
# starts from it -> outputs/tiny-stage2/hf, and stage 3 (video SFT on short generated videos),
# which starts from that -> outputs/tiny-stage3/hf. Extra arguments go to every stage.
#
#   bash scripts/demo.sh [llava_onevision] [key=value ...]
#
# With llava_onevision first, the same three stages train a tiny random LLaVA-OneVision
# (configs/tiny/llava_ov_*.yaml -> outputs/tiny-llava_ov-stage{1,2,3}).
set -euo pipefail
cd "$(dirname "$0")/.."
model=qwen2_5_vl
if [ "${1:-}" = llava_onevision ] || [ "${1:-}" = qwen2_5_vl ]; then
  model=$1
  shift
fi
if [ "$model" = llava_onevision ]; then
  base=outputs/tiny-llava_ov prefix=llava_ov_ runs=tiny-llava_ov-stage
else
  base=outputs/tiny-qwen2_5_vl prefix= runs=tiny-stage
fi
.venv/bin/python tools/make_tiny_checkpoint.py --model "$model" --output "$base"
.venv/bin/python tools/make_tiny_videos.py --output outputs/tiny-videos
rm -rf "outputs/${runs}1" "outputs/${runs}2" "outputs/${runs}3"
for config in stage1_text stage2_text_sft stage3_video_sft; do
  .venv/bin/tune run omnilong_full --config "configs/tiny/$prefix$config.yaml" "$@"
done
RUNS=$runs .venv/bin/python - <<'PY'
import json
import os
runs = os.environ["RUNS"]
for stage in (1, 2, 3):
    rows = [json.loads(line) for line in open(f"outputs/{runs}{stage}/metrics.jsonl")]
    print(f"demo stage{stage}: {len(rows)} steps, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}, "
          f"model in outputs/{runs}{stage}/hf")
PY
