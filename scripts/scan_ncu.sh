#!/usr/bin/env bash
# ncu profile of the selective-scan kernels at the benchmark shape (device machine; writes $OUT).
#   bash scripts/scan_ncu.sh [L] [N] [fwd|bwd]
# The forward (or forward+backward) runs twice to autotune, then once between
# cudaProfilerStart and Stop, which is all ncu records (so the autotuner's trial launches are
# left out). Not an NVTX range: autograd runs the backward's kernels on its own thread, outside
# a range pushed on the main thread (ncu then profiled only the forward).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for d in kernels tasks conf; do ln -sfn "../$d" "ssdbench/$d"; done
export PYTHONPATH=$PWD
L=${1:-2048}; N=${2:-16}; MODE=${3:-fwd}
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
cat > /tmp/scan_prof.py <<PY
import torch
from ssdbench.bench_scan import _scan_inputs
from ssdbench.kernels.selective_scan import selective_scan
L, N, mode = $L, $N, "$MODE"
ins = _scan_inputs(65536 // L, 2048, L, N, torch.bfloat16, "cuda", requires_grad=mode == "bwd")
def step():
    y = selective_scan(*ins, delta_softplus=True)
    if mode == "bwd":
        y.sum().backward()
step(); step(); torch.cuda.synchronize()
torch.cuda.profiler.start()
step()
torch.cuda.synchronize()
torch.cuda.profiler.stop()
PY
$NCU --clock-control none --set full --import-source yes --profile-from-start off \
  -k "regex:selective_scan" -o "$OUT/scan" -f python3 /tmp/scan_prof.py > "$OUT/ncu_scan_run.log" 2>&1
tail -3 "$OUT/ncu_scan_run.log"
$NCU --import "$OUT/scan.ncu-rep" --page details > "$OUT/ncu_scan_details.txt" 2>&1
$NCU --import "$OUT/scan.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_scan_sass.csv" 2>&1
grep -E "Duration|Registers Per|Achieved Occupancy|Compute \(SM\) Throughput|Memory Throughput|Block Size|Grid Size" "$OUT/ncu_scan_details.txt"
