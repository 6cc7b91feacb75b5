"""Run many `ssdbench run` jobs at once on one GPU machine (the lent H100 of the device tool).

Small synthetic-task models leave an H100 idle: their steps are bound by Python and kernel
launches, so running several jobs side by side (one process each, sharing the GPU) finishes a
study many times sooner. Each line of JOBS is one job's overrides (leading NAME=value words in capitals are its
environment); jobs start in file order,
--workers at a time; a job past --job-timeout is sent SIGTERM, which the run turns into
status `interrupted` with a checkpoint (rerunning the same line resumes it).

    python scripts/gpu_study.py JOBS --workers 12 --results $OUT/results --deadline 520

Prints one line per finished job and a summary; exit 1 if any job did not end ok.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def run_job(line: str, args, t_end: float) -> tuple[str, int, float]:
    words = shlex.split(line)
    # leading NAME=value words in capitals are environment variables of this job
    env = dict(os.environ)
    while words and "=" in words[0] and words[0].split("=", 1)[0].isupper():
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    cmd = [sys.executable, "-m", "ssdbench.cli", "run", *words, "progress_bar=false",
           f"results_dir={args.results}"]
    budget = min(args.job_timeout, t_end - time.time())
    if budget < 30:
        return line, -1, 0.0  # not started: too little time left
    t0 = time.time()
    log = open(os.path.join(args.logs, f"job{abs(hash(line)) % 10**8}.log"), "w")
    log.write(line + "\n")
    log.flush()
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        rc = p.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        p.terminate()  # SIGTERM: the run saves last.ckpt and writes status interrupted
        try:
            rc = p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
    log.close()
    return line, rc, time.time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jobs", help="file with one job's overrides per line (# comments allowed)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--results", required=True)
    ap.add_argument("--logs", default=None, help="folder for per-job logs (default RESULTS/_logs)")
    ap.add_argument("--job-timeout", type=float, default=400)
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds from now after which no job starts")
    args = ap.parse_args()
    args.logs = args.logs or os.path.join(args.results, "_logs")
    os.makedirs(args.logs, exist_ok=True)
    with open(args.jobs) as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    t_end = time.time() + args.deadline
    bad = 0
    with ThreadPoolExecutor(args.workers) as pool:
        for line, rc, secs in pool.map(lambda ln: run_job(ln, args, t_end), lines):
            status = {0: "ok", -1: "not started"}.get(rc, f"exit {rc}")
            bad += rc != 0
            print(f"[{status:>11}] {secs:6.1f}s  {line}", flush=True)
    print(f"{len(lines) - bad} of {len(lines)} jobs ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
