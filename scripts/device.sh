#!/usr/bin/env bash
# Runs on the lent GPU machine (see notes): installs the carried wheels (hydra-core, omegaconf,
# antlr4 — absent there) and this checkout into /tmp/site, then runs one stage:
#   bash scripts/device.sh tests   -> the test suite on the GPU (kernels in bf16/fp16/fp32)
#   bash scripts/device.sh bench   -> the kernel benchmarks, tables into $OUT
#   bash scripts/device.sh train   -> short CLI runs of every model on the GPU
set -uo pipefail
stage=${1:-tests}
shift || true
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/site . \
  || { echo "install failed"; exit 1; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
case $stage in
  tests)  # optional arguments: test files (default: the whole suite)
    python3 -m pytest -q -m "not slow" -p no:cacheprovider --timeout 500 ${@:-tests/} 2>&1 \
      | tee "$OUT/tests.log" | tail -25 ;;
  bench)
    for b in ${@:-ssd scan based window}; do
      echo "== bench $b"
      python3 -m ssdbench.cli bench "$b" --out "$OUT" 2>&1 | tee "$OUT/bench_$b.log" | tail -30
    done ;;
  train)  # optional arguments: models (default: all four)
    for m in ${@:-transformerpp mamba2 mamba1 based}; do
      python3 -m ssdbench.cli run model=$m progress_bar=false results_dir=/tmp/results study=gpu \
        trainer.max_steps=300 2>&1 | tail -14 | tee -a "$OUT/train.log"
    done ;;
esac
