"""`ssdbench run`: the Hydra application that trains one configuration and writes its record.

Flow of one run: compose config -> build task data and model (invalid configs stop here with
one line and exit code 2) -> Lightning fit with checkpointing -> final evaluation -> record.
"""
from __future__ import annotations

import inspect
import logging
import re
import sys
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from ssdbench import record as rec
from ssdbench.errors import ConfigError, DivergedError
from ssdbench.lit import SequenceLM

EXIT_CONFIG = 2  # invalid configuration: nothing was trained
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130

# Jobs of this process that did not end ok; the CLI turns a non-empty list into exit code 1
# after a multirun so that one bad job does not stop the others.
FAILED_JOBS: list[str] = []


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


for _name, _fn in (("ssdbench.run_name", _run_name), ("ssdbench.precision", _auto_precision)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


class RecordCallback(Callback):
    """Keeps the run's record.json current: running at start, the outcome at the end.

    On Ctrl-C, SIGTERM or an exception it saves ``checkpoints/last.ckpt`` first, so that a
    rerun with the same overrides resumes from where this one stopped.
    """

    def __init__(self, run_dir: Path, base: dict, ckpt_path: Path):
        self.run_dir, self.base, self.ckpt_path = run_dir, base, ckpt_path
        self.t0 = time.time()
        self.tokens_at_start = 0
        self.status = "running"
        self.error: str | None = None

    def on_fit_start(self, trainer, pl_module):
        self.t0 = time.time()
        self.tokens_at_start = pl_module.tokens_seen
        self.write(trainer, pl_module, "running")

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, DivergedError):
            status = "diverged"
        elif isinstance(exception, (KeyboardInterrupt, SystemExit)):  # SIGTERMException is a SystemExit
            status = "interrupted"
        else:
            status = "failed"
        if status != "diverged":  # a diverged state is not worth resuming from
            try:
                trainer.save_checkpoint(self.ckpt_path)
            except Exception as e:  # noqa: BLE001 - the record matters more than the checkpoint
                print(f"warning: could not save {self.ckpt_path}: {e}", file=sys.stderr)
        self.error = f"{type(exception).__name__}: {exception}"
        self.write(trainer, pl_module, status)

    def write(self, trainer, pl_module, status: str, metrics: dict | None = None) -> Path:
        self.status = status
        elapsed = time.time() - self.t0
        tokens_now = pl_module.tokens_seen - self.tokens_at_start
        seq_len = self.base.get("seq_len") or 1
        r = dict(self.base)
        r.update(
            status=status,
            error=self.error,
            global_step=int(trainer.global_step),
            tokens_seen=int(pl_module.tokens_seen),
            train_flops=int(3 * pl_module.model.flops_per_token(seq_len) * pl_module.tokens_seen),
            train_flops_6nd=int(6 * self.base["params"]["non_embedding"] * pl_module.tokens_seen),
            wall_time_s=round(elapsed, 3),
            tokens_per_s=round(tokens_now / elapsed, 1) if elapsed > 0 else None,
            peak_memory_bytes=rec.peak_memory_bytes(),
            metrics=metrics or {},
            finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        return rec.write_record(self.run_dir, r)


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


def _build(cfg: DictConfig):
    """Data and model from the config; ConfigError for anything invalid, before training."""
    _check_fields(cfg.model, "model")
    _check_fields(cfg.task, "task")
    datamodule = build(cfg.task)
    model = build(cfg.model)
    if getattr(datamodule, "vocab_size", None) is not None and model.vocab_size < datamodule.vocab_size:
        raise ConfigError("model.vocab_size", f"{model.vocab_size} is smaller than the task's "
                          f"vocabulary ({datamodule.vocab_size})")
    for key in ("max_steps",):
        v = cfg.trainer.get(key)
        if not (isinstance(v, int) and v > 0):
            raise ConfigError(f"trainer.{key}", f"must be a positive integer, got {v!r}")
    if cfg.optim.lr <= 0:
        raise ConfigError("optim.lr", f"must be positive, got {cfg.optim.lr}")
    return datamodule, model


def train(cfg: DictConfig) -> dict:
    """Train one configuration; returns the final metrics. Raises ConfigError / DivergedError."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    _quiet_lightning()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, model = _build(cfg)
    datamodule.setup("fit")

    ckpt_dir = run_dir / "checkpoints"
    last_ckpt = ckpt_dir / "last.ckpt"
    resume = None
    if cfg.resume == "auto":
        resume = str(last_ckpt) if last_ckpt.exists() else None
    elif cfg.resume not in (None, False, "none"):
        resume = str(cfg.resume)
        if not Path(resume).exists():
            raise ConfigError("resume", f"checkpoint {resume} does not exist")

    lit = SequenceLM(model, **OmegaConf.to_container(cfg.optim), total_steps=cfg.trainer.max_steps,
                     slice_names=datamodule.slice_names)
    seq_len = getattr(datamodule, "max_seq_len", None)
    base = dict(
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
        resumed_from=resume,
    )
    record_cb = RecordCallback(run_dir, base, last_ckpt)
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                        every_n_train_steps=cfg.checkpoint_every, enable_version_counter=False),
        record_cb,
    ]
    if cfg.progress_bar:
        callbacks.append(RichProgressBar())
    # One CSV per attempt (logs/version_<k>/metrics.csv): a resumed run appends a new version
    # instead of overwriting the metrics of the attempt it continues.
    loggers = [CSVLogger(save_dir=str(run_dir), name="logs")]
    for extra in (cfg.get("logger") or {}).values():
        if extra is not None:
            loggers.append(build(extra))
    trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers,
                          default_root_dir=str(run_dir), enable_progress_bar=bool(cfg.progress_bar))
    trainer.fit(lit, datamodule=datamodule, ckpt_path=resume)
    if trainer.interrupted:  # stopped by a callback or signal without an exception reaching us
        raise KeyboardInterrupt
    final = trainer.validate(lit, datamodule=datamodule, verbose=False)[0]
    metrics = {k: float(v) for k, v in final.items()}
    # Tasks with an evaluation beyond the validation loop (e.g. induction heads at test lengths
    # up to 2^20, streamed through the recurrent path) provide evaluate_model(model) -> metrics.
    evaluate = getattr(datamodule, "evaluate_model", None)
    if evaluate is not None:
        metrics.update({k: float(v) for k, v in evaluate(lit.model).items()})
    path = record_cb.write(trainer, lit, "ok", metrics)
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


@hydra.main(version_base="1.3", config_path="pkg://ssdbench.conf", config_name="config")
def main(cfg: DictConfig):
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    job = HydraConfig.get().runtime.output_dir

    def fail(code: int, message: str):
        print(f"ssdbench run: {message}", file=sys.stderr)
        if not multirun:
            sys.exit(code)
        FAILED_JOBS.append(f"{job}: {message}")

    try:
        return train(cfg)
    except ConfigError as e:
        fail(EXIT_CONFIG, f"invalid config: {e}")
    except DivergedError as e:
        fail(EXIT_DIVERGED, f"diverged: {e}; record in {job}")
    except SystemExit as e:
        if type(e) is SystemExit:  # a plain sys.exit from below: pass it on
            raise
        fail(EXIT_INTERRUPTED, f"interrupted (SIGTERM); checkpoint and record kept in {job}")
    return None
