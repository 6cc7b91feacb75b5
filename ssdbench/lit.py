"""The Lightning module: next-token cross-entropy on any LanguageModel, AdamW, warmup + cosine.

Metrics: ``train/loss``; on the evaluation split ``val/loss`` (mean nats per supervised token,
i.e. labels != -100), ``val/acc`` (argmax accuracy over the same tokens) and ``val/acc/<slice>``
per slice of the task. A batch's ``slice`` is per example (batch,) or per token (batch, L).

Language-modelling batches also carry ``label_bytes`` (batch, L): the UTF-8 bytes each target
token stands for. Then the evaluation adds, overall and per slice (``val/loss/<slice>``, ...)::

    ppl = exp(loss)                                  loss = sum(nats) / tokens
    bpb = sum(nats) / (ln 2 * sum(label_bytes))      = loss / ln 2 / (bytes per token)

e.g. loss 1.2 nats/token at 4 bytes/token: ppl = e^1.2 = 3.32, bpb = 1.2 / 0.693 / 4 = 0.433.
"""
from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F

from ssdbench import tokenizer as _tokenizer  # noqa: F401 - registers ${ssdbench.tokenizer_vocab:...} for configs
from ssdbench.errors import ConfigError, DivergedError
from ssdbench.models.lm import LanguageModel, labelled_positions
# the data's protocol, defined with it: IGNORE, the label of an unscored position; MAX_LABELS, the
# synthetic tasks' batch entry bounding the labelled positions of any row (loss_positions)
from ssdbench.tasks.base import IGNORE, MAX_LABELS


def gather_pays(max_labels: int | None, seq_len: int) -> bool:
    """Whether the head on ``max_labels`` gathered positions per row beats the head on all
    ``seq_len``: when they are at most half the row (the gather, its scatter in the backward
    and the sort cost a few passes over (batch, L, d_model); a language-modelling batch, which
    labels every token, keeps the plain head).

    >>> gather_pays(64, 256), gather_pays(200, 256), gather_pays(None, 256)
    (True, False, False)
    """
    return max_labels is not None and 2 * max_labels <= seq_len


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from 0, then cosine decay to ``min_ratio`` at total_steps."""
    return lr_multiplier(step, "cosine", warmup_steps, total_steps, min_ratio)


SCHEDULES = ("cosine", "linear", "constant")


def lr_multiplier(step: int, schedule: str, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear warmup from 0 over
    ``warmup_steps``, then ``cosine`` or ``linear`` decay to ``min_ratio`` at ``total_steps``
    (Transformer++ uses cosine; the Mamba-2 MQAR protocol a linear decay), or ``constant``
    (the Mamba-1 synthetic protocols).

    >>> [round(lr_multiplier(s, "linear", 0, 4, 0.125), 4) for s in range(5)]
    [1.0, 0.7812, 0.5625, 0.3438, 0.125]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lm_metrics(nats: float, tokens: int, n_bytes: int | None = None) -> dict[str, float]:
    """loss (nats per token), perplexity and, given the bytes the tokens stand for, bits per byte.

    >>> lm_metrics(nats=12.0, tokens=10, n_bytes=40)    # doctest: +ELLIPSIS
    {'loss': 1.2, 'ppl': 3.32..., 'bpb': 0.432...}
    """
    loss = nats / tokens
    out = {"loss": loss, "ppl": math.exp(min(loss, 700.0))}  # exp overflows a double past ~709
    if n_bytes:
        out["bpb"] = nats / (math.log(2) * n_bytes)
    return out


class SequenceLM(L.LightningModule):
    def __init__(self, model: LanguageModel, lr: float = 1e-3, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 100,
                 min_lr: float = 1e-5, total_steps: int = 1000, slice_names: list[str] | None = None,
                 fused_adamw: bool = False, schedule: str = "cosine", min_lr_ratio: float | None = None,
                 gather_labels: bool = True):
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.min_lr, self.total_steps = warmup_steps, min_lr, total_steps
        self.fused_adamw = fused_adamw
        if schedule not in SCHEDULES:
            raise ConfigError("optim.schedule", f"must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if min_lr_ratio is not None and not 0 <= min_lr_ratio <= 1:
            raise ConfigError("optim.min_lr_ratio", f"must be in [0, 1], got {min_lr_ratio!r}")
        self.schedule = schedule
        # the decay's floor as a fraction of the peak (e.g. 1/8 in the Mamba-2 MQAR protocol);
        # when unset, min_lr is the floor in absolute terms
        self.min_ratio = min_lr_ratio if min_lr_ratio is not None else min(1.0, min_lr / lr)
        self.slice_names = list(slice_names or [])
        # trainer.gather_labels: the head only on the labelled positions where a batch says how
        # many there are (MAX_LABELS); off, on every position (the A/B switch; same results)
        self.gather_labels = bool(gather_labels)
        self.tokens_seen = 0  # training tokens, saved in checkpoints so resumes keep counting
        self._batch_tokens = 0
        self._eval_reset()

    # ---- training -------------------------------------------------------------------------
    def forward(self, input_ids, seq_idx=None):
        return self.model(input_ids, seq_idx=seq_idx)

    def loss_positions(self, batch) -> int | None:
        """K, the positions per row the loss computes the head on (each row's labelled ones,
        then ignored ones to fill K), or None for all of them: the batch's MAX_LABELS when the
        gather is on and pays (gather_pays). A Python int read from the batch, never from the
        labels on the device; the graphed loop keys its graphs by it (Engine._key). Batches
        without MAX_LABELS (language modelling, or data that does not count its labels) keep the
        head on every position, in Lightning's loop as in the graphed one. Idempotent: K in
        place of MAX_LABELS gives K again (the graphed loop passes it so)."""
        k = batch.get(MAX_LABELS)
        if not self.gather_labels or not gather_pays(k, batch["labels"].shape[-1]):
            return None
        return int(k)

    def _loss(self, batch) -> torch.Tensor:
        # the model computes the loss itself, so a compiled model fuses it (LanguageModel.forward)
        labels, positions = batch["labels"], None  # (batch, L)
        k = self.loss_positions(batch)
        if k is not None:
            # every real label of each row is among its k picks, so the mean's denominator (the
            # count of real labels) and every gradient are those of the head on all positions
            positions = labelled_positions(labels, k, IGNORE)  # (batch, K)
            labels = labels.gather(1, positions)  # (batch, K)
        return self.model(batch["input_ids"], seq_idx=batch.get("seq_idx"), labels=labels,
                          ignore_index=IGNORE, positions=positions)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        if not torch.isfinite(loss):
            raise DivergedError(self.global_step, float(loss))
        # summed over the micro-batches of one optimizer step (gradient accumulation); this
        # process's share only: the record multiplies by the number of processes
        self._batch_tokens += batch["input_ids"].numel()
        self.log("train/loss", loss, prog_bar=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # Counted once the optimizer step is done (and before any checkpoint of this step is
        # written): a step cut short by Ctrl-C or SIGTERM is redone after a resume and must
        # not be counted twice.
        self.tokens_seen += self._batch_tokens
        self._batch_tokens = 0

    # ---- evaluation -------------------------------------------------------------------------
    def _eval_reset(self):
        n = max(1, len(self.slice_names))
        self._correct = torch.zeros(n, dtype=torch.long)  # per slice: correct argmax predictions
        self._count = torch.zeros(n, dtype=torch.long)  # supervised tokens
        self._nats = torch.zeros(n, dtype=torch.float64)  # summed cross-entropy
        self._bytes = torch.zeros(n, dtype=torch.long)  # bytes the targets stand for (LM tasks)

    def _eval_step(self, batch):
        """Adds one batch to the per-slice sums, on the batch's device and without reading
        anything back (weights instead of boolean indexing, which would wait for the GPU).
        Where the loss gathers its labelled positions (loss_positions), so does this: the head
        on K positions per row, the others count for nothing here either."""
        labels = batch["labels"]  # (batch, L)
        label_bytes, slices = batch.get("label_bytes"), batch.get("slice")
        if slices is None:
            slices = torch.zeros(len(labels), dtype=torch.long, device=labels.device)
        if slices.dim() == 1:  # one slice per example -> per token
            slices = slices[:, None].expand_as(labels)
        k = self.loss_positions(batch)
        if k is None:
            logits = self(batch["input_ids"], batch.get("seq_idx"))  # (batch, L, V)
        else:
            positions = labelled_positions(labels, k, IGNORE)  # (batch, K)
            logits = self.model(batch["input_ids"], batch.get("seq_idx"), positions=positions)  # (batch, K, V)
            labels, slices = labels.gather(1, positions), slices.gather(1, positions)  # (batch, K) each
            if label_bytes is not None:
                label_bytes = label_bytes.gather(1, positions)  # (batch, K)
        mask = labels != IGNORE  # (batch, L or K)
        nats = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                               reduction="none").view_as(labels)  # (batch, L or K), 0 where ignored
        correct = (logits.argmax(-1) == labels) & mask  # (batch, L or K)
        s = slices.reshape(-1).long()  # (batch * (L or K),) slice of each token
        if self._count.device != labels.device:
            self._correct, self._count, self._nats, self._bytes = (
                t.to(labels.device) for t in (self._correct, self._count, self._nats, self._bytes))
        self._correct.index_add_(0, s, correct.reshape(-1).long())
        self._count.index_add_(0, s, mask.reshape(-1).long())
        self._nats.index_add_(0, s, nats.reshape(-1).double())
        if label_bytes is not None:
            self._bytes.index_add_(0, s, (label_bytes * mask).reshape(-1).long())

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_validation_epoch_start(self):
        self._eval_reset()

    on_test_epoch_start = on_validation_epoch_start

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of a per-slice tensor over processes, so every rank logs the global metric."""
        return self.all_gather(t.to(self.device)).reshape(-1, len(t)).sum(0).cpu()

    def eval_metrics(self, prefix: str, gather: bool = True) -> dict[str, float]:
        """The evaluation's metrics from the per-slice sums (summed over processes first when
        ``gather``): {prefix}/loss, /acc, /acc/<slice>, and for LM tasks /ppl, /bpb, per slice."""
        sums = (self._count, self._correct, self._nats, self._bytes)
        count, correct, nats, n_bytes = (self._gather(t) if gather else t.cpu() for t in sums)
        if int(count.sum()) == 0:
            return {}
        is_lm = int(n_bytes.sum()) > 0
        overall = lm_metrics(float(nats.sum()), int(count.sum()), int(n_bytes.sum()))
        out = {f"{prefix}/loss": overall["loss"], f"{prefix}/acc": int(correct.sum()) / int(count.sum())}
        if is_lm:
            out[f"{prefix}/ppl"], out[f"{prefix}/bpb"] = overall["ppl"], overall["bpb"]
        for i, name in enumerate(self.slice_names):
            n = int(count[i])
            if not n:
                continue
            out[f"{prefix}/acc/{name}"] = int(correct[i]) / n
            if is_lm:
                for key, value in lm_metrics(float(nats[i]), n, int(n_bytes[i])).items():
                    out[f"{prefix}/{key}/{name}"] = value
        return out

    def _eval_log(self, prefix: str):
        for key, value in self.eval_metrics(prefix).items():
            self.log(key, value, prog_bar=key in (f"{prefix}/acc", f"{prefix}/bpb"))

    def on_validation_epoch_end(self):
        self._eval_log("val")

    def on_test_epoch_end(self):
        self._eval_log("test")

    # ---- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self):
        skip = self.model.no_weight_decay_params()
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if id(p) not in skip], "weight_decay": self.weight_decay},
            {"params": [p for p in params if id(p) in skip], "weight_decay": 0.0},
        ]
        # Fused AdamW unscales gradients inside its step, which Lightning's mixed-precision
        # plugin refuses to combine with gradient clipping; the default (foreach on GPUs) is
        # the fast path that allows clipping.
        opt = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, fused=self.fused_adamw or None)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: self.lr_lambda(s))  # a plain function: LambdaLR's state_dict skips it
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def lr_lambda(self, step: int) -> float:
        return lr_multiplier(step, self.schedule, self.warmup_steps, self.total_steps, self.min_ratio)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint):
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
