#!/usr/bin/env bash
# A version's whole probe suites on a GPU host, and its default subsets on that host's CPU.
#
# On a machine with CUDA and tuneline's Python dependencies importable (bench/device_setup.sh)
# and the embedded base's package on PYTHONPATH:
#   bench/full_suites_device.sh DPO_ADAPTER OUT_DIR
# DPO_ADAPTER is the committed run's models/dpo; its parent/ is the sft adapter (the same
# bytes as models/sft). Both runs are float32 (model.dtype auto would be bf16 on CUDA), so
# they give what a CPU run of the default params gives: the subset outputs from the GPU and
# from the host CPU are compared with the committed run's by bench/cross_check.py.
#   OUT_DIR/full_gpu.tgz    bench/full_suites.py on the GPU: every prompt of both suites,
#                           every probe model, compare (probe.batch_size 130)
#   OUT_DIR/cpu_subset.tgz  the default subsets (60 heldout, 30 natural) of sft and dpo on
#                           the host CPU, 2 threads
set -uo pipefail
dpo=$1 out=$2
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, peft, trl; print(torch.__version__, transformers.__version__, peft.__version__, trl.__version__, torch.backends.cpu.get_cpu_capability())"
grep -m1 "model name" /proc/cpuinfo
grep -o -w -E "avx512f|avx512_bf16|amx_bf16|avx2" /proc/cpuinfo | sort | uniq -c
mkdir -p "$out"
( CUDA_VISIBLE_DEVICES= python3 bench/full_suites.py --sft "$dpo/parent" --dpo "$dpo" --root /tmp/cpu --out /tmp/cpu_out \
    --threads 2 --models sft dpo --set model.dtype='"float32"' --set model.device='"cpu"' \
    --set probe.suites.heldout.limit=60 --set probe.suites.natural.limit=30 > /tmp/cpu.log 2>&1
  echo "cpu rc $?" >> /tmp/cpu.log ) &
cpu=$!
python3 bench/full_suites.py --sft "$dpo/parent" --dpo "$dpo" --root /tmp/gpu --out /tmp/gpu_out --threads 4 \
  --set model.dtype='"float32"' --set probe.batch_size=130 2>&1 | tail -5
wait $cpu
tail -3 /tmp/cpu.log
tar czf "$out/full_gpu.tgz" -C /tmp gpu_out
tar czf "$out/cpu_subset.tgz" -C /tmp cpu_out
ls -la "$out"
