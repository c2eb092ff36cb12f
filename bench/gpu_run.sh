#!/usr/bin/env bash
# The GPU benchmarks and gpu-marked tests in one go on a CUDA machine where tuneline's
# Python dependencies are importable. Usage: bench/gpu_run.sh TOKENIZER_DIR DATA_JSONL OUT_DIR [PART]
#   PART 1 (one GPU): gpu tests, DPO cost, sft throughput/MFU variants
#   PART 2 (two GPUs): multi-GPU tests, sft/dpo DDP scaling, FSDP of a model over one GPU's memory
#   PART 3 (one GPU): probe throughput, QLoRA memory (needs bitsandbytes)
#   PART 4 (one GPU): sft speed: tuneline's fast paths vs plain TRL defaults and a tuned plain
#          TRL script, same process, with a profiled window of the baseline and the fast path
#   PART 5 (one GPU): gpu tests, QLoRA nf4 vs bf16 over 36 steps (needs bitsandbytes)
#   PART 6 (one GPU): probe: static KV cache + compiled decode vs today's batched probe
#          (bf16 timing, float32 identical outputs)
# SFT_BUDGET_S caps the seconds spent on sft variants (the rest are skipped and say so).
set -uo pipefail
tok=$1 data=$2 out=$3 part=${4:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
run() { echo "== $*"; "$@" 2>&1 | grep -vE "it/s\]|s/it\]|Warning|warn\(" | tail -60; }
if [ "$part" = all ] || [ "$part" = 1 ]; then
  CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} run python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
  run python3 bench/dpo_cost.py --shape qwen2.5-1.5b --tokenizer "$tok" --data "$data" --n 553 --batch 16 \
    --lora-dropout 0 --sft-varlen --out "$out"
  run python3 bench/sft_throughput.py --shape qwen2.5-1.5b --tokenizer "$tok" --data "$data" --steps 30 --check \
    --budget-s "${SFT_BUDGET_S:-1000000}" --out "$out"
fi
if [ "$part" = all ] || [ "$part" = 2 ]; then
  run python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_multi_gpu.py
  run python3 bench/multi_gpu.py --shape qwen2.5-1.5b --tokenizer "$tok" --data "$data" --gpus 2 --stages sft,dpo \
    --fsdp-shape qwen2.5-7b --fsdp-cap-gb 12 --deadline-s "${MULTI_DEADLINE_S:-1000000}" --out "$out"
fi
if [ "$part" = all ] || [ "$part" = 3 ]; then
  run python3 bench/probe_throughput.py --random-shape qwen2.5-1.5b --tokenizer "$tok" --n 64 --batch 64 --max-new 64 --out "$out"
  run python3 bench/qlora_memory.py --shape qwen2.5-7b --tokenizer "$tok" --data "$data" --steps 6 --batch 8 --out "$out"
fi
if [ "$part" = 4 ]; then
  run python3 bench/sft_throughput.py --shape qwen2.5-1.5b --tokenizer "$tok" --data "$data" --steps 30 --warmup 10 \
    --check --variants "${SFT_VARIANTS:-plain,plain-tuned,padded-d0-b64,varlen-d0-b64,varlen-d0-b64-fast,varlen-d0-b64@profile,varlen-d0-b64-fast@profile,varlen-d0-b64-fused,varlen-d0-b64-syncfree,varlen-d0-b64-fast-compile,varlen-d0-b128-fast}" \
    --budget-s "${SFT_BUDGET_S:-1000000}" --tag "${SFT_TAG:-_speed}" --out "$out"
fi
if [ "$part" = 5 ]; then
  CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} run python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
  run python3 bench/qlora_memory.py --shape qwen2.5-7b --tokenizer "$tok" --data "$data" --steps 36 --warmup 6 \
    --batch 8 --tag _36steps --out "$out"
fi
if [ "$part" = 6 ]; then
  run python3 bench/probe_throughput.py --random-shape qwen2.5-1.5b --tokenizer "$tok" --n 64 --batch 64 --max-new 64 \
    --modes batched,static --repeats 3 --tag _static --out "$out"
  run python3 bench/probe_throughput.py --random-shape qwen2.5-1.5b --tokenizer "$tok" --n 64 --batch 64 --max-new 64 \
    --modes batched,static --repeats 3 --dtype float32 --tag _static --out "$out"
fi
