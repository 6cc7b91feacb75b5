"""`ssdbench run`: the Hydra application that trains one configuration and writes its record.

Flow of one run: compose config -> skip it if its run directory already holds an ok record of
the same config -> build trainer, task data and model (invalid configs stop here with one line
and exit code 2) -> Lightning fit with checkpointing -> final evaluation -> record.

In a sweep (-m) each job's outcome also goes to a journal in the sweep directory, whichever
launcher ran it (in this process, in joblib workers or as SLURM array tasks); `ssdbench run`
prints the journal as a table at the end and exits 1 if any job did not finish ok.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ssdbench import engine, preflight
from ssdbench import record as rec
import ssdbench.budget  # the budget knob's checks, record fields and config resolvers
from ssdbench.errors import ConfigError, DivergedError
from ssdbench.lit import SequenceLM

EXIT_CONFIG = 2  # invalid configuration: nothing was trained
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130

# Jobs of this process that did not end ok; the CLI turns a non-empty list into exit code 1
# after a multirun so that one bad job does not stop the others (the journal below is the
# fuller account; this list is the fallback when the journal callback is switched off).
FAILED_JOBS: list[str] = []

# The sweep journal: a folder with one JSON file per job. The parent process names it (see
# SweepJournal) and passes it to the jobs through the environment, which joblib workers and
# SLURM array tasks inherit.
JOURNAL_ENV = "SSDBENCH_SWEEP_JOURNAL"
SWEEP_JOURNAL: Path | None = None  # set in the process that runs the sweep
# argv[0] of the `ssdbench` command, so that DDP can start its extra processes with it
ENTRY_ARGV0: str | None = None


def _run_name(override_dirname: str) -> str:
    """Deterministic run-directory name from the overrides ('default' when there are none)."""
    name = re.sub(r"[^A-Za-z0-9=,._+\-]", "_", override_dirname or "")
    return name[:200] or "default"


def _auto_precision(choice: str = "auto") -> str:
    if choice != "auto":
        return choice
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


class _DropAdverts(logging.Filter):
    """Lightning prints an advert for a cloud logger on every run; keep run logs to the point."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropAdverts())
    # Noise that says nothing about the run: a deprecation inside Lightning, and a hint about
    # log intervals on tiny datasets.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


def _local_jobs(jobs_per_gpu: int = 1) -> int:
    """Default parallelism of hydra/launcher=local: GPUs x jobs_per_gpu, or half the CPU cores."""
    n_gpus = torch.cuda.device_count()
    if n_gpus:
        return n_gpus * max(1, int(jobs_per_gpu))
    return max(1, (os.cpu_count() or 2) // 2)


def _wandb_id(run_dir: str) -> str:
    """The W&B run id of a run directory, created once and kept in <run dir>/wandb_id so that a
    resumed run continues the same W&B run. Exclusive creation: when DDP processes resolve it
    at the same time they still agree."""
    path = Path(run_dir) / "wandb_id"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "x") as f:
                f.write(uuid.uuid4().hex[:16])
        except FileExistsError:
            pass
    return path.read_text().strip()


def _wandb_tags(overrides) -> list[str]:
    """The overrides that say what a run computes (not results_dir=, progress_bar=, ...), cut
    to the 64 characters W&B accepts (long list overrides such as task segments)."""
    skip = rec.OPERATIONAL_KEYS | {"study"}
    return [str(o)[:64] for o in overrides or [] if str(o).split("=", 1)[0].lstrip("+~") not in skip]


for _name, _fn in (("ssdbench.run_name", _run_name), ("ssdbench.precision", _auto_precision),
                   ("ssdbench.local_jobs", _local_jobs), ("ssdbench.wandb_id", _wandb_id),
                   ("ssdbench.wandb_tags", _wandb_tags)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


class Terminated(SystemExit):
    """SIGTERM outside trainer.fit (handled like Lightning's SIGTERMException inside it)."""


@contextlib.contextmanager
def _sigterm_raises():
    """Turn SIGTERM into a `Terminated` exception for the duration (main thread only).

    After fit, Lightning has put the default SIGTERM action back, which ends the process at
    once: a job scheduler's timeout during the final validation or a long evaluation (induction
    heads up to 2^20 tokens) would leave the record "running" and no checkpoint."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(EXIT_INTERRUPTED)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class RecordCallback(Callback):
    """Keeps the run's record.json current: running at start, the outcome at the end.

    On Ctrl-C, SIGTERM or an exception it saves ``checkpoints/last.ckpt`` first, so that a
    rerun with the same overrides resumes from where this one stopped. With several processes
    (DDP) only rank 0 writes, and counts are global: every rank trains on a batch of the same
    size each step, so global tokens = tokens of one rank x world size.
    """

    def __init__(self, run_dir: Path, ckpt_path: Path, base: dict | None = None):
        self.run_dir, self.base, self.ckpt_path = run_dir, base, ckpt_path
        self.t0 = time.time()
        self.tokens_at_start = 0
        self.status = "running"
        self.error: str | None = None
        self.startup: dict[str, float] = {}

    def startup_mark(self, phase: str) -> None:
        """Seconds to the end of ``phase`` (record "startup_s") from the process's start, or in a
        sweep from the end of the previous job in this process."""
        self.startup[phase] = round(time.time() - ssdbench.STARTUP_FROM, 3)

    def on_fit_start(self, trainer, pl_module):
        self.t0 = time.time()
        self.tokens_at_start = pl_module.tokens_seen
        self.write(trainer, pl_module, "running")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if "first_step" not in self.startup:  # Lightning's loop (the graphed one marks its own)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.startup_mark("first_step")

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, DivergedError):
            status = "diverged"
        elif isinstance(exception, (KeyboardInterrupt, SystemExit)):  # SIGTERMException is a SystemExit
            status = "interrupted"
        else:
            status = "failed"
        # A diverged state is not worth resuming from, nor one a KeyboardInterrupt cut into
        # (a second Ctrl-C, engine.StopAtStepEnd: the step it landed in may be half applied).
        # With several processes, saving here would wait at a barrier for ranks that may never
        # get there. Those runs resume from the last periodic checkpoint (checkpoint_every).
        if status != "diverged" and not isinstance(exception, KeyboardInterrupt):
            self.save_checkpoint(trainer)
        self.error = f"{type(exception).__name__}: {exception}"
        self.write(trainer, pl_module, status)

    def save_checkpoint(self, trainer) -> None:
        """last.ckpt for a rerun to resume from; one process only (see on_exception)."""
        if trainer.world_size != 1:
            return
        try:
            trainer.save_checkpoint(self.ckpt_path)
        except Exception as e:  # noqa: BLE001 - the record matters more than the checkpoint
            print(f"warning: could not save {self.ckpt_path}: {e}", file=sys.stderr)

    def write(self, trainer, pl_module, status: str, metrics: dict | None = None) -> Path:
        self.status = status
        path = Path(self.run_dir) / rec.RECORD_NAME
        if not trainer.is_global_zero:
            return path
        world = int(trainer.world_size)
        elapsed = time.time() - self.t0
        tokens = int(pl_module.tokens_seen) * world
        tokens_now = (pl_module.tokens_seen - self.tokens_at_start) * world
        seq_len = self.base.get("seq_len") or 1
        r = dict(self.base)
        r.update(
            status=status,
            error=self.error,
            world_size=world,
            global_step=int(trainer.global_step),
            tokens_seen=tokens,
            train_flops=int(3 * pl_module.model.flops_per_token(seq_len) * tokens),
            train_flops_6nd=int(6 * self.base["params"]["non_embedding"] * tokens),
            wall_time_s=round(elapsed, 3),
            tokens_per_s=round(tokens_now / elapsed, 1) if elapsed > 0 else None,
            peak_memory_bytes=rec.peak_memory_bytes(),
            metrics=metrics or {},
            startup_s=dict(self.startup),  # seconds from process start to the end of each phase
            finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        return rec.write_record(self.run_dir, r)


class StepProgress(Callback):
    """One line for Lightning's loop, as the graphed loop shows it: step / max steps, the loss,
    tokens/s and the last val/acc, refreshed every log_every_n_steps steps (Lightning's own
    bar counted batches per epoch: "Epoch 2/-2 ... v_num: 0.000" with max_epochs=-1)."""

    def __init__(self):
        self.bar, self.val = None, None

    def on_train_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.bar = engine._Progress(trainer.max_steps, trainer.global_step)
            self.t, self.tokens = time.perf_counter(), pl_module.tokens_seen

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        n = trainer.global_step
        if self.bar is None or (n % max(1, trainer.log_every_n_steps) and n != trainer.max_steps):
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        now = time.perf_counter()
        rate = (pl_module.tokens_seen - self.tokens) * trainer.world_size / max(now - self.t, 1e-9)
        self.t, self.tokens = now, pl_module.tokens_seen
        self.bar.update(n, float(loss), rate, "" if self.val is None else f"  val/acc {self.val:.3f}")

    def on_validation_end(self, trainer, pl_module):
        acc = trainer.callback_metrics.get("val/acc")
        self.val = None if acc is None else float(acc)

    def _close(self, *args):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    on_train_end = on_exception = _close


def build(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, unwrapping a ConfigError raised by the constructor (Hydra wraps
    every constructor error in an InstantiationException; ours must stay one clear line)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def _check_fields(node: DictConfig, group: str) -> None:
    """Every key of a config group must be an argument of its _target_ (e.g. heads= on a model
    without head structures), so the mistake is one line instead of a TypeError traceback."""
    target = hydra.utils.get_object(node._target_)
    params = inspect.signature(target).parameters
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for key in node:
        if not key.startswith("_") and key not in params:
            hint = " (heads= applies to models with head structures: mamba2, transformerpp)" \
                if key == "head_structure" else ""
            raise ConfigError(f"{group}.{key}", f"is not an option of {node._target_}{hint}")


def _check_run_options(cfg: DictConfig) -> None:
    # first: with a bad budget the steps it scales (trainer.max_steps) resolve to null
    ssdbench.budget.check_budget(cfg)
    for key in ("max_steps",):
        v = cfg.trainer.get(key)
        if not (isinstance(v, int) and v > 0):
            raise ConfigError(f"trainer.{key}", f"must be a positive integer, got {v!r}")
    if cfg.optim.lr <= 0:
        raise ConfigError("optim.lr", f"must be positive, got {cfg.optim.lr}")
    ladder = cfg.get("ladder")  # the micro ladder's presets read width and depth from its size table
    if ladder is not None and str(ladder.get("size")) not in ladder.get("sizes", {}):
        raise ConfigError("ladder.size", f"unknown size {ladder.get('size')!r}; one of {', '.join(ladder.get('sizes', {}))}")
    if not isinstance(cfg.trainer.get("gather_labels", True), bool):
        raise ConfigError("trainer.gather_labels", f"must be true or false, got {cfg.trainer.gather_labels!r}")


def _build(cfg: DictConfig, world_size: int = 1):
    """Data and model from the config; ConfigError for anything invalid, before training.

    task.batch_size is the global batch, so that a sweep means the same thing on one GPU or
    eight: with several processes each trains on its share (see _shard_batches)."""
    _check_fields(cfg.model, "model")
    _check_fields(cfg.task, "task")
    if not isinstance(cfg.get("compile", False), bool):
        raise ConfigError("compile", f"must be true or false, got {cfg.compile!r}")
    batch = cfg.task.get("batch_size")
    if world_size > 1 and batch is not None and batch % world_size:
        raise ConfigError("task.batch_size", f"the global batch {batch} is not divisible by the "
                          f"{world_size} training processes (trainer.devices x trainer.num_nodes)")
    datamodule = build(cfg.task)
    model = build(cfg.model)
    if getattr(datamodule, "vocab_size", None) is not None and model.vocab_size < datamodule.vocab_size:
        raise ConfigError("model.vocab_size", f"{model.vocab_size} is smaller than the task's "
                          f"vocabulary ({datamodule.vocab_size})")
    return datamodule, model


class _RankShare(torch.utils.data.Sampler):
    """Every process draws the same sequence of global batches (same seed) and keeps its
    share, batch[rank::world]: all ranks take the same number of steps, and a step's examples
    come from one task segment (one sequence length) on every rank. A remainder batch smaller
    than the world repeats an example rather than leave a rank without one."""

    def __init__(self, batches, trainer):
        self.batches, self.trainer = batches, trainer

    def __iter__(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        for b in self.batches:
            b = list(b)
            yield b[rank::world] if len(b) >= world else [b[rank % len(b)]]

    def __len__(self):
        return len(self.batches)


def _shard_batches(datamodule, trainer) -> None:
    """Split the task's global batches across DDP/FSDP processes. Lightning's own answer, a
    DistributedSampler injected into the loader, cannot enter a custom batch sampler (the tasks
    batch within segments of equal length), so the trainer runs with
    use_distributed_sampler=False and each loader's batch sampler is wrapped here instead."""
    from torch.utils.data import DataLoader

    def wrap(make):
        def loader():
            dl = make()
            if not isinstance(dl, DataLoader) or dl.batch_sampler is None:
                raise ConfigError("trainer.devices", "training on several processes needs map-style "
                                  "data loaders with a batch sampler")
            return DataLoader(dl.dataset, batch_sampler=_RankShare(dl.batch_sampler, trainer),
                              num_workers=dl.num_workers, collate_fn=dl.collate_fn,
                              pin_memory=dl.pin_memory, worker_init_fn=dl.worker_init_fn,
                              persistent_workers=dl.persistent_workers)
        return loader

    for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
        if hasattr(datamodule, name):
            setattr(datamodule, name, wrap(getattr(datamodule, name)))


def _latest_checkpoint(run_dir: Path) -> Path | None:
    """checkpoints/last.ckpt, or Lightning's SLURM requeue checkpoint (hpc_ckpt_<n>.ckpt in
    the run directory) when that one is newer."""
    candidates = [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
    existing = [c for c in candidates if c.is_file()]
    return max(existing, key=lambda c: c.stat().st_mtime) if existing else None


def _checkpoint_keys(path) -> set[str]:
    """The top-level keys of a checkpoint (to tell which loop wrote it)."""
    try:
        return set(torch.load(path, map_location="cpu", weights_only=False, mmap=True))
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is Lightning's to report
        return set()


def _comparable_config(cfg: DictConfig) -> dict:
    """The resolved config without its operational keys (logger included: resolving it would
    create the W&B id file of a job that is about to be skipped)."""
    out = {}
    for k in cfg:
        if k in rec.OPERATIONAL_KEYS:
            continue
        v = cfg[k]
        out[k] = OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
    return out


def _previous_run(cfg: DictConfig, run_dir: Path) -> tuple[dict | None, list[str]]:
    """The record already in run_dir (None if none or unreadable) and the config keys in which
    it differs from this job."""
    path = run_dir / rec.RECORD_NAME
    if not path.exists():
        return None, []
    try:
        previous = rec.read_record(path)
    except (OSError, ValueError):
        return None, []
    return previous, rec.config_differences(previous.get("config") or {}, _comparable_config(cfg))


def _env_rank() -> int:
    """This process's global rank from the launcher's environment, before Lightning knows it
    (Lightning's DDP children, torchrun, SLURM tasks); 0 for an ordinary single process."""
    env = os.environ
    if env.get("RANK", "").isdigit():
        return int(env["RANK"])
    if env.get("SLURM_NTASKS", "1") != "1" and env.get("SLURM_PROCID", "").isdigit():
        return int(env["SLURM_PROCID"])
    if int(env.get("NODE_RANK", "0") or 0) > 0:
        return 1  # not rank 0; the exact number does not matter here
    return int(env.get("LOCAL_RANK", "0") or 0)


# ---- GPU per job for parallel local sweeps -------------------------------------------------
_GPU_SLOT: tuple[int, object] | None = None  # (gpu, open lock file) held for the worker's life


def claim_gpu_slot(n_gpus: int, jobs_per_gpu: int, key: str) -> int | None:
    """A GPU for this worker process: the first free one of n_gpus x jobs_per_gpu slots, held
    (an flock on a file) until the process exits. Exclusive whatever order jobs finish in,
    unlike job_number % n_gpus. None when every slot is taken (more workers than slots)."""
    global _GPU_SLOT
    if _GPU_SLOT is not None:
        return _GPU_SLOT[0]
    import fcntl

    folder = Path(tempfile.gettempdir()) / f"ssdbench-gpu-slots-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    for slot in range(n_gpus * max(1, jobs_per_gpu)):
        f = open(folder / f"{slot}.lock", "w")  # noqa: SIM115 - held open on purpose
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        _GPU_SLOT = (slot % n_gpus, f)  # slots 0..n-1 first: one job per GPU before doubling up
        return _GPU_SLOT[0]
    return None


def _trainer_overrides(cfg: DictConfig) -> dict:
    """hydra/launcher=local on a machine with several GPUs: pin this job to one of them."""
    launcher = str(HydraConfig.get().launcher.get("_target_", ""))
    if "joblib" not in launcher:
        return {}
    n_gpus = torch.cuda.device_count()
    devices = cfg.trainer.get("devices")
    if n_gpus < 2 or cfg.trainer.get("accelerator") not in ("auto", "gpu", "cuda") or devices not in (1, "1", "auto"):
        return {}
    key = re.sub(r"\W", "_", os.environ.get(JOURNAL_ENV, str(os.getppid())))[-80:]
    gpu = claim_gpu_slot(n_gpus, int(cfg.get("jobs_per_gpu", 1) or 1), key)
    if gpu is None:  # more workers than slots (hydra.launcher.n_jobs set high): share round-robin
        gpu = HydraConfig.get().job.num % n_gpus
    return {"devices": [gpu], "accelerator": "gpu"}


def _ddp_child_argv(cfg: DictConfig) -> None:
    """Lightning starts the extra DDP processes by re-running this process's command line
    (sys.argv) with hydra.run.dir pointing at this run directory. Make that command this one
    job as a single run: `ssdbench run <this job's overrides>` (in a sweep, sys.argv still
    holds -m and every swept value)."""
    import __main__

    spec = getattr(__main__, "__spec__", None)
    if spec is not None and spec.name != "ssdbench.cli":
        raise ConfigError("trainer.devices", "training on several processes is started from the "
                          "`ssdbench run` command only (not from a joblib worker or another "
                          "program): use hydra/launcher=basic or slurm, or torchrun")
    if HydraConfig.get().run.dir != HydraConfig.get().runtime.output_dir:
        raise ConfigError("hydra.sweep.dir", "DDP in a sweep needs the run and sweep directories "
                          "to agree (leave hydra.run.dir / hydra.sweep.* at their defaults)")
    argv0 = sys.argv[0] if spec is not None else (ENTRY_ARGV0 or sys.argv[0])
    sys.argv = [argv0, "run", *HydraConfig.get().overrides.task]


def train(cfg: DictConfig, previous: dict | None = None, fresh: bool = False) -> dict:
    """Train one configuration; returns the final metrics. Raises ConfigError / DivergedError.

    fresh: do not resume from this run directory's checkpoint (it belongs to a finished run
    being redone with force=true, or to a different config)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    _quiet_lightning()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    _check_run_options(cfg)

    ckpt_dir = run_dir / "checkpoints"
    last_ckpt = ckpt_dir / "last.ckpt"
    resume = None
    if cfg.resume == "auto":
        latest = None if fresh else _latest_checkpoint(run_dir)
        resume = str(latest) if latest else None
    elif cfg.resume not in (None, False, "none"):
        resume = str(cfg.resume)
        if not Path(resume).exists():
            raise ConfigError("resume", f"checkpoint {resume} does not exist")
    if fresh and _env_rank() == 0:
        # a new attempt from scratch is a new W&B run too
        (run_dir / "wandb_id").unlink(missing_ok=True)

    # The trainer comes first: it knows how many processes share the global batch.
    record_cb = RecordCallback(run_dir, last_ckpt)
    record_cb.startup_mark("imports_and_config")
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                        every_n_train_steps=cfg.checkpoint_every, enable_version_counter=False),
        record_cb,
    ]
    if cfg.progress_bar:
        callbacks.append(StepProgress())
    # One CSV per attempt (logs/version_<k>/metrics.csv): a resumed run appends a new version
    # instead of overwriting the metrics of the attempt it continues.
    loggers = [CSVLogger(save_dir=str(run_dir), name="logs")]
    for extra in (cfg.get("logger") or {}).values():
        if extra is not None:
            loggers.append(build(extra))
    # trainer.cuda_graph chooses ssdbench's graphed loop (ssdbench/engine.py) and
    # trainer.gather_labels the loss's head on labelled positions only (SequenceLM); neither is
    # an argument of lightning.Trainer
    trainer_node = cfg.trainer.copy()
    with open_dict(trainer_node):
        graph_choice = preflight.parse_cuda_graph(trainer_node.pop("cuda_graph", "auto"))
        trainer_node.pop("gather_labels", None)
    if graph_choice is True and not torch.cuda.is_available():
        engine.decide(True, None, cfg)  # the one-line error, before anything is built
    trainer = build(trainer_node, callbacks=callbacks, logger=loggers, default_root_dir=str(run_dir),
                    enable_progress_bar=False, use_distributed_sampler=False,
                    **_trainer_overrides(cfg))
    record_cb.startup_mark("trainer")
    use_graphs, why = engine.decide(graph_choice, trainer, cfg)
    if not use_graphs and torch.cuda.is_available() and graph_choice is not False:
        print(f"ssdbench run: CUDA graphs off ({why}): Lightning's loop trains this run", file=sys.stderr)
    trainer.ssdbench_graphs = (use_graphs, why)
    world = int(trainer.world_size)
    launches = world > 1 and not trainer.strategy.cluster_environment.creates_processes_externally
    if launches:
        _ddp_child_argv(cfg)
    try:
        return _fit_and_record(cfg, trainer, world, run_dir, record_cb, resume, previous)
    finally:
        if launches:
            _end_process_group()


# Environment that Lightning's DDP launcher sets in the launching process. Left behind, the
# next job of a sweep would take itself for a process started by someone else and wait for
# peers that never come.
_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_ENV_AT_IMPORT = {k: os.environ.get(k) for k in _LAUNCHER_ENV}


def _end_process_group() -> None:
    """After a job that started its own DDP processes: close the process group (the peers have
    exited) and restore the launcher's environment, so that the next job of a sequential sweep
    starts its processes afresh."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for k, v in _ENV_AT_IMPORT.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _fit_and_record(cfg, trainer, world, run_dir, record_cb, resume, previous) -> dict:
    datamodule, model = _build(cfg, world)
    if cfg.get("compile", False):
        # torch.compile in place (nn.Module.compile): the state dict, and so checkpoints and
        # resumes, stay those of the plain model. The project's kernels are autograd Functions
        # that compile treats as opaque; it fuses the norms, gates, RoPE and MLP around them.
        model.compile()
    if world > 1:
        _shard_batches(datamodule, trainer)
    datamodule.setup("fit")
    record_cb.startup_mark("model_and_data")
    lit = SequenceLM(model, **OmegaConf.to_container(cfg.optim), total_steps=cfg.trainer.max_steps,
                     slice_names=datamodule.slice_names, gather_labels=cfg.trainer.get("gather_labels", True))
    seq_len = getattr(datamodule, "max_seq_len", None)
    record_cb.base = dict(
        schema=rec.SCHEMA_VERSION,
        run_dir=str(run_dir),
        study=cfg.study,
        model_name=HydraConfig.get().runtime.choices.get("model"),
        arch=model.arch,
        task_name=HydraConfig.get().runtime.choices.get("task"),
        overrides=list(HydraConfig.get().overrides.task),
        config=OmegaConf.to_container(cfg, resolve=True),
        git_commit=rec.git_commit(),
        versions=rec.package_versions(),
        hardware=rec.hardware(),
        params={"total": model.num_params(), "non_embedding": model.num_params(non_embedding=True)},
        state_size=model.state_size(),
        seq_len=seq_len,
        flops_per_token_fwd=model.flops_per_token(seq_len or 1),
        batch_size_per_device=(cfg.task.batch_size // world) if cfg.task.get("batch_size") else None,
        resumed_from=resume,
        previous_status=(previous or {}).get("status"),
        budget=ssdbench.budget.record_fields(cfg),  # fraction of the paper's steps; None outside a protocol
    )
    use_graphs, why = getattr(trainer, "ssdbench_graphs", (False, None))
    loop = None
    if use_graphs:
        loop = engine.Engine(lit, datamodule, trainer, record_cb, ckpt_path=run_dir / "checkpoints" / "last.ckpt",
                             checkpoint_every=cfg.checkpoint_every, graphs=True,
                             progress_bar=bool(cfg.progress_bar), terminated=Terminated)
    elif resume and engine.ENGINE_KEY in _checkpoint_keys(resume):
        raise ConfigError("trainer.cuda_graph", f"{resume} was written by the graphed loop, which this "
                          f"run cannot use ({why}); resume it where CUDA graphs run, or force=true")
    record_cb.base["cuda_graph"] = {"mode": "graphs" if use_graphs else "lightning", "why_not": why}
    runner = loop or trainer  # what the record reads step counts from and checkpoints through
    metrics: dict = {}
    try:
        if loop is not None:
            loop.fit(resume)
        else:
            # Ctrl-C as Lightning's SIGTERM: stop at the end of a step (engine.StopAtStepEnd)
            with engine.StopAtStepEnd((signal.SIGINT,), on_set=lambda: setattr(
                    trainer._signal_connector, "received_sigterm", True)):
                trainer.fit(lit, datamodule=datamodule, ckpt_path=resume)
            if trainer.interrupted:  # stopped by a callback or signal without an exception reaching us
                raise KeyboardInterrupt
            # Under SLURM, Lightning's validate() loads the newest hpc_ckpt_<n>.ckpt of the run
            # directory when it finds one: a requeue checkpoint older than the weights in memory.
            # Training is over, so they are of no further use.
            if trainer.is_global_zero:
                for stale in run_dir.glob("hpc_ckpt_*.ckpt"):
                    stale.unlink(missing_ok=True)
            trainer.strategy.barrier("ssdbench-hpc-cleanup")
        with _sigterm_raises():  # Lightning turns SIGTERM into an exception only inside fit
            if loop is not None:
                metrics = loop.validate()
                loop._log(metrics, loop.global_step)
                loop._save_logs()
                record_cb.base["cuda_graph"].update(loop.record_fields())
            else:
                final = trainer.validate(lit, datamodule=datamodule, verbose=False)[0]
                metrics = {k: float(v) for k, v in final.items()}
            if not runner.is_global_zero:  # the other DDP processes are done: rank 0 reports
                return metrics
            # Tasks with an evaluation beyond the validation loop (e.g. induction heads at test
            # lengths up to 2^20, streamed through the recurrent path) provide
            # evaluate_model(model) -> metrics.
            evaluate = getattr(datamodule, "evaluate_model", None)
            if evaluate is not None:
                metrics.update({k: float(v) for k, v in evaluate(lit.model).items()})
    except BaseException as e:
        # An error or a SIGTERM outside fit (validation, evaluation) must not leave the record
        # "running"; inside fit, on_exception has already recorded it. An interrupted
        # evaluation keeps the weights (a rerun resumes at the last step and evaluates again)
        # and the metrics it had.
        if loop is not None:
            record_cb.base["cuda_graph"].update(loop.record_fields())
        if record_cb.status == "running":
            record_cb.error = f"{type(e).__name__}: {e}"
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                record_cb.save_checkpoint(runner)
                record_cb.write(runner, lit, "interrupted", metrics or None)
            else:
                record_cb.write(runner, lit, "failed")
        raise
    path = record_cb.write(runner, lit, "ok", metrics)
    _print_summary(cfg, metrics, path, record_cb)
    return metrics


def _print_summary(cfg: DictConfig, metrics: dict, path: Path, record_cb: RecordCallback) -> None:
    console = Console()
    table = Table(title=f"ssdbench run: {HydraConfig.get().runtime.choices.get('model')} on "
                        f"{HydraConfig.get().runtime.choices.get('task')}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in sorted(metrics):
        table.add_row(k, f"{metrics[k]:.4f}")
    r = rec.read_record(path)
    table.add_row("params", f"{r['params']['total']:,}")
    table.add_row("tokens seen", f"{r['tokens_seen']:,}")
    table.add_row("wall time (s)", f"{r['wall_time_s']:.1f}")
    table.add_row("tokens/s", f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-")
    console.print(table)
    console.print(f"record: {path}")


# ---- sweeps: journal and summary ------------------------------------------------------------
class SweepJournal(HydraCallback):
    """Hydra callback (conf/config.yaml, hydra.callbacks): at the start of a multirun it names
    a fresh journal folder in the sweep directory and exports it to the jobs."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        global SWEEP_JOURNAL
        stamp = time.strftime("%Y%m%d-%H%M%S")
        folder = Path(config.hydra.sweep.dir).absolute() / ".sweeps" / f"{stamp}-{os.getpid()}"
        folder.mkdir(parents=True, exist_ok=True)
        SWEEP_JOURNAL = folder
        os.environ[JOURNAL_ENV] = str(folder)


# Unix time after which `ssdbench run` starts no new job (an ok one is still skipped as usual)
NO_START_AFTER_ENV = "SSDBENCH_NO_START_AFTER"


def _no_start_after() -> float | None:
    """SSDBENCH_NO_START_AFTER as a Unix time (None when unset); ConfigError when it is not one."""
    value = os.environ.get(NO_START_AFTER_ENV, "").strip()
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise ConfigError(NO_START_AFTER_ENV, f"must be a Unix time in seconds (date +%s), got {value!r}") from None


def _journal(status: str, error: str | None = None, metrics: dict | None = None) -> None:
    """Record this job's outcome in the sweep journal (rank 0 only; nothing outside a sweep)."""
    folder = os.environ.get(JOURNAL_ENV)
    if not folder or HydraConfig.get().mode != RunMode.MULTIRUN or _env_rank() != 0:
        return
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    entry = {"job": int(hc.job.num), "name": run_dir.name, "run_dir": str(run_dir),
             "overrides": list(hc.overrides.task), "status": status, "error": error}
    r = run_dir / rec.RECORD_NAME
    if r.exists():
        try:
            data = rec.read_record(r)
            entry.update(global_step=data.get("global_step"), wall_time_s=data.get("wall_time_s"))
            metrics = metrics if metrics is not None else data.get("metrics")
        except (OSError, ValueError):
            pass
    entry["metrics"] = metrics or {}
    rec.write_json_atomic(Path(folder) / f"job{int(hc.job.num):05d}.json", entry)


def read_journal(folder: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in Path(folder).glob("job*.json")),
                  key=lambda e: e["job"])


STATUS_STYLE = {"ok": "green", "skipped": "cyan", "failed": "red", "diverged": "red",
                "invalid": "red", "interrupted": "yellow"}


def print_sweep_summary(folder: Path, console: Console | None = None) -> int:
    """One row per job of the sweep (ok / skipped / failed / diverged / invalid / interrupted);
    returns how many did not end ok or skipped."""
    entries = read_journal(folder)
    console = console or Console(stderr=True)
    # Rows name jobs by what varies between them; what all share goes in the caption.
    common = set.intersection(*(set(e["overrides"]) for e in entries)) if entries else set()
    table = Table(title=escape(f"sweep: {len(entries)} job(s) in {folder.parent.parent}"), title_justify="left",
                  caption=escape("common: " + " ".join(o for o in entries[0]["overrides"] if o in common))
                  if common else None, caption_justify="left")
    for col, kw in (("#", {"justify": "right"}), ("job", {"overflow": "fold"}), ("status", {}),
                    ("steps", {"justify": "right"}), ("val/acc", {"justify": "right"}),
                    ("time (s)", {"justify": "right"}), ("detail", {"overflow": "fold"})):
        table.add_column(col, **kw)
    for e in entries:
        acc = (e.get("metrics") or {}).get("val/acc")
        style = STATUS_STYLE.get(e["status"], "")
        label = escape(" ".join(o for o in e["overrides"] if o not in common) or e["name"])
        table.add_row(str(e["job"]), label, f"[{style}]{e['status']}[/]" if style else e["status"],
                      "-" if e.get("global_step") is None else str(e["global_step"]),
                      "-" if acc is None else f"{acc:.4f}",
                      "-" if e.get("wall_time_s") is None else f"{e['wall_time_s']:.1f}",
                      escape(e.get("error") or ""))
    console.print(table)
    counts = {}
    for e in entries:
        counts[e["status"]] = counts.get(e["status"], 0) + 1
    console.print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no jobs reported")
    return sum(n for s, n in counts.items() if s not in ("ok", "skipped"))


@hydra.main(version_base="1.3", config_path="pkg://ssdbench.conf", config_name="config")
def main(cfg: DictConfig):
    try:
        return _job(cfg)
    finally:
        # the next job of a sweep in this process starts up from here (record "startup_s")
        ssdbench.STARTUP_FROM = time.time()


def _job(cfg: DictConfig):
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    job = HydraConfig.get().runtime.output_dir

    def fail(code: int, status: str, message: str, error: str | None = None):
        print(f"ssdbench run: {message}", file=sys.stderr)
        _journal(status, error or message)
        if not multirun:
            sys.exit(code)
        FAILED_JOBS.append(f"{job}: {message}")

    previous, differences = _previous_run(cfg, Path(job))
    try:
        deadline = _no_start_after()
    except ConfigError as e:
        fail(EXIT_CONFIG, "invalid", f"invalid config: {e}", str(e))
        return None
    if deadline is not None and time.time() > deadline and not (previous or {}).get("status") == "ok":
        # a sweep inside a time limit (a job scheduler's, or scripts/study_sweep.sh's): jobs
        # that would not finish are not started, instead of being killed half-way
        print(f"ssdbench run: not started, past {NO_START_AFTER_ENV}={deadline}: {job}", file=sys.stderr)
        _journal("not started", f"past {NO_START_AFTER_ENV}")
        if not multirun:
            sys.exit(EXIT_INTERRUPTED)
        FAILED_JOBS.append(f"{job}: not started (past {NO_START_AFTER_ENV})")
        return None
    fresh = False
    if previous is not None and previous.get("status") == "ok":
        if not differences and not cfg.get("force", False):
            print(f"ssdbench run: skipped, {job} holds an ok record of this config "
                  f"(force=true reruns it)", file=sys.stderr)
            _journal("skipped", "ok record exists")
            return previous.get("metrics")
        fresh = True
    if previous is not None and differences:
        fresh = True
        shown = ", ".join(differences[:5]) + (", ..." if len(differences) > 5 else "")
        print(f"ssdbench run: the record in {job} is of another config ({shown}); training "
              f"afresh instead of resuming", file=sys.stderr)

    try:
        metrics = train(cfg, previous, fresh=fresh)
        _journal("ok", metrics=metrics)
        return metrics
    except ConfigError as e:
        fail(EXIT_CONFIG, "invalid", f"invalid config: {e}", str(e))
    except DivergedError as e:
        fail(EXIT_DIVERGED, "diverged", f"diverged: {e}; record in {job}", str(e))
    except SystemExit as e:
        if type(e) is SystemExit:  # a plain sys.exit from below: pass it on
            raise
        fail(EXIT_INTERRUPTED, "interrupted", f"interrupted (SIGTERM or Ctrl-C); checkpoint and record kept in {job}")
        if multirun:  # SIGTERM is for the whole sweep, not just this job
            raise SystemExit(EXIT_INTERRUPTED) from None
    except KeyboardInterrupt:
        _journal("interrupted", "KeyboardInterrupt")
        raise
    except Exception as e:  # noqa: BLE001 - one job's bug must not end the sweep
        if not multirun:
            raise
        traceback.print_exc()
        fail(1, "failed", f"failed: {type(e).__name__}: {e}; record in {job}", f"{type(e).__name__}: {e}")
    return None
