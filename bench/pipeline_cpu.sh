#!/usr/bin/env bash
# The default pipeline on this machine: wall time per stage and in total, then a no-op
# `dvc repro`. Run from the repository root with the virtualenv active, on a clean
# workspace (`dvc repro --force` re-runs everything). Writes bench/results/pipeline_cpu.tsv
# when it ends, not while the stages run: a tracked file changed mid-run would stamp every
# later stage's run record `dirty: true`.
set -euo pipefail
final=bench/results/pipeline_cpu.tsv
out=$(mktemp)
mkdir -p bench/results
export HF_HUB_OFFLINE=1
printf 'stage\tseconds\n' > "$out"
total_start=$(date +%s.%N)
for stage in $(dvc stage list --name-only); do
  start=$(date +%s.%N)
  dvc repro --force --single-item "$stage" > /dev/null
  end=$(date +%s.%N)
  printf '%s\t%.1f\n' "$stage" "$(echo "$end - $start" | bc)" | tee -a "$out"
done
total_end=$(date +%s.%N)
printf 'total\t%.1f\n' "$(echo "$total_end - $total_start" | bc)" | tee -a "$out"
start=$(date +%s.%N)
dvc repro > /dev/null
end=$(date +%s.%N)
printf 'no-op repro\t%.2f\n' "$(echo "$end - $start" | bc)" | tee -a "$out"
mv "$out" "$final"
