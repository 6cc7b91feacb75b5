#!/usr/bin/env bash
# ncu profile of the SSD chunk kernels (device machine; writes $OUT); default: the reference shape.
#   bash scripts/ssd_ncu.sh [regex of kernel names] [extra args for ssd_profile.py]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for d in kernels tasks conf; do ln -sfn "../$d" "ssdbench/$d"; done
export PYTHONPATH=$PWD SSD_NO_AUTOTUNE=1
re=${1:-_ssd_chunk}; shift || true
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"
python3 scripts/ssd_profile.py --iters 1 "$@"   # compile once outside the profiler
$NCU --clock-control none --set full --import-source yes -k "regex:$re" -c "${COUNT:-4}" \
  -o "$OUT/ssd" -f python3 scripts/ssd_profile.py --iters 1 "$@" > "$OUT/ncu_run.log" 2>&1
tail -5 "$OUT/ncu_run.log"
$NCU --import "$OUT/ssd.ncu-rep" --page details > "$OUT/ncu_details.txt" 2>&1
$NCU --import "$OUT/ssd.ncu-rep" --page source --csv --print-source cuda,sass > "$OUT/ncu_source_sass.csv" 2>&1
ls -la "$OUT"
