#!/usr/bin/env bash
# The GPU benchmarks and gpu-marked tests in one go on a CUDA machine where tuneline's
# Python dependencies are importable. Usage: bench/gpu_run.sh TOKENIZER_DIR DATA_JSONL OUT_DIR [PART]
set -uo pipefail
tok=$1 data=$2 out=$3 part=${4:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
run() { echo "== $*"; "$@" 2>&1 | grep -vE "it/s\]|s/it\]|Warning|warn\(" | tail -40; }
if [ "$part" = all ] || [ "$part" = 1 ]; then
  run python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
  run python3 bench/sft_throughput.py --shape qwen2.5-1.5b --tokenizer "$tok" --data "$data" --steps 30 --out "$out"
  run python3 bench/probe_throughput.py --random-shape qwen2.5-1.5b --tokenizer "$tok" --n 32 --batch 32 --max-new 64 --out "$out"
fi
if [ "$part" = all ] || [ "$part" = 2 ]; then
  run python3 bench/dpo_cost.py --shape qwen2.5-0.5b --tokenizer "$tok" --data "$data" --n 256 --batch 16 --out "$out"
  run python3 bench/qlora_memory.py --shape qwen2.5-7b --tokenizer "$tok" --data "$data" --steps 6 --batch 8 --out "$out"
fi
