#!/usr/bin/env bash
# The three evaluations on CPU, on the demo's stage-3 model (run scripts/demo.sh first) or on
# the checkpoint given as first argument: NIAH in Pride and Prejudice (two needles per cell),
# V-NIAH on a tiny generated video with a one-colour needle, Video-MME on a tiny Video-MME-shaped
# folder. Results (results.json, heatmaps with matplotlib) in outputs/tiny-eval/.
#
#   bash scripts/demo_eval.sh [llava_onevision | <checkpoint>]
#
# With llava_onevision, the LLaVA-OneVision demo's stage-3 model (bash scripts/demo.sh
# llava_onevision first), results in outputs/tiny-llava_ov-eval/. Any checkpoint is evaluated
# with its own family (its config.json's model_type).
set -euo pipefail
cd "$(dirname "$0")/.."
checkpoint="${1:-outputs/tiny-stage3/hf}"
out=outputs/tiny-eval
if [ "$checkpoint" = llava_onevision ]; then
  checkpoint=outputs/tiny-llava_ov-stage3/hf out=outputs/tiny-llava_ov-eval
fi
.venv/bin/python tools/make_tiny_videos.py --output outputs/tiny-videos
rm -rf "$out"
.venv/bin/python tools/make_tiny_eval_data.py --videos outputs/tiny-videos --output "$out/data"
common=(--checkpoint "$checkpoint" --dtype fp32 --device cpu)
.venv/bin/python tools/evaluate.py niah "${common[@]}" --output "$out/niah" --lengths 256 512 1024 \
  --depths 0 0.5 1 --needles 2
.venv/bin/python tools/evaluate.py vniah "${common[@]}" --output "$out/vniah" \
  --haystack-video outputs/tiny-videos/video_005.mp4 --needle-image "$out/data/needle.png" \
  --question "What colour is the frame that shows no square?" --answer red --frame-counts 2 4 6 --fps 2
.venv/bin/python tools/evaluate.py videomme "${common[@]}" --output "$out/videomme" --root "$out/data/videomme" \
  --max-frames 8
