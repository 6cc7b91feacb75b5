"""The study engine: a lean single-GPU training loop that replays each optimizer step from a
CUDA graph (``trainer.cuda_graph``).

Why it exists: the synthetic studies train small models (2 layers, D = 32..256) whose step is
a few milliseconds of GPU work behind hundreds of kernel launches. Under Lightning's loop each
step also pays for Python launches, a loss read-back, logging and callbacks: on an H100 a
Mamba-2 MQAR step (T=256, D=64, batch 64) took 11.35 ms in ``ssdbench run`` against 1.62 ms
replayed from a CUDA graph (the design card's table). This loop keeps what a run needs
(checkpoints, resume, SIGTERM, the record, CSV/W&B logs, validation) and drops the rest:

* one CUDA graph per input shape (a curriculum's segments, mixed lengths) and K, the labelled
  positions per row the loss's head sees (see _key), captured the second time the key comes
  (the first time runs eagerly: it compiles and autotunes the kernels and creates the
  optimizer state, which a capture cannot do); graphs share one memory pool;
* the graph holds the whole step: zero the gradients, forward and loss under autocast,
  backward, gradient clipping by norm, fused AdamW with ``capturable=True`` reading its
  learning rate from a device tensor that the schedule fills before each replay;
* losses go to a device buffer and are read every ``log_every_n_steps`` steps (one sync);
  a non-finite loss is found there and the record names its exact step;
* a capture that fails disables graphs for the rest of the run; it goes on eagerly and says
  so on stderr and in the record (``cuda_graph.fallback``).

Lightning still does everything else: the run builds its ``lightning.Trainer`` as usual, and
this loop reads its settings (max_steps, precision, gradient_clip_val, val_check_interval,
log_every_n_steps) and logs through its loggers. On a CPU the same loop runs without graphs
(tests compare it with Lightning's loop). Checkpoints have Lightning's keys plus
``ssdbench_engine`` (the data position), so a graphed run resumes exactly where it stopped and
can also resume a checkpoint that Lightning wrote.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from ssdbench.errors import ConfigError, DivergedError
from ssdbench.lit import MAX_LABELS
from ssdbench.preflight import CPU_LOOP_ENV, NO_CUDA_GPU, parse_cuda_graph

ENGINE_KEY = "ssdbench_engine"  # checkpoint entry: the data position of the engine's loop
PRECISIONS = {"bf16-mixed": torch.bfloat16, "32-true": None, "32": None}
MODEL_KEYS = ("input_ids", "labels", "seq_idx")  # the batch entries a training step reads


def why_not(trainer, cfg) -> str | None:
    """Why this run cannot replay its steps from CUDA graphs (None when it can)."""
    if not torch.cuda.is_available():
        # the tests run this loop (without graphs) on a CPU to compare it with Lightning's
        return None if os.environ.get(CPU_LOOP_ENV) == "1" else "no CUDA GPU"
    return unsupported(trainer)


def unsupported(trainer) -> str | None:
    """What in the trainer's settings the graphed loop does not do (None: nothing)."""
    if trainer.world_size != 1:
        return f"{trainer.world_size} training processes (graphs are single-GPU; DDP/FSDP use Lightning's loop)"
    if str(trainer.precision) not in PRECISIONS:
        return f"precision {trainer.precision} (graphs support bf16-mixed and 32-true)"
    if trainer.accumulate_grad_batches != 1:
        return "accumulate_grad_batches > 1"
    algorithm = str(getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm) or "norm")
    if algorithm != "norm":
        return f"gradient_clip_algorithm={algorithm}"
    env = getattr(trainer.strategy, "cluster_environment", None) or \
        getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
    if getattr(env, "auto_requeue", False):
        return "SLURM auto-requeue (its signal handling lives in Lightning's loop)"
    if trainer.strategy.root_device.type != "cuda":
        return f"the trainer runs on {trainer.strategy.root_device.type}"
    return None


def decide(choice, trainer, cfg) -> tuple[bool, str | None]:
    """(use the graphed loop, the reason when not). ``true`` without CUDA is a config error;
    ``true`` on a configuration graphs cannot serve falls back with the reason, never a crash."""
    choice = parse_cuda_graph(choice)
    if choice is False:
        return False, "trainer.cuda_graph=false"
    reason = why_not(trainer, cfg)
    if choice is True and reason == "no CUDA GPU":
        raise ConfigError("trainer.cuda_graph", NO_CUDA_GPU)
    return reason is None, reason


class StopAtStepEnd:
    """SIGTERM and a first Ctrl-C ask training to stop at the next step boundary (then:
    checkpoint, record ``interrupted``, exit 130); a second Ctrl-C stops at once.

    Why not act on the signal where it lands: a KeyboardInterrupt inside an optimizer step
    leaves its update half applied (AdamW writes the tensors one after another), and the
    checkpoint saved then mixes two steps (a run resumed from one logged its learning rate a
    step behind the schedule; tests/test_cli.py checks the schedule after a resume).
    ``signals`` are the ones handled here (Lightning's loop handles SIGTERM itself and is given
    only SIGINT); ``on_set`` is called on the first (Lightning's loop: set its SIGTERM flag)."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), on_set=None):
        self.signals, self.on_set = signals, on_set
        self.set = False
        self.old: dict = {}

    def _handler(self, signum, frame):
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.set:
            self.set = True
            if signum == signal.SIGINT:
                print("\nssdbench run: stopping after this step (Ctrl-C again stops at once, without a checkpoint)",
                      file=sys.stderr, flush=True)
            if self.on_set is not None:
                self.on_set()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self.old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, old in self.old.items():
            signal.signal(s, old)


class Engine:
    """Trains ``lit`` (a SequenceLM) on ``datamodule`` with the settings of ``trainer``.

    It stands in for the Lightning trainer where the run's record is written (RecordCallback
    reads world_size, is_global_zero, global_step and calls save_checkpoint)."""

    world_size = 1
    is_global_zero = True

    def __init__(self, lit, datamodule, trainer, record_cb, ckpt_path: Path, checkpoint_every: int,
                 graphs: bool, progress_bar: bool = False, terminated=SystemExit):
        self.lit, self.dm, self.trainer, self.record_cb = lit, datamodule, trainer, record_cb
        self.ckpt_path, self.checkpoint_every = Path(ckpt_path), int(checkpoint_every)
        self.device = trainer.strategy.root_device
        self.use_graphs = graphs and self.device.type == "cuda"
        self.progress_bar, self.terminated = progress_bar, terminated
        self.max_steps = int(trainer.max_steps)
        self.val_every = trainer.val_check_interval
        self.log_every = max(1, int(trainer.log_every_n_steps or 50))
        self.clip = trainer.gradient_clip_val
        self.amp_dtype = PRECISIONS.get(str(trainer.precision)) if self.device.type == "cuda" else None
        self.global_step = 0
        self.epoch, self.batch_in_epoch = 0, 0
        self.graphs: dict[tuple, tuple] = {}  # _key -> (graph, static inputs, static loss)
        self.seen: set[tuple] = set()
        self.pool = None
        self.fallback: str | None = None  # why graphs were switched off mid-run
        self.eval_time_s = 0.0
        self.first_step_at: float | None = None  # time.time() when the first step had finished
        self.marks: list[tuple[int, float]] = []  # (step, time) at each read-back (the GPU is idle then)
        self.data_on_device = False  # training examples moved to the GPU (see _batches)

    # ---- optimizer ----------------------------------------------------------------------------
    def _optimizer(self):
        """The run's AdamW and schedule (SequenceLM.configure_optimizers: same groups, betas,
        weight decay, LambdaLR), made fused and, for graphs, capturable with a device tensor as
        learning rate that the schedule fills in place before every step."""
        lit = self.lit
        conf = lit.configure_optimizers()
        opt = conf["optimizer"]
        on_gpu = self.device.type == "cuda"
        groups = [{**{k: v for k, v in g.items() if k not in ("params", "initial_lr")}, "params": g["params"]}
                  for g in opt.param_groups]
        kw = dict(lr=lit.lr, betas=lit.betas)
        if self.use_graphs:
            kw.update(fused=True, capturable=True)
            for g in groups:
                g["lr"] = torch.tensor(float(lit.lr), device=self.device)
        elif on_gpu:
            kw.update(fused=True)
        for g in groups:
            g.pop("fused", None), g.pop("capturable", None), g.pop("foreach", None)
        self.opt = torch.optim.AdamW(groups, **kw)
        # what a loaded optimizer state must not change (see _fix_optimizer_after_load)
        self.flags = [{k: g[k] for k in ("lr", "fused", "capturable", "foreach")} for g in self.opt.param_groups]
        # kept for checkpoints in Lightning's layout; the learning rate itself comes from
        # current_lr (LambdaLR would read its tensor base_lrs back from the device every step)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lit.lr_lambda(s))
        self.params = [p for g in self.opt.param_groups for p in g["params"]]

    def _fix_optimizer_after_load(self):
        """Loading an optimizer state also loads its param_groups' flags and learning rates:
        put back this loop's (capturable, fused, the device lr tensor) and keep the step
        counters where the implementation wants them (on the device for fused/capturable)."""
        for g, flags in zip(self.opt.param_groups, self.flags):
            g.update(flags, lr=flags["lr"])
            for p in g["params"]:
                state = self.opt.state.get(p, {})
                if "step" in state:
                    dev = p.device if (g["fused"] or g["capturable"]) else "cpu"
                    state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(dev)
        self._set_lr()

    def _set_lr(self):
        """The schedule's learning rate for the next step (filled in place into a graph's lr)."""
        value = self.current_lr()
        for g in self.opt.param_groups:
            if isinstance(g["lr"], torch.Tensor):
                g["lr"].fill_(value)
            else:
                g["lr"] = value

    def current_lr(self) -> float:
        return self.lit.lr * self.lit.lr_lambda(self.global_step)

    # ---- one step -----------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        # no weight-cast cache: a graph replays the casts each step (PyTorch's CUDA-graph notes)
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=not self.use_graphs)

    def _body(self, inputs: dict) -> torch.Tensor:
        """Forward, loss, backward, clip, AdamW: the work a graph holds (gradients zeroed
        first, in place, so every replay writes fresh gradients into the same buffers)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)
        with self._autocast():
            loss = self.lit._loss(inputs)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, float(self.clip), foreach=self.device.type == "cuda")
        self.opt.step()
        return loss.detach()

    def _key(self, batch: dict) -> tuple:
        """(the inputs' (name, shape, dtype)s, K): what a graph fixes. K is the positions per row
        the loss computes the head on (SequenceLM.loss_positions, None: all), a Python int the
        graph bakes in: two segments of one shape whose rows hold different numbers of labels
        must not share the graph of the smaller K (it would drop labels)."""
        shapes = tuple((k, tuple(batch[k].shape), batch[k].dtype) for k in MODEL_KEYS if k in batch)
        return shapes, self.lit.loss_positions(batch)

    def _capture(self, key, batch):
        """A graph of one step at this key, over static input buffers (no step is taken)."""
        shapes, k = key
        static = {name: torch.empty(shape, dtype=dtype, device=self.device) for name, shape, dtype in shapes}
        for name in static:
            static[name].copy_(batch[name])
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            loss = self._body({**static, MAX_LABELS: k})
        return graph, static, loss

    def step(self, batch: dict) -> torch.Tensor:
        """One optimizer step on ``batch`` (its tensors on the host or the device); returns the
        loss as a device tensor (not read back)."""
        key = self._key(batch)
        entry = self.graphs.get(key)
        if entry is None and self.use_graphs and key in self.seen:
            try:
                entry = self.graphs[key] = self._capture(key, batch)
                if len(self.graphs) == 1:
                    self._startup_mark("first_capture")
            except Exception as e:  # noqa: BLE001 - a capture that fails must not end the run
                self._disable_graphs(f"capture failed at step {self.global_step}: {type(e).__name__}: "
                                     f"{str(e).splitlines()[0][:160] if str(e) else ''}")
        if entry is not None:
            graph, static, loss = entry
            for k in static:
                static[k].copy_(batch[k], non_blocking=True)
            graph.replay()
        else:
            self.seen.add(key)
            inputs = {k: batch[k].to(self.device, non_blocking=True) for k, *_ in key[0]}
            inputs[MAX_LABELS] = key[1]
            if self.use_graphs:  # warm-up steps run on a side stream, as capture asks
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    loss = self._body(inputs)
                torch.cuda.current_stream(self.device).wait_stream(side)
                loss.record_stream(torch.cuda.current_stream(self.device))
            else:
                loss = self._body(inputs)
        self.sched.last_epoch += 1  # LambdaLR's counter, kept for checkpoints
        self.global_step += 1
        self._set_lr()
        return loss

    def _startup_mark(self, phase: str):
        mark = getattr(self.record_cb, "startup_mark", None)
        if mark is not None:
            mark(phase)

    def _disable_graphs(self, why: str):
        self.use_graphs = False
        self.fallback = why
        self.graphs.clear()
        print(f"ssdbench run: CUDA graphs off from here, continuing eagerly: {why}", file=sys.stderr)

    # ---- data ---------------------------------------------------------------------------------
    def _batches(self, loader):
        """The training batches, epoch after epoch, from this engine's position (epoch, batch
        in epoch): fetched in this process straight from the loader's dataset and batch sampler
        (the order Lightning's loop sees), skipping without fetching on resume."""
        sampler, ds = getattr(loader, "batch_sampler", None), loader.dataset
        batched = sampler is not None and hasattr(ds, "__getitems__")
        if batched and self.use_graphs and hasattr(ds, "on_device"):
            # the examples on the GPU when they take at most a quarter of its free memory: a
            # batch is then a gather there, and its copy into the graph's inputs device to device
            free, _ = torch.cuda.mem_get_info(self.device)
            if ds.nbytes() <= free // 4:
                ds = ds.on_device(self.device)
                self.data_on_device = True
        while True:
            if hasattr(sampler, "epoch"):
                sampler.epoch = self.epoch
            source = iter(sampler) if batched else iter(loader)
            for i, item in enumerate(source):
                if i < self.batch_in_epoch:
                    continue
                self.batch_in_epoch = i + 1
                yield loader.collate_fn(ds.__getitems__(item)) if batched else item
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    # ---- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, path) -> None:
        import lightning

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        ckpt = {
            "state_dict": self.lit.state_dict(),
            "optimizer_states": [self.opt.state_dict()],
            "lr_schedulers": [self.sched.state_dict()],
            "global_step": self.global_step,
            "epoch": self.epoch,
            "tokens_seen": self.lit.tokens_seen,
            ENGINE_KEY: {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                         "global_step": self.global_step},
            "pytorch-lightning_version": lightning.__version__,
        }
        tmp = path.with_suffix(".tmp")
        torch.save(ckpt, tmp)
        tmp.replace(path)  # never a half-written last.ckpt

    def load_checkpoint(self, path) -> None:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        self.lit.load_state_dict(ckpt["state_dict"])
        self.lit.tokens_seen = ckpt.get("tokens_seen", 0)
        if ckpt.get("optimizer_states"):
            self.opt.load_state_dict(ckpt["optimizer_states"][0])
        if ckpt.get("lr_schedulers"):
            sd = dict(ckpt["lr_schedulers"][0])
            sd.pop("lr_lambdas", None)
            self.sched.__dict__.update({k: v for k, v in sd.items() if k != "base_lrs"})
        pos = ckpt.get(ENGINE_KEY)
        if pos:
            self.global_step, self.epoch, self.batch_in_epoch = pos["global_step"], pos["epoch"], pos["batch_in_epoch"]
        else:  # written by Lightning's loop: its position in the data is not kept; next epoch
            self.global_step = int(ckpt.get("global_step", 0))
            self.epoch, self.batch_in_epoch = int(ckpt.get("epoch", 0)) + 1, 0
        self.sched.last_epoch = self.global_step
        self._fix_optimizer_after_load()

    # ---- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, loader=None) -> dict[str, float]:
        """The validation split through SequenceLM's evaluation (device-side sums, one
        read-back at the end); returns the metrics (val/loss, val/acc, per slice, ...)."""
        t0 = time.perf_counter()
        loader = loader if loader is not None else self.dm.val_dataloader()
        lit = self.lit
        was_training = lit.training
        lit.eval()
        lit._eval_reset()
        with self._autocast():
            for batch in loader:
                lit._eval_step({k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                                for k, v in batch.items()})
        metrics = lit.eval_metrics("val", gather=False)
        lit.train(was_training)
        self.eval_time_s += time.perf_counter() - t0
        return metrics

    # ---- the loop -----------------------------------------------------------------------------
    def _log(self, metrics: dict, step: int) -> None:
        for lg in self.trainer.loggers:
            lg.log_metrics(metrics, step=step)

    def fit(self, resume: str | None = None) -> None:
        lit = self.lit
        lit.to(self.device)
        lit.train()
        self._optimizer()
        if resume:
            self.load_checkpoint(resume)
        self._set_lr()
        self.record_cb.on_fit_start(self, lit)
        loader = self.dm.train_dataloader()
        losses = torch.zeros(self.log_every, device=self.device)  # (log_every,) per-step losses
        lrs: list[float] = []
        first = self.global_step  # steps since the last read-back: first .. global_step
        progress = _Progress(self.max_steps, self.global_step) if self.progress_bar else None
        t_last, tokens_last = time.perf_counter(), lit.tokens_seen
        try:
            with StopAtStepEnd() as stop:
                batches = self._batches(loader)
                while self.global_step < self.max_steps:
                    if stop.set:
                        raise self.terminated(130)
                    batch = next(batches)
                    lrs.append(self.current_lr())
                    loss = self.step(batch)
                    if self.first_step_at is None:  # one sync: the start-up time ends here
                        if self.device.type == "cuda":
                            torch.cuda.synchronize(self.device)
                        self.first_step_at = time.time()
                        self._startup_mark("first_step")
                    losses[self.global_step - 1 - first].copy_(loss)
                    lit.tokens_seen += int(batch["input_ids"].numel())
                    n = self.global_step
                    if n - first == self.log_every or n == self.max_steps:
                        values = losses[:n - first].tolist()  # the one sync of these steps
                        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
                        if bad is not None:
                            raise DivergedError(first + bad, values[bad])
                        if n % self.log_every == 0:
                            # the step column as Lightning writes it: the 0-based index of the step
                            self._log({"train/loss": values[-1], "lr": lrs[-1], "epoch": self.epoch}, n - 1)
                        now = time.perf_counter()
                        self.marks.append((n, now))
                        if progress:
                            progress.update(n, values[-1], (lit.tokens_seen - tokens_last) / max(now - t_last, 1e-9))
                        t_last, tokens_last = now, lit.tokens_seen
                        first, lrs = n, []
                    if self.val_every and n % int(self.val_every) == 0:
                        self._log(self.validate(), n - 1)
                    if self.checkpoint_every and n % self.checkpoint_every == 0:
                        self.save_checkpoint(self.ckpt_path)
                    for lg in self.trainer.loggers if n % (self.log_every * 10) == 0 else ():
                        lg.save()
        except BaseException as e:
            if progress:
                progress.close()
            if isinstance(e, (KeyboardInterrupt, SystemExit)) and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the queued steps finish before the save
            self.record_cb.on_exception(self, lit, e)
            self._save_logs()
            raise
        if progress:
            progress.close()
        self.save_checkpoint(self.ckpt_path)
        self._save_logs()

    def _save_logs(self):
        for lg in self.trainer.loggers:
            lg.save()

    def steady_step_ms(self, skip: float = 0.2) -> float | None:
        """Mean time a step between the first read-back past ``skip`` of the run (captures and
        compiles are over by then) and the last one: what ``ssdbench bench study`` compares with
        the bare graph step. It includes validations and checkpoints that fall in between."""
        if len(self.marks) < 2:
            return None
        start = next((m for m in self.marks if m[0] >= skip * self.marks[-1][0]), self.marks[0])
        end = self.marks[-1]
        return 1e3 * (end[1] - start[1]) / (end[0] - start[0]) if end[0] > start[0] else None

    def record_fields(self) -> dict:
        steady = self.steady_step_ms()
        return {"mode": "graphs" if (self.use_graphs or self.graphs or self.fallback) else "eager-loop",
                "graphs": len(self.graphs), "fallback": self.fallback, "data_on_device": self.data_on_device,
                "eval_time_s": round(self.eval_time_s, 3), "first_step_at": self.first_step_at,
                "steady_step_ms": None if steady is None else round(steady, 4)}


class _Progress:
    """One line that says where training is: step / max steps, loss, tokens/s (rich)."""

    def __init__(self, total: int, start: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                          TimeRemainingColumn(), transient=False)
        self.p.start()
        self.task = self.p.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, loss: float, tok_s: float, extra: str = ""):
        self.p.update(self.task, completed=step, info=f"loss {loss:.4f}  {tok_s:,.0f} tok/s{extra}")

    def close(self):
        self.p.stop()
