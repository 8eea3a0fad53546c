#!/usr/bin/env bash
# The commands of one H200 session (results under $OUT, copied into benchmarks/results and
# examples/results afterwards). Run from the repository root; shared-data/ holds a copy of
# the project's data folder (glue/, text/). Each step has its own time limit.
ln -sfn ../templates meft_convert/templates  # the package layout pip would install
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
timeout 110 python -m pytest -q -p no:cacheprovider tests/test_gpu.py > $OUT/test_gpu.log 2>&1
echo "test_gpu exit $?"; tail -1 $OUT/test_gpu.log
for m in opt-125m bert-base-uncased; do
  timeout 100 python examples/finetune_glue.py --from-config tests/data/configs/$m.json --no-verify --task rte \
    --data-dir shared-data/glue/RTE --bf16 --max-steps 200 --batch-size 32 --seq-len 128 --lr 2e-3 --warmup-steps 20 \
    --eval-train-samples 512 --log-json $OUT/finetune-$m-rte-bf16.json > $OUT/finetune-$m-rte-bf16.log 2>&1
  echo "$m exit $?"; tail -1 $OUT/finetune-$m-rte-bf16.log
done
(cd benchmarks && timeout 190 python memory_speed.py --shapes opt-1.3b --steps 5 --profile --skip-checks \
  --methods full lora lora+gc lora+gc+chunked-loss head-only meft1 meft2 meft3 meft2-compiled meft3-float \
  --depths 6 48 --sweep-methods lora+gc meft1 meft2 meft3 meft3-float --seq-lengths \
  --out $OUT/h200.json > $OUT/bench.log 2>&1); echo "bench exit $?"
timeout 270 torchrun --nproc-per-node 1 benchmarks/distributed.py --engine ddp fsdp fsdp-blocks --steps 20 \
  --data-dir shared-data --out $OUT/h200-distributed-1gpu.json > $OUT/distributed-1gpu.log 2>&1; echo "distributed exit $?"
