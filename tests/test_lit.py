"""Known-answer tests of the evaluation metrics (val/acc, val/loss, per slice) of SequenceLM.

A fake model returns chosen logits; hand-built batches carry ignored labels (-100) and slices
per example and per token, so every accuracy is a fraction worked out by hand below.
"""
import math

import pytest
import torch
from torch import nn

from ssdbench.lit import SequenceLM

V = 5
BIG = 10.0  # the oracle's logit for its prediction; the others are 0


class Echo(nn.Module):
    """Predicts that the target equals the input token: logits BIG at input_ids, else 0."""

    def forward(self, input_ids, seq_idx=None):
        return BIG * nn.functional.one_hot(input_ids, V).float()  # (batch, L, V)


class Constant(nn.Module):
    """Uniform logits: argmax is token 0 everywhere and every supervised token costs log V."""

    def forward(self, input_ids, seq_idx=None):
        return torch.zeros(*input_ids.shape, V)


# Batch 1: a slice per example (row 0 -> "a", row 1 -> "b").
#   Echo:     row 0 supervised at 0, 2, 3: 1==1 yes, 3 vs 0 no, 4==4 yes   -> a 2/3
#             row 1 supervised at 0, 1:    0==0 yes, 1 vs 0 no             -> b 1/2
#   Constant: row 0: labels 1, 0, 4 -> 1 right; row 1: labels 0, 0 -> 2 right
# Batch 2: a slice per token ([a, a, b, b]); position 2 is ignored.
#   Echo:     a: 2==2 yes, 2 vs 3 no -> 1/2; b: 2==2 yes -> 1/1
#   Constant: labels 2, 3, 2 -> none right
# Echo totals: a 3/5, b 2/3, overall 5/8.  Constant: a 1/5, b 2/3, overall 3/8.
BATCHES = [
    {"input_ids": torch.tensor([[1, 2, 3, 4], [0, 1, 2, 3]]),
     "labels": torch.tensor([[1, -100, 0, 4], [0, 0, -100, -100]]),
     "slice": torch.tensor([0, 1])},
    {"input_ids": torch.tensor([[2, 2, 2, 2]]),
     "labels": torch.tensor([[2, 3, -100, 2]]),
     "slice": torch.tensor([[0, 0, 1, 1]])},
]
# Echo's cross-entropy: log(e^BIG + V - 1) per token, minus BIG on the 5 it gets right.
ECHO_NATS = 8 * math.log(math.exp(BIG) + V - 1) - 5 * BIG


def _evaluate(model) -> SequenceLM:
    lm = SequenceLM(model, slice_names=["a", "b"])
    lm._eval_reset()
    for batch in BATCHES:
        lm._eval_step(batch)
    return lm


def test_oracle_accuracy_and_loss_per_slice():
    m = _evaluate(Echo()).eval_metrics("val", gather=False)
    assert m["val/acc"] == 5 / 8
    assert m["val/acc/a"] == 3 / 5 and m["val/acc/b"] == 2 / 3
    assert math.isclose(m["val/loss"], ECHO_NATS / 8, rel_tol=1e-6)
    assert "val/ppl" not in m and "val/bpb" not in m  # no label_bytes: not a language-modelling task


def test_constant_model_accuracy_and_log_v_loss():
    m = _evaluate(Constant()).eval_metrics("val", gather=False)
    assert m["val/acc"] == 3 / 8
    assert m["val/acc/a"] == 1 / 5 and m["val/acc/b"] == 2 / 3
    assert math.isclose(m["val/loss"], math.log(V), rel_tol=1e-7)  # cross-entropy in float32


def test_metrics_are_summed_over_processes_before_dividing():
    """gather=True: every per-slice sum is summed over the processes (here a second process
    holding the constant model's sums), then divided: not a mean of the two accuracies."""
    lm, other = _evaluate(Echo()), _evaluate(Constant())
    theirs = {id(lm._count): other._count, id(lm._correct): other._correct,
              id(lm._nats): other._nats, id(lm._bytes): other._bytes}
    lm._gather = lambda t: (t + theirs[id(t)]).cpu()  # what all_gather + sum gives with 2 ranks
    m = lm.eval_metrics("val", gather=True)
    assert m["val/acc"] == (5 + 3) / 16
    assert m["val/acc/a"] == (3 + 1) / 10 and m["val/acc/b"] == (2 + 2) / 6
    assert math.isclose(m["val/loss"], (ECHO_NATS + 8 * math.log(V)) / 16, rel_tol=1e-6)


def test_reset_forgets_the_previous_evaluation():
    lm = _evaluate(Echo())
    lm._eval_reset()
    assert lm.eval_metrics("val", gather=False) == {}
    lm._eval_step(BATCHES[1])
    # the overall accuracy divides two long tensors, in float32 (the per-slice ones in Python)
    assert lm.eval_metrics("val", gather=False)["val/acc"] == pytest.approx(2 / 3, rel=1e-7, abs=0)
