#!/usr/bin/env bash
# One device call for the study engine (issue 23): import times, the GPU tests of the graphed loop, 200-step
# runs of every architecture through it, and `ssdbench bench study` (with Lightning's loop and 4
# jobs sharing the GPU) for the results table. Logs and tables go to $OUT.
#   bash scripts/engine_gpu.sh [BENCH ARGS...]
set -uo pipefail
OUT=${OUT:-/tmp/out}
bash scripts/device.sh tests tests/test_record.py > /dev/null 2>&1  # installs the wheels, links the packages
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
# where a run's 14-17 s of "imports and config" go on this machine (results/h100/engine/README.md)
for stmt in "import torch" "import torch; torch.cuda.init()" "import lightning" "import ssdbench.train"; do
  python3 -c "import time; t = time.time(); exec('$stmt'); print(f'{time.time() - t:.2f} s  $stmt')" \
    2>&1 | tail -1 | tee -a "$OUT/import_times.txt"
done
python3 -X importtime -c "import ssdbench.train" 2> "$OUT/importtime.txt"
sort -t'|' -k2 -n "$OUT/importtime.txt" | tail -12
timeout 200 python3 -m pytest -q -rfE -n 3 -p no:cacheprovider -s tests/test_engine.py > "$OUT/tests_engine.log" 2>&1
echo "engine tests: $(tail -1 "$OUT/tests_engine.log")"
grep -E "relative loss differences|FAILED|Error" "$OUT/tests_engine.log" | head -8
for m in mamba1 based; do
  python3 -m ssdbench.cli run model=$m progress_bar=false results_dir=/tmp/res study=gpu trainer.max_steps=200 \
    > "$OUT/run_$m.log" 2>&1
  echo "$m rc=$? $(grep -E 'ssdbench run:' "$OUT/run_$m.log" | head -2)"
  python3 -c "import json,glob; r=json.load(open(glob.glob('/tmp/res/gpu/*model=$m*/record.json')[0])); print(r['status'], r['cuda_graph'], r['metrics'].get('val/acc'), r['wall_time_s'])"
done
timeout "${STUDY_TIMEOUT:-330}" python3 -m ssdbench.cli bench study "$@" --out "$OUT" 2>&1 | tee "$OUT/bench_study.log" | tail -24
