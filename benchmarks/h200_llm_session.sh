#!/usr/bin/env bash
# One H200 call: the GPU tests of the engine, then the Llama-3-8B memory benchmark (results
# under $OUT; copied into benchmarks/results afterwards). Run from the repository root.
ln -sfn ../templates meft_convert/templates  # the package layout pip would install
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader
timeout ${GPU_TESTS_S:-170} python -m pytest -q -x -p no:cacheprovider tests/test_gpu.py > $OUT/test_gpu.log 2>&1
echo "test_gpu exit $?"; tail -3 $OUT/test_gpu.log
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout ${BENCH_S:-380} python benchmarks/memory_speed.py \
  --shapes llama-3-8b --skip-checks --depths --seq-lengths --steps 3 --long-seqs 8192 16384 32768 \
  --time-budget ${BUDGET_S:-330} --out $OUT/h200-llama-3-8b.json > $OUT/bench-llama.log 2>&1
echo "bench exit $?"; tail -25 $OUT/bench-llama.log
