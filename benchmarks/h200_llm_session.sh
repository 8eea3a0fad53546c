#!/usr/bin/env bash
# H200 calls for the LLM-scale engine (results under $OUT, copied into benchmarks/results
# afterwards). Run from the repository root: `PART=tests+opt bash ...`, then `PART=llama bash ...`
# (each part fits one 10-minute call).
ln -sfn ../templates meft_convert/templates  # the package layout pip would install
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader
if [[ "$PART" == *tests* ]]; then
  timeout ${GPU_TESTS_S:-170} python -m pytest -q -x -p no:cacheprovider tests/test_gpu.py ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} > $OUT/test_gpu.log 2>&1
  echo "test_gpu exit $?"; tail -3 $OUT/test_gpu.log
fi
if [[ "$PART" == *opt* ]]; then
  timeout ${OPT_S:-240} python benchmarks/memory_speed.py --shapes opt-1.3b --skip-checks --depths --seq-lengths \
    --meft-profile llm ${OPT_PROFILE:+--profile} --methods ${OPT_METHODS:-lora+gc+chunked-loss lora+offload-gc+chunked-loss frozen-layer meft1 meft2 \
    meft3 meft1+offload meft2+offload meft3+offload meft3-float meft1+offload@1024 meft1-queries+offload@1024} --out $OUT/h200-opt-1.3b-llm${TAG:-}.json > $OUT/bench-opt.log 2>&1
  echo "opt bench exit $?"; grep -v '^#' $OUT/bench-opt.log | tail -12
fi
if [[ "$PART" == *llama* ]]; then
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout ${BENCH_S:-560} python benchmarks/memory_speed.py \
    --shapes llama-3-8b --skip-checks --depths --seq-lengths --steps ${STEPS:-3} --long-seqs ${SEQS:-8192 16384 32768} \
    --methods ${METHODS:-frozen-layer lora+gc+chunked-loss lora+offload-gc+chunked-loss meft1 meft2 meft3 meft1+offload meft3+offload} \
    --max-context-methods ${SEARCH:-} --max-probes ${PROBES:-4} --time-budget ${BUDGET_S:-500} --census-seqs ${CENSUS:-} --profile-seqs ${PROFILE:-} \
    --out $OUT/h200-llama-3-8b${TAG:-}.json > $OUT/bench-llama.log 2>&1
  echo "bench exit $?"; grep -v '^#' $OUT/bench-llama.log | tail -30
fi
