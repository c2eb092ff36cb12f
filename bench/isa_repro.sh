#!/usr/bin/env bash
# Which outputs reproduce across CPU instruction sets, in bf16 and in float32.
#
# PyTorch picks its CPU kernels by instruction set; ATEN_CPU_CAPABILITY (ATen's vectorized
# kernels) and ONEDNN_MAX_CPU_ISA (oneDNN's matmuls and convolutions) force the paths an
# older or different x86 CPU takes. This script runs the pipeline's own stages
# (`dvc repro --force --single-item`) under each setting and dtype in a workspace that holds
# a complete run (models/, data/), and writes the sha256 of what each run produced:
# the sft and dpo adapter weights and the probe samples of base, sft and dpo.
#
# Usage (from the repository root, virtualenv active):
#   bench/isa_repro.sh WORKSPACE OUT_DIR [SFT_RECORDS] [DPO_PAIRS] [PROBE_LIMIT] [MAX_NEW]
# WORKSPACE is a scratch clone with the run checked out: its tracked files are reset with
# `git checkout HEAD -- .` and `dvc checkout` at the end. OUT_DIR gets isa_repro.tsv (hashes per
# run; rows are added to an existing table) and each run's probe samples; `python bench/isa_summary.py OUT_DIR` counts the
# outputs that differ from the native run. Defaults: the default params' sft and dpo sizes,
# probe 60 prompts, 320 new tokens (the whole default run); smaller values, a shorter run.
set -euo pipefail
ws=$(cd "$1" && pwd) dir=$(realpath -m "$2")
mkdir -p "$dir"
out=$dir/isa_repro.tsv
sft_records=${3:-} dpo_pairs=${4:-} limit=${5:-60} max_new=${6:-320}
settings=("native::" "avx512_core::AVX512_CORE" "avx2:avx2:AVX2")
dtypes=${DTYPES:-bfloat16 float32}  # e.g. DTYPES=float32 to add a dtype's rows to an existing table
# MACHINE names the CPU when the rows come from another machine than the table's native
# rows (e.g. MACHINE=epyc-zen3): its settings are written MACHINE-SETTING and compared with
# the native rows already in the table (bench/isa_summary.py).
machine=${MACHINE:+$MACHINE-}
if [ -n "${SETTINGS:-}" ]; then  # e.g. SETTINGS="native avx512_core"
  keep=(); for s in "${settings[@]}"; do [[ " $SETTINGS " == *" ${s%%:*} "* ]] && keep+=("$s"); done; settings=("${keep[@]}")
fi
export HF_HUB_OFFLINE=1
cd "$ws"
cp params.yaml "$ws/.params.yaml.orig"
restore() { rm -f "$ws/.params.yaml.orig"; git checkout -q HEAD -- . && dvc checkout -q -f || true; }
trap restore EXIT
[ -s "$out" ] || printf 'dtype\tsetting\tATEN_CPU_CAPABILITY\tONEDNN_MAX_CPU_ISA\tseconds\tsft_adapter\tdpo_adapter\tprobe_base\tprobe_sft\tprobe_dpo\n' > "$out"
for dtype in $dtypes; do
  cp "$ws/.params.yaml.orig" params.yaml
  python - "$dtype" "$sft_records" "$dpo_pairs" "$limit" "$max_new" <<'PY'
import sys, yaml
dtype, sft_records, dpo_pairs, limit, max_new = sys.argv[1:]
p = yaml.safe_load(open("params.yaml"))
p["model"]["dtype"] = dtype
if sft_records:
    p["sft"]["max_records"] = int(sft_records)
if dpo_pairs:
    p["dpo"]["max_pairs"] = int(dpo_pairs)
p["probe"]["suites"]["heldout"]["limit"] = int(limit)
p["probe"]["suites"]["natural"]["limit"] = int(limit)
p["probe"]["max_new_tokens"] = int(max_new)
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
PY
  for s in "${settings[@]}"; do
    name=$machine${s%%:*} rest=${s#*:}
    aten=${rest%%:*} isa=${rest#*:}
    env_args=()
    [ -n "$aten" ] && env_args+=("ATEN_CPU_CAPABILITY=$aten")
    [ -n "$isa" ] && env_args+=("ONEDNN_MAX_CPU_ISA=$isa")
    start=$(date +%s)
    for stage in sft dpo probe@base probe@sft probe@dpo; do
      echo "== $dtype $name $stage" >&2
      env "${env_args[@]}" dvc repro -q --force --single-item "$stage" >/dev/null
    done
    sha() { sha256sum "$1" | cut -c1-16; }
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$dtype" "$name" "${aten:--}" "${isa:--}" "$(( $(date +%s) - start ))" \
      "$(sha models/sft/adapter_model.safetensors)" "$(sha models/dpo/adapter_model.safetensors)" \
      "$(sha reports/probe/heldout/base.samples.jsonl)" "$(sha reports/probe/heldout/sft.samples.jsonl)" \
      "$(sha reports/probe/heldout/dpo.samples.jsonl)" | tee -a "$out"
    mkdir -p "$dir/$dtype-$name"
    cp reports/probe/heldout/{base,sft,dpo}.samples.jsonl "$dir/$dtype-$name/"
  done
done
