#!/usr/bin/env bash
# A study on the lent GPU in one device call (issue 25): each line of SWEEPS is one
# `ssdbench run -m` sweep run with the local launcher, JOBS runs sharing the GPU, each worker
# process training job after job, so that the start-up (14-17 s of imports on the H100
# machine) is paid once per worker, not per run (results/h100/engine/README.md). The sweeps run
# one after another; no job starts after START_BY seconds from the start (SSDBENCH_NO_START_AFTER:
# leave room for the longest job), and after DEADLINE seconds every job still training gets
# SIGTERM (it saves its checkpoint and an `interrupted` record). The results go back tarred as
# $OUT/NAME.tgz (run directory names hold '=' and ',', which the device tool does not copy as
# files); if .studies/NAME.tgz is in the tree (carry: [".studies", ".whl"]) it is unpacked first,
# so a rerun skips the finished runs and resumes the interrupted ones.
# The device returns files of at most 16 MiB: past that the checkpoints stay behind (an
# interrupted run then starts afresh when rerun; on a machine still warm from the last call,
# /tmp/studies keeps them, so call again at once).
# PARALLEL=1 starts every line at once, each with JOBS jobs sharing the GPU (for sweeps of few
# long runs, e.g. one line per architecture group); the deadline applies to all of them.
#   DEADLINE=540 START_BY=400 JOBS=4 bash scripts/study_sweep.sh scripts/sweeps_fig8_t256_b8_d64.txt
set -uo pipefail
sweeps=$1
name=$(basename "$sweeps" .txt)
OUT=${OUT:-/tmp/out}
DEADLINE=${DEADLINE:-480}
JOBS=${JOBS:-4}
START_BY=${START_BY:-$(( DEADLINE * 3 / 4 ))}
export SSDBENCH_NO_START_AFTER=$(( $(date +%s) + START_BY ))
RESULTS=/tmp/studies
mkdir -p "$OUT" "$RESULTS"
if [ -z "${SSDBENCH_ON_CPU:-}" ]; then  # on the device: the wheels, the package links
  bash scripts/device.sh tests tests/test_record.py > /dev/null 2>&1
  export PYTHONPATH=/tmp/site:$PWD
  launcher="hydra/launcher=local jobs_per_gpu=$JOBS"
else  # a CPU check of this script (tests the deadline and the tarball, not the GPU)
  launcher="hydra/launcher=local hydra.launcher.n_jobs=$JOBS"
fi
export PYTHONUNBUFFERED=1
[ -f ".studies/$name.tgz" ] && tar xzf ".studies/$name.tgz" -C "$RESULTS" && echo "resumed from .studies/$name.tgz"
start=$SECONDS
n=0
pids=()
finish() {  # wait for sweep $1 (process $2, deadline timer $3) and summarise it
  wait "$2"
  echo "sweep $1 exit $?"
  kill "$3" 2> /dev/null
  tail -n 30 "$OUT/${name}_sweep$1.log" | grep -E "job|ok|interrupted|failed|diverged" | tail -n 25
}
while read -r line; do
  case "$line" in ''|'#'*) continue ;; esac
  n=$((n + 1))
  left=$(( DEADLINE - (SECONDS - start) ))
  if [ "$left" -lt 30 ]; then echo "sweep $n not started: ${left} s left"; continue; fi
  echo "== sweep $n ($left s left): $line"
  # its own process group, so that SIGTERM at the deadline reaches every worker and its job
  # shellcheck disable=SC2086
  setsid python3 -m ssdbench.cli run -m $launcher $line results_dir="$RESULTS" progress_bar=false \
    > "$OUT/${name}_sweep$n.log" 2>&1 &
  pid=$!
  # the deadline timer: its sleep must die with it and must not hold this script's output open,
  # or the device call waits for every timer's full deadline after the sweeps have finished
  # (a 3-minute resume call once held the GPU for its whole 7-minute deadline:
  # results/h100/fig8_t256_steps/README.md)
  ( sleep "$left" & s=$!; trap 'kill $s; exit 0' TERM; wait $s; kill -TERM -- "-$pid" ) > /dev/null 2>&1 &
  timer=$!
  if [ "${PARALLEL:-0}" = 1 ]; then pids+=("$n $pid $timer"); else finish "$n" "$pid" "$timer"; fi
done < "$sweeps"
for p in ${pids[@]+"${pids[@]}"}; do  # (an empty array is "unbound" under set -u before bash 4.4)
  # shellcheck disable=SC2086
  finish $p
done
# the checkpoints of finished runs are not needed (a rerun skips them by their record); those
# of interrupted runs are what a rerun resumes from
python3 - "$RESULTS" <<'PY'
import json, pathlib, sys
for rec in pathlib.Path(sys.argv[1]).rglob("record.json"):
    if json.loads(rec.read_text()).get("status") == "ok":
        for ckpt in (rec.parent / "checkpoints").glob("*.ckpt"):
            ckpt.unlink()
PY
# The device returns at most 16 MiB. Checkpoints barely compress: when theirs alone pass the
# limit, the results go without them at once (compressing D=256's first, then again without
# them, ran the call that trained Figure 8 at D=256 past its 600 s limit).
limit=$(( 15 * 1024 * 1024 ))
pack() { tar czf "$OUT/$name.tgz" "$@" -C "$RESULTS" .; }
ckpt_bytes=$(find "$RESULTS" -name "*.ckpt" -printf "%s\n" | awk '{s += $1} END {print s + 0}')
if [ "$ckpt_bytes" -gt "$limit" ]; then
  echo "the checkpoints pass 15 MiB ($ckpt_bytes bytes): results sent without them"
  pack --exclude="*.ckpt"
elif pack && [ "$(stat -c %s "$OUT/$name.tgz")" -gt "$limit" ]; then
  echo "the results with checkpoints pass 15 MiB: sent without them"
  pack --exclude="*.ckpt"
fi
ls -la "$OUT/$name.tgz"
