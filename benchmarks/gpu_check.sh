#!/usr/bin/env bash
# The accelerator checks, as prepared runs of the device tool (one GPU, at most 10 minutes a
# call and 15 minutes of device time a session, starts included): each part fits one call with
# room to spare, and each step writes under $OUT as it goes, so what finished survives a limit.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh essentials  # one call for a short loan: ~9 min
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh kernels   # default; ~9 min at most
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh suite     # needs the wheels (.whl, carried)
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh small     # needs the wheels (.whl, carried)
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh decode    # ~6 min at most
#
# essentials: the one call to make when a session's device time allows only one: in order of
#   what the open issue needs most, each step cut short rather than the whole: the attention
#   tests (cuDNN, also over a KV cache), the decode benchmark at the 0.5B shape beside
#   transformers' static cache, the training benchmark at the 1.5B shape and 8K tokens (the MFU
#   target; without remat, then with it), then `small` end to end for the time left (SIGTERM:
#   it checkpoints and its partial metrics come back). Needs the wheels (.whl, carried) for
#   `small`.
# kernels: the attention tests on the GPU (cuDNN against the reference, blockwise there too);
#   benchmarks/train.py at the Qwen2.5-0.5B shape ([8, 2048], [2, 8192], [1, 32768]) beside
#   `xla`, and the 1.5B shape at [2, 8192], bf16, remat none then full, `auto` attention (cuDNN);
#   benchmarks/sampling.py at the 0.5B shape in bf16 (greedy, batch 64, prompt 128, 512 new
#   tokens) beside transformers with its dynamic and its static KV cache. Needs nothing beyond
#   the machine's own packages (jax, flax, optax, orbax, transformers, torch).
# decode: what a decode step's time goes to, at the same 0.5B shape: cuDNN's attention over the
#   cache (the default on a GPU) against XLA's products, each with XLA's default command buffers
#   (CUDA graphs of the loop body's kernels), with none, and with the whole loop captured; then
#   a profile of a 64-token run (jax.profiler trace, kept under $OUT/trace).
# suite: the whole test suite on the GPU (backend-specific tests skip with a reason).
# small: `configs/vcppo.py:small` end to end (SFT, reward model, value pretraining, PPO).
# The suite and the runner need packages the machine lacks: `bash benchmarks/gpu_wheels.sh`
# here first, then carry `.whl` (this script installs it when present).
set -u
PART=${1:-kernels}
OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
(nvidia-smi; $PY -c "import jax; print(jax.__version__, jax.devices())") > "$OUT/device.txt" 2>&1
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl > "$OUT/wheels.txt" 2>&1 && export PYTHONPATH=/tmp/site:$PWD
fi
# The steps the parts share, each with its own time limit (seconds) as the first argument.
# The decode benchmark's shape: Qwen2.5-0.5B in bf16, greedy, batch 64, prompt 128.
DECODE="$PY -m benchmarks.sampling --model qwen2.5-0.5b --dtype bfloat16 --batch 64 --prompt 128"
attention_tests() {
  JAX_PLATFORMS=cuda timeout "$1" $PY -m pytest -q -rs -p no:cacheprovider \
    tests/test_attention.py > "$OUT/test_attention.txt" 2>&1
}
# The MFU target's shape, without remat first (no recomputation, which MFU does not count;
# compiled for an H100 it asks for 32.6 GiB of temporaries beside 8.6 of state), then remat full.
train_15b_8k() {
  for remat in none full; do
    timeout "$1" $PY -m benchmarks.train --model qwen2.5-1.5b --shapes 2x8192 --peer "" \
      --remat $remat --out "$OUT/train_gpu_qwen2.5-1.5b_remat_$remat.json" \
      > "$OUT/train_1.5b_remat_$remat.log" 2>&1
  done
}
small_run() {  # SIGTERM at the limit: the runner checkpoints; its partial metrics come back.
  timeout -k 20 "$1" $PY -m vcppo_jax.main --config=configs/vcppo.py:small \
    --workdir=/tmp/small > "$OUT/small.log" 2>&1
  cp /tmp/small/metrics.jsonl /tmp/small/config.json "$OUT/" 2>/dev/null
}
case "$PART" in
  essentials)
    attention_tests 90
    timeout 100 $DECODE --new 512 --peers static --repeats 2 \
      --out "$OUT/sampling_gpu_qwen2.5-0.5b.json" > "$OUT/sampling.log" 2>&1
    train_15b_8k 60
    small_run 170
    ;;
  kernels)
    attention_tests 120
    timeout 200 $PY -m benchmarks.train --model qwen2.5-0.5b --shapes 8x2048,2x8192,1x32768 \
      --out "$OUT/train_gpu_qwen2.5-0.5b.json" > "$OUT/train_0.5b.log" 2>&1
    train_15b_8k 75
    timeout 120 $DECODE --new 512 --out "$OUT/sampling_gpu_qwen2.5-0.5b.json" \
      > "$OUT/sampling.log" 2>&1
    ;;
  decode)
    S="$DECODE --new 512 --peers= --repeats 2"
    ALL=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL
    for attn in cudnn xla; do
      timeout 60 $S --attention $attn --out "$OUT/decode_${attn}_default.json" \
        > "$OUT/decode_${attn}_default.log" 2>&1
      XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 60 $S --attention $attn \
        --out "$OUT/decode_${attn}_no_graphs.json" > "$OUT/decode_${attn}_no_graphs.log" 2>&1
      XLA_FLAGS="--xla_gpu_enable_command_buffer=$ALL --xla_gpu_graph_min_graph_size=1" \
        timeout 60 $S --attention $attn --out "$OUT/decode_${attn}_loop_graph.json" \
        > "$OUT/decode_${attn}_loop_graph.log" 2>&1
    done
    timeout 60 $DECODE --new 64 --peers= --repeats 1 --attention cudnn --profile "$OUT/trace" \
      --out "$OUT/decode_profiled.json" > "$OUT/decode_profiled.log" 2>&1
    ;;
  suite)
    JAX_PLATFORMS=cuda timeout 540 $PY -m pytest -q -rs -p no:cacheprovider -n 4 tests \
      > "$OUT/suite.txt" 2>&1
    ;;
  small)
    small_run 540
    ;;
  *)
    echo "unknown part $PART: essentials, kernels, decode, suite or small" >&2
    exit 2
    ;;
esac
echo "$PART done" > "$OUT/DONE"
