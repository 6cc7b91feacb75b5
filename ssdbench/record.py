"""Result records: one ``record.json`` per run, written atomically, read back with pandas.

A record is written when a run starts (status ``running``), and again when it ends as ``ok``,
``failed``, ``interrupted`` or ``diverged``. Writing goes to a temporary file in the same
directory followed by ``os.replace``, so a reader never sees a half-written record.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

RECORD_NAME = "record.json"
SCHEMA_VERSION = 1
STATUSES = ("running", "ok", "failed", "interrupted", "diverged")
REQUIRED_KEYS = ("schema", "status", "run_dir", "config", "git_commit", "versions", "hardware",
                 "params", "tokens_seen", "train_flops", "wall_time_s", "tokens_per_s",
                 "peak_memory_bytes", "metrics")


def write_json_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; records are meant to be shared
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=_jsonable)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(o: Any):
    if isinstance(o, torch.Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def write_record(run_dir: Path, record: dict) -> Path:
    if record.get("status") not in STATUSES:
        raise ValueError(f"record status must be one of {STATUSES}, got {record.get('status')!r}")
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ValueError(f"record is missing keys {missing}")
    path = Path(run_dir) / RECORD_NAME
    write_json_atomic(path, record)
    return path


def read_record(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def git_commit() -> str | None:
    """The commit of the ssdbench source tree, if it is a git checkout (editable installs)."""
    src = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in ("ssdbench", "torch", "triton", "lightning", "hydra-core", "omegaconf", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    out["cuda"] = torch.version.cuda
    return out


def hardware() -> dict:
    hw = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "machine": platform.machine()}
    if torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(0)
        hw["gpu_count"] = torch.cuda.device_count()
        hw["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    else:
        hw["gpu"], hw["gpu_count"] = None, 0
    return hw


def peak_memory_bytes() -> int | None:
    """Peak GPU memory allocated by this process, or the process's max RSS on a CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    try:
        import resource
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
    except (ImportError, OSError):
        return None


def find_records(root: Path) -> list[Path]:
    return sorted(Path(root).rglob(RECORD_NAME))


# Top-level config keys that say how a run is carried out, not what it computes: a finished
# run whose config differs from a new job's only in these is the same run (skipped on rerun).
OPERATIONAL_KEYS = frozenset({"progress_bar", "resume", "force", "results_dir", "checkpoint_every",
                              "jobs_per_gpu", "logger"})


# Config keys added after records were first written, with the value every run before them
# had in effect: a record without the key compares equal to a config holding that value, so
# a rerun of an older finished sweep still skips its jobs instead of training them afresh.
ADDED_KEYS = {"trainer.cuda_graph": "auto", "trainer.gather_labels": True, "budget": None,
              "budget_over_paper": False, "budget_cut": "steps", "paper": None, "optim.schedule": "cosine", "optim.min_lr_ratio": None, "task.cache": True,
              "task.fresh_data": False, "model.abs_positions": False}


def config_differences(recorded: dict, current: dict, ignore=OPERATIONAL_KEYS) -> list[str]:
    """Dotted keys whose values differ between two resolved configs (JSON-normalised, so a
    config read back from a record compares equal to the one it was written from). A key of
    ADDED_KEYS that the record lacks counts as its value then."""
    a = json.loads(json.dumps({k: v for k, v in (recorded or {}).items() if k not in ignore},
                              default=_jsonable))
    b = json.loads(json.dumps({k: v for k, v in (current or {}).items() if k not in ignore},
                              default=_jsonable))
    out: list[str] = []

    def walk(x, y, prefix):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y), key=str):
                walk(x.get(k, _MISSING), y.get(k, _MISSING), f"{prefix}{k}.")
        elif x != y and not (x is _MISSING and ADDED_KEYS.get(prefix[:-1], _MISSING) == y):
            out.append(prefix[:-1])

    walk(a, b, "")
    return out


_MISSING = object()
