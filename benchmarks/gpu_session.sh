#!/usr/bin/env bash
# Every GPU measurement issue 6 asks for, in one command (for a session that is lent a GPU).
#
#   bash benchmarks/gpu_session.sh OUT_DIR [BATCH]
#
# Needs vlmask installed with CUDA torch (and xformers for the attention comparison:
# pip install -e ".[xformers]"). Writes into OUT_DIR: gpu-tests.txt (pytest -m gpu: xformers vs
# SDPA equality, a sync-free step for every recipe, CUDA maskers and evaluation) and one
# `vlmask bench` JSON per (recipe, compile, attention) at paper scale in bf16: clips/s,
# step_ms, split_ms, peak_mem_mb, gflops_per_clip, mfu, warmup_overhead_s (compile time).
# Also (issue 10) cuda-decoding.json: torchcodec's CUDA decoder vs CPU decoding (torchcodec, PyAV,
# decord), clips/s at 16 x 224 on 10 s H.264 clips at 640x360 and 1280x720 (benchmarks/cuda_decoding.py;
# written by a task without a GPU: never run on one yet).
# About 8 minutes on one H100 at the default batch of 32, by estimate (never run: no GPU yet),
# plus about 2 minutes for the decoding measurement (encoding its clips included), by estimate.
set -uo pipefail
out="${1:?usage: gpu_session.sh OUT_DIR [BATCH]}"
batch="${2:-32}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" 2>&1
python -m pytest -q -m gpu -p no:cacheprovider > "$out/gpu-tests.txt" 2>&1
echo "pytest -m gpu: exit $?" >> "$out/gpu-tests.txt"
for recipe in mae fils; do
  for compile in false true; do
    for attention in auto sdpa; do
      [ "$compile" = true ] && [ "$attention" = sdpa ] && continue
      name="bench-paper-$recipe-compile_$compile-attention_$attention"
      vlmask bench "recipes/paper/$recipe.yaml" --steps 10 --warmup 3 --out "$out/$name.json" \
        device=cuda train.batch_size="$batch" train.compile="$compile" \
        model.encoder.attention="$attention" model.predictor.attention="$attention" > "$out/$name.log" 2>&1 || echo "failed: $name" >> "$out/failures.txt"
    done
  done
done
python benchmarks/cuda_decoding.py --out "$out/cuda-decoding.json" > "$out/cuda-decoding.log" 2>&1 || echo "failed: cuda-decoding" >> "$out/failures.txt"
ls -l "$out"
