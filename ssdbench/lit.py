"""The Lightning module: next-token cross-entropy on any LanguageModel, AdamW, warmup + cosine.

Metrics: ``train/loss``; on the evaluation split ``val/loss``, ``val/acc`` (over supervised
positions, i.e. labels != -100) and ``val/acc/<slice>`` per slice of the task.
"""
from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F

from ssdbench.errors import DivergedError
from ssdbench.models.lm import LanguageModel

IGNORE = -100


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from 0, then cosine decay to ``min_ratio`` at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class SequenceLM(L.LightningModule):
    def __init__(self, model: LanguageModel, lr: float = 1e-3, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 100,
                 min_lr: float = 1e-5, total_steps: int = 1000, slice_names: list[str] | None = None,
                 fused_adamw: bool = False):
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.min_lr, self.total_steps = warmup_steps, min_lr, total_steps
        self.fused_adamw = fused_adamw
        self.slice_names = list(slice_names or [])
        self.tokens_seen = 0  # training tokens, saved in checkpoints so resumes keep counting
        self._batch_tokens = 0
        self._eval_reset()

    # ---- training -------------------------------------------------------------------------
    def forward(self, input_ids, seq_idx=None):
        return self.model(input_ids, seq_idx=seq_idx)

    def _loss(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["input_ids"], batch.get("seq_idx"))  # (batch, L, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE)
        return loss, logits

    def training_step(self, batch, batch_idx):
        loss, _ = self._loss(batch)
        if not torch.isfinite(loss):
            raise DivergedError(self.global_step, float(loss))
        self._batch_tokens = batch["input_ids"].numel()
        self.log("train/loss", loss, prog_bar=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # Counted once the optimizer step is done (and before any checkpoint of this step is
        # written): a step cut short by Ctrl-C or SIGTERM is redone after a resume and must
        # not be counted twice.
        self.tokens_seen += self._batch_tokens

    # ---- evaluation -------------------------------------------------------------------------
    def _eval_reset(self):
        n = max(1, len(self.slice_names))
        self._correct = torch.zeros(n, dtype=torch.long)
        self._count = torch.zeros(n, dtype=torch.long)
        self._loss_sum, self._loss_n = 0.0, 0

    def _eval_step(self, batch):
        loss, logits = self._loss(batch)
        labels = batch["labels"]
        mask = labels != IGNORE  # (batch, L)
        correct = ((logits.argmax(-1) == labels) & mask).sum(1).cpu()  # (batch,)
        count = mask.sum(1).cpu()
        slices = batch.get("slice", torch.zeros(len(labels), dtype=torch.long)).cpu()
        self._correct.index_add_(0, slices, correct)
        self._count.index_add_(0, slices, count)
        n = int(count.sum())
        self._loss_sum += float(loss) * n
        self._loss_n += n

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_validation_epoch_start(self):
        self._eval_reset()

    on_test_epoch_start = on_validation_epoch_start

    def _eval_log(self, prefix: str):
        if self._loss_n == 0:
            return
        # The counts are gathered across processes so every rank logs the global metric.
        correct = self.all_gather(self._correct.to(self.device)).reshape(-1, len(self._correct)).sum(0)
        count = self.all_gather(self._count.to(self.device)).reshape(-1, len(self._count)).sum(0)
        self.log(f"{prefix}/loss", self._loss_sum / self._loss_n, sync_dist=True)
        self.log(f"{prefix}/acc", float(correct.sum() / count.sum().clamp_min(1)), prog_bar=True)
        for name, c, n in zip(self.slice_names, correct.tolist(), count.tolist()):
            if n:
                self.log(f"{prefix}/acc/{name}", c / n)

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
        min_ratio = min(1.0, self.min_lr / self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, self.warmup_steps, self.total_steps, min_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint):
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
