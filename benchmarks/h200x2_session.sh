#!/usr/bin/env bash
# The commands of one session on two H200s (results under $OUT, copied into benchmarks/results
# afterwards). Run from the repository root with shared-data/ carried along (glue/, text/,
# minilm-fp16/; see benchmarks/README.md). Two calls, each under ten minutes:
#   bash benchmarks/h200x2_session.sh 1   # torchrun DDP/FSDP on 2 GPUs, then GLUE until its budget
#                                         # (the committed run had --engine ddp fsdp: fsdp-blocks came later)
#   bash benchmarks/h200x2_session.sh 2   # GLUE again, resuming from part 1's glue.json
#                                         # (copied to shared-data/glue-part1.json)
#   bash benchmarks/h200x2_session.sh 3   # torchrun DDP/FSDP again (the committed results), then
#                                         # examples/finetune_glue.py's Trainer under torchrun
#   bash benchmarks/h200x2_session.sh 4   # (one H200 is enough) GLUE's two on-request methods,
#                                         # resuming from part 2's glue.json (shared-data/glue-final.json)
ln -sfn ../templates meft_convert/templates  # the package layout pip would install
# NVLink multicast stays off (the machine's NCCL, PyTorch and NVSHMEM settings)
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
GLUE="python benchmarks/glue.py --data-dir shared-data/glue --model shared-data/minilm-fp16 --out $OUT/glue --workers 24"
distributed() {
  timeout 240 torchrun --nproc-per-node 2 benchmarks/distributed.py --engine ddp fsdp fsdp-blocks --data-dir shared-data \
    --out $OUT/h200x2-distributed.json > $OUT/distributed-x2.log 2>&1
  echo "distributed exit $?"; tail -6 $OUT/distributed-x2.log
}
if [ "$1" = 3 ]; then
  distributed
  timeout 200 torchrun --nproc-per-node 2 examples/finetune_glue.py --from-config tests/data/configs/opt-125m.json \
    --no-verify --task rte --data-dir shared-data/glue/RTE --bf16 --max-steps 200 --batch-size 16 --seq-len 128 \
    --lr 2e-3 --warmup-steps 20 --eval-train-samples 512 --log-json $OUT/finetune-opt-125m-rte-bf16-ddp2.json \
    > $OUT/finetune-opt-125m-rte-bf16-ddp2.log 2>&1
  echo "trainer exit $?"; tail -3 $OUT/finetune-opt-125m-rte-bf16-ddp2.log
  exit
fi
if [ "$1" = 4 ]; then
  timeout 570 python benchmarks/glue.py --data-dir shared-data/glue --model shared-data/minilm-fp16 --out $OUT/glue \
    --workers 12 --time-budget 420 --resume shared-data/glue-final.json \
    --methods full lora adapters meft1 meft2 meft3 meft1-small meft2-small meft3-small meft3-mean meft1-float \
    > $OUT/glue-part4.log 2>&1; echo "glue exit $?"
elif [ "$1" = 1 ]; then
  nvidia-smi -L; python -c 'import torch; print("GPUs:", torch.cuda.device_count())'
  distributed
  budget=$((560 - SECONDS - 90))  # a run may go on 60 s past the budget, then the report is written
  timeout $((570 - SECONDS)) $GLUE --time-budget $budget > $OUT/glue-part1.log 2>&1; echo "glue exit $?"
else
  timeout 570 $GLUE --time-budget 420 --resume shared-data/glue-part1.json > $OUT/glue-part2.log 2>&1; echo "glue exit $?"
fi
tail -25 $OUT/glue/glue.md 2>/dev/null | head -14
