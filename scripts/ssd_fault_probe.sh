#!/usr/bin/env bash
# Device-side driver of scripts/ssd_fault_probe.py (notes/ssd.md, "Open defect"). Each line of
# the variant file is   name | ENV=val ... | probe args | mode   with mode san (compute-sanitizer
# memcheck, 1 iteration) or native ($ITERS iterations); every variant runs in its own process
# (an illegal access kills the CUDA context), $PAR at once; one summary line per variant in
# $OUT/probe_summary.txt, logs in $OUT/probe.tgz.
set -uo pipefail
OUT=${OUT:-/tmp/out}; LOGS=/tmp/probe; mkdir -p "$OUT" "$LOGS"
SAN=/usr/local/cuda/bin/compute-sanitizer
run_one() {  # name env args mode
  local name=$1 envs=$2 args=$3 mode=$4 log="$LOGS/$1.log"
  if [ "$mode" = san ]; then
    env $envs timeout 300 $SAN --tool memcheck --print-limit 3 python3 scripts/ssd_fault_probe.py --iters 1 $args > "$log" 2>&1
  else
    env $envs timeout 240 python3 scripts/ssd_fault_probe.py --iters "${ITERS:-300}" $args > "$log" 2>&1
  fi
  local res; res=$(grep -E "^(OK|FAIL)" "$log" | head -1)
  local err; err=$(grep -m1 "ERROR SUMMARY" "$log")
  local at; at=$(grep -m1 -E "^=+ +at |^   at " "$log" | sed 's/=* *//')
  echo "$name [$mode] ${res:-no result (timeout/crash)} | ${err} | ${at}" >> "$OUT/probe_summary.txt"
}
while IFS='|' read -r name envs args mode; do
  name=$(echo $name); [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
  run_one "$name" "$(echo $envs)" "$(echo $args)" "$(echo $mode)" &
  while [ "$(jobs -rp | wc -l)" -ge "${PAR:-12}" ]; do sleep 1; done
done < "$1"
wait
sort "$OUT/probe_summary.txt"
tar czf "$OUT/probe.tgz" -C /tmp probe
