#!/usr/bin/env bash
# The accelerator checks, as one prepared run (e.g. one call of a lent GPU machine): each step
# writes under $OUT as it goes, so what finished survives a time limit.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
#
# 1. the attention tests on the GPU (cuDNN against the reference, blockwise on the GPU);
# 2. benchmarks/train.py: Qwen2.5-0.5B shape at [8, 2048], [2, 8192], [1, 32768] and the
#    1.5B shape at [2, 8192], bf16, remat full, `auto` attention (cuDNN) beside `xla`;
# 3. benchmarks/sampling.py: the Qwen2.5-0.5B shape in bf16, greedy, batch 64, prompt 128, 512
#    new tokens, beside transformers with its dynamic and its static KV cache, and the share of
#    the memory-bandwidth floor reached;
# 4. the test suite on the GPU (backend-specific tests skip with a reason).
set -u
OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"
PY=${PY:-python}
(nvidia-smi; $PY -c "import jax; print(jax.__version__, jax.devices())") > "$OUT/device.txt" 2>&1
JAX_PLATFORMS=cuda timeout 180 $PY -m pytest -q -p no:cacheprovider tests/test_attention.py \
  > "$OUT/test_attention.txt" 2>&1
timeout 300 $PY -m benchmarks.train --model qwen2.5-0.5b --shapes 8x2048,2x8192,1x32768 \
  --out "$OUT/train_gpu_qwen2.5-0.5b.json" > "$OUT/train_0.5b.log" 2>&1
timeout 180 $PY -m benchmarks.train --model qwen2.5-1.5b --shapes 2x8192 --peer "" \
  --out "$OUT/train_gpu_qwen2.5-1.5b.json" > "$OUT/train_1.5b.log" 2>&1
timeout 240 $PY -m benchmarks.sampling --model qwen2.5-0.5b --dtype bfloat16 --batch 64 \
  --prompt 128 --new 512 --out "$OUT/sampling_gpu_qwen2.5-0.5b.json" > "$OUT/sampling.log" 2>&1
JAX_PLATFORMS=cuda timeout 240 $PY -m pytest -q -rs -p no:cacheprovider tests \
  > "$OUT/suite.txt" 2>&1
echo done > "$OUT/DONE"
