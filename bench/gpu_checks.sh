#!/usr/bin/env bash
# Every GPU check in one run (where the device machine lacks diffusers, its wheels travel in .whl/).
# Writes its log and results under $OUT. Parts are ordered by priority and each has its own timeout.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
if ! nvidia-smi -L > /dev/null 2>&1; then
  echo "gpu_checks.sh: no NVIDIA GPU here (nvidia-smi -L failed); run it on the device machine (the device tool's run)" >&2
  exit 2
fi
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
if ! python3 -c "import diffusers, transformers" 2> /dev/null; then
  echo "gpu_checks.sh: diffusers or transformers is missing here; put their wheels in .whl/ and carry it with the run" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"

echo "== HEADLINE (the first 8 minutes): sdxl-random fp16 on one GPU"
echo "== FreeScale vs direct at 2048² and 4096²: time and peak (20 steps; restart 0.3 as the paper)"
timeout 120 python3 bench/cascade.py --model sdxl-random --device cuda --stages 1024x1024,2048x2048 --steps 20
timeout 180 python3 bench/cascade.py --model sdxl-random --device cuda --stages 1024x1024,2048x2048,4096x4096 --steps 20
echo "== the step ratio: one FreeScale UNet call against a plain one, 2048² and 4096²"
timeout 90 python3 bench/step_profile.py --device cuda --model sdxl-random --sizes 2048,4096 --repeats 3
echo "== sharded on the GPU (2 ranks over gloo) against one process"
timeout 90 python3 bench/gpu_sharded.py --sdxl-size 4096
echo "== END OF HEADLINE; the rest is ordered by priority"

echo "== tiny cascade on CUDA, twice (reproducibility)"
for run in 1 2; do
  timeout 120 python3 -m renderer.cli --model tiny --prompt "a green creature" --size 1024x1024 --steps 20 --device cuda --quiet --out /tmp/tiny$run.png
done
cmp /tmp/tiny1.png /tmp/tiny2.png && echo "tiny CUDA renders byte-identical"

echo "== exact banded VAE, one worker's share of an 8-worker gang at 4096² and 8192², against the estimate (issue 27)"
for size in 4096 8192; do
  timeout 240 python3 bench/vae_memory.py --model sdxl-random --device cuda --size $size --ranks 1 --share 0.125
done

echo "== clips (issue 26): the toy-video quality benchmark in full (8 seeds, 16 frames, 4x, 30 steps, every variant)"
timeout 420 python3 bench/clip_quality.py --device cuda --seeds 8 --frames 16 --steps 30 --out-dir "$OUT/clip_quality" && \
  python3 bench/clip_quality.py --table --out-dir "$OUT/clip_quality"

echo "== clips (issue 26): sdxl-random-video, 16 frames 1024 -> 2048 fp16, time and peak against --dry-run"
timeout 60 python3 -m renderer.cli --model sdxl-random-video --prompt "a kite" --frames 16 --size 2048x2048 --device cuda \
  --out /tmp/kite.mp4 --dry-run
timeout 400 /usr/bin/time -v python3 -m renderer.cli --model sdxl-random-video --prompt "a kite" --frames 16 --size 2048x2048 \
  --steps 20 --device cuda --quiet --out /tmp/kite.mp4 2>&1 | grep -E "Elapsed|Maximum resident" ; \
  python3 -c "import json; d = json.load(open('/tmp/kite.json')); print('seconds', d['seconds'], 'peak GiB', d['peak_bytes'] / 2**30)"

echo "== clips (issue 26): train toy-video's motion modules on the GPU, 5x the shipped CPU run (its jumps: docs/benchmarks.md)"
timeout 420 python3 -m renderer.toy.train_motion --out "$OUT/toy_motion_weights" --device cuda --threads 16 \
  --clips 512 --steps 6000 --log-every 500

echo "== preflight memory estimate against sdxl-random's measured peak (issue 9)"
timeout 300 python3 bench/preflight_memory.py --model sdxl-random --device cuda --sizes 2048,4096

echo "== train the toy model on the GPU"
timeout 330 python3 -m renderer.toy.train --out renderer/models/toy_weights --device cuda --threads 16 \
  --vae-groups 8 --vae-channels 32,64,128,112 \
  --vae-steps 1500 --unet-steps 4000 --batch 16 --log-every 500 && \
  tar -cf /tmp/toy.tar -C renderer/models toy_weights && split -b 15M /tmp/toy.tar "$OUT/toy.tar.part-"

echo "== quality benchmark on the GPU, the toy's settings (restart 0.8)"
timeout 300 python3 bench/quality.py --device cuda --seeds 8 --steps 50 --set restart_fraction=0.8 --out-dir "$OUT/quality"

echo "== 8-GPU time model (issue 12): the H200 fit of docs/benchmarks.md; rerun with this card's FreeScale"
echo "   forward times from the step profile above: python3 bench/time_model.py --measured 2048=S,4096=S"
python3 bench/time_model.py

echo "== the step by part (issue 38): where a FreeScale step's extra time goes on this card"
timeout 200 python3 bench/step_profile.py --device cuda --model sdxl-random --sizes 2048,4096 --components --no-timing

echo "== few-step schedules on the toy (issue 35): 4 steps of trailing Euler and LCM against 30 at 1x and 4x; what one branch saves"
timeout 300 python3 bench/few_step.py --device cuda --seeds 8 --timing-models toy,sdxl-random --timing-size 2048 --timing-steps 20 \
  --out-dir "$OUT/few_step"

echo "== upscale a picture (issue 34): the toy faithfulness benchmark at 4x and 8x, every column (8x is left out on the CPU)"
timeout 420 python3 bench/upscale.py --device cuda --scales 4,8 --steps 10 --strengths 0.1,0.4 --out-dir "$OUT/upscale_toy" \
  --sheet "$OUT/upscale_toy/sheet.png"

echo "== upscale a picture (issue 34): sdxl-random fp16, a 1024² picture -> 4096² (ours at the default strength), time"
timeout 420 python3 bench/upscale.py --model sdxl-random --device cuda --size 1024 --scales 4 --square-only \
  --methods bicubic,ours --strengths 0.1 --steps 30 --out-dir "$OUT/upscale_sdxl"
