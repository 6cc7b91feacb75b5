"""The loss's head on labelled positions only (trainer.gather_labels, SequenceLM.loss_positions):
it computes the loss and every gradient of the head on all positions, K comes from the data and
covers every row, and both training loops use it when on and not when off.

The synthetic tasks label a few positions of a row (MQAR at T=256: 8 to 64 of 256); a batch
carries ``max_labels`` (tasks/base.py), the most labels in any row of its segment, and the loss
gathers that many positions per row (labelled ones first, ignored ones to fill K).
"""
import json
import random
import types

import pytest
import torch
from conftest import DEVICE, ON_GPU, fresh_seed, rel_err, with_seed
from test_models import TINY, V

from ssdbench import engine
from ssdbench.kernels import cross_entropy as ce
from ssdbench.lit import IGNORE, MAX_LABELS, SequenceLM, gather_pays
from ssdbench.models import lm
from ssdbench.tasks.base import FreshBatchDataset, Segment, SegmentDataset, max_labels
from ssdbench.tasks.mqar import MQARDataModule


def random_labels(rng: random.Random, B: int, L: int, counts: list[int] | None = None) -> torch.Tensor:
    """(B, L) labels with counts[b] labelled positions in row b at random places, -100 elsewhere
    (default: unequal counts, then a row without labels and one labelled at its last position
    only, the edge of the row)."""
    edge = counts is None
    if edge:
        counts = [rng.randint(1, L // 3) for _ in range(B - 2)] + [0, 0]
    labels = torch.full((B, L), IGNORE)
    for b, n in enumerate(counts):
        where = torch.tensor(rng.sample(range(L), n), dtype=torch.long)
        labels[b, where] = torch.randint(0, V, (n,))
    if edge:
        labels[-1, -1] = 3
    return labels


def loss_and_grads(lit, batch):
    lit.model.zero_grad(set_to_none=True)
    loss = lit._loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in lit.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(TINY))
def test_gathered_head_gives_the_loss_and_gradients_of_the_full_head(name):
    """float64: the loss and every parameter's gradient with the gather equal those of the head on
    every position (up to summation order), rows with unequal label counts and one with none.
    The final RMSNorm computes in fp32 whatever the model's dtype (layers.py), and its weight's
    gradient sums over the rows the head sees: that one agrees to fp32 rounding (a relative
    error below 1e-7 here), the others to float64's."""
    seed, rng = fresh_seed()
    print(f"random seed {seed}")
    model = TINY[name]().double()
    B, L = 5, rng.randint(24, 40)
    x = torch.randint(0, V, (B, L))  # (B, L)
    labels = random_labels(rng, B, L)  # (B, L)
    k = max_labels(labels)  # as the dataset counts it
    assert k == int((labels != IGNORE).sum(1).max()) and gather_pays(k, L)
    batch = {"input_ids": x, "labels": labels, MAX_LABELS: k}
    on, off = SequenceLM(model), SequenceLM(model, gather_labels=False)
    loss, grads = loss_and_grads(on, batch)
    ref, ref_grads = loss_and_grads(off, batch)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0, msg=with_seed(seed))
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    errs = {n: rel_err(grads[n], ref_grads[n]) for n in ref_grads}
    print("largest relative gradient errors:", sorted(errs.items(), key=lambda e: -e[1])[:3])
    assert errs.pop("norm_f.weight") < 1e-6 and max(errs.values()) < 1e-12, f"seed={seed}: {errs}"
    # a K larger than the data needs (a segment's bound for a row of this batch) changes nothing
    wider, _ = loss_and_grads(on, {**batch, MAX_LABELS: min(L // 2, k + 3)})
    torch.testing.assert_close(wider, ref, rtol=1e-12, atol=0, msg=with_seed(seed))
    assert on.loss_positions(batch) == k and off.loss_positions(batch) is None  # the gather ran above


def test_gathered_head_through_the_fused_kernel(monkeypatch):
    """The GPU path (kernels/cross_entropy.py's fused head and loss; on a CPU under the
    interpreter) on the gathered rows, fp32: the same loss and gradients as the head on every
    position. On the GPU the tensors must live there: CPU tensors without the interpreter take
    the PyTorch reference and the kernel never runs (its first GPU run failed for that reason)."""
    seed, rng = fresh_seed()
    print(f"random seed {seed}")
    monkeypatch.setattr(ce, "model_head_applies", lambda x: True)
    calls, op = [], ce._head_op
    monkeypatch.setattr(ce, "_head_op", lambda *a: calls.append(tuple(a[0].shape)) or op(*a))
    model = TINY["mamba2"]().to(DEVICE)
    B, L = 4, 32
    x, labels = torch.randint(0, V, (B, L), device=DEVICE), random_labels(rng, B, L).to(DEVICE)
    # CPU: 1e-6, near the measured error; GPU: cuBLAS may pick another kernel for B*K rows than
    # for B*L, and the model's backward sums with atomics (not yet measured there: 1e-5)
    tol = 1e-5 if ON_GPU else 1e-6
    k = max_labels(labels)
    batch = {"input_ids": x, "labels": labels, MAX_LABELS: k}
    loss, grads = loss_and_grads(SequenceLM(model), batch)
    ref, ref_grads = loss_and_grads(SequenceLM(model, gather_labels=False), batch)
    assert calls == [(B * k, 32), (B * L, 32)]  # the kernel saw K rows per sequence, then all L
    torch.testing.assert_close(loss, ref, rtol=tol, atol=0, msg=with_seed(seed))
    errs = {n: rel_err(grads[n], ref_grads[n]) for n in ref_grads}
    print("largest relative gradient errors:", sorted(errs.items(), key=lambda e: -e[1])[:3])
    assert len(errs) == len(list(model.parameters())) and max(errs.values()) < tol, f"seed={seed}: {errs}"
    # Dynamo compiles _head as a frame of its own (compile=true): the gather adds no graph break
    head = torch.compile(model._head, backend="aot_eager", fullgraph=True)
    positions = lm.labelled_positions(labels, k)  # (B, K)
    hidden = torch.randn(B, L, 32, device=DEVICE, requires_grad=True)  # (B, L, d_model)
    compiled = head(hidden, None, labels.gather(1, positions), IGNORE, positions)
    eager = model._head(hidden, None, labels.gather(1, positions), IGNORE, positions)
    full = model._head(hidden, None, labels, IGNORE)
    torch.testing.assert_close(compiled, eager, msg=with_seed(seed))
    torch.testing.assert_close(compiled, full, rtol=tol, atol=0, msg=with_seed(seed))
    g_compiled, g_full = (torch.autograd.grad(t, hidden)[0] for t in (compiled, full))
    assert rel_err(g_compiled, g_full) < tol and (g_full.abs().sum(-1) == 0).sum() >= B * (L - k)


def test_k_one_short_would_drop_a_label():
    """The check above has teeth: a K below the most labels of a row changes the loss."""
    seed, rng = fresh_seed()
    print(f"random seed {seed}")
    model = TINY["transformerpp"]().double()
    x, labels = torch.randint(0, V, (3, 24)), random_labels(rng, 3, 24, counts=[5, 2, 0])
    lit = SequenceLM(model)
    ref = lit._loss({"input_ids": x, "labels": labels})
    assert torch.allclose(lit._loss({"input_ids": x, "labels": labels, MAX_LABELS: 5}), ref, rtol=1e-12)
    assert not torch.allclose(lit._loss({"input_ids": x, "labels": labels, MAX_LABELS: 4}), ref, rtol=1e-6)


def test_labelled_positions_pick_every_label_then_ignored_ones():
    seed, rng = fresh_seed()
    print(f"random seed {seed}")
    B, L = 6, rng.randint(8, 64)
    labels = random_labels(rng, B, L)
    k = max_labels(labels)
    picks = lm.labelled_positions(labels, k, IGNORE)  # (B, K)
    assert picks.shape == (B, k) and picks.dtype == torch.long
    got = labels.gather(1, picks)  # (B, K)
    for b in range(B):
        where = (labels[b] != IGNORE).nonzero().flatten()
        n = len(where)
        assert picks[b, :n].tolist() == where.tolist(), with_seed(seed)("labelled positions in order")
        assert (got[b, n:] == IGNORE).all(), with_seed(seed)("padding picks must carry ignored labels")
        assert len(set(picks[b].tolist())) == k  # distinct: no position counted twice


def test_gather_only_where_it_pays():
    """A batch labelled at every position (language modelling), or more than half of it, keeps
    the head on every position; so does a batch without a count."""
    lit = SequenceLM(TINY["mamba2"]())
    labels = torch.zeros(2, 16, dtype=torch.long)
    assert lit.loss_positions({"labels": labels, MAX_LABELS: 8}) == 8
    assert lit.loss_positions({"labels": labels, MAX_LABELS: 9}) is None
    assert lit.loss_positions({"labels": labels, MAX_LABELS: 16}) is None
    assert lit.loss_positions({"labels": labels}) is None
    assert lit.loss_positions({"labels": labels, MAX_LABELS: lit.loss_positions({"labels": labels, MAX_LABELS: 3})}) == 3


def test_evaluation_with_the_gather_sums_what_it_sums_without():
    """_eval_step on the gathered positions: the same per-slice counts, correct predictions and
    nats (the argmax and the cross-entropy of each labelled position are unchanged)."""
    seed, rng = fresh_seed()
    print(f"random seed {seed}")
    model = TINY["mamba1"]().double().eval()
    sums = []
    for gather in (True, False):
        lit = SequenceLM(model, slice_names=["a", "b"], gather_labels=gather)
        lit._eval_reset()
        torch.manual_seed(seed)  # the same batches for both
        for per_token in (False, True):
            x, labels = torch.randint(0, V, (4, 20)), random_labels(random.Random(seed + per_token), 4, 20)
            slices = torch.randint(0, 2, (4, 20) if per_token else (4,))
            with torch.no_grad():
                lit._eval_step({"input_ids": x, "labels": labels, "slice": slices, MAX_LABELS: max_labels(labels),
                                "label_bytes": torch.randint(1, 5, (4, 20))})
        sums.append((lit._count.clone(), lit._correct.clone(), lit._nats.clone(), lit._bytes.clone()))
    (count, correct, nats, nbytes), (count0, correct0, nats0, nbytes0) = sums
    assert int(count.sum()) > 0
    assert torch.equal(count, count0) and torch.equal(correct, correct0) and torch.equal(nbytes, nbytes0)
    torch.testing.assert_close(nats, nats0, rtol=1e-12, atol=0, msg=with_seed(seed))


# ---- K from the data --------------------------------------------------------------------------

def test_k_per_segment_covers_every_row():
    """A segment whose rows hold different numbers of labels: its batches carry the most of any
    row of the segment (not of the batch: every batch of a segment has one K, so one graph), on
    the host and in the copy on the device; a batch mixing segments carries the larger."""
    seed, rng = fresh_seed()
    print(f"random seed {seed}")
    T = 32
    counts = [[rng.randint(0, 8) for _ in range(11)], [rng.randint(0, 3) for _ in range(7)] + [3]]
    segs = [Segment(f"s{i}", torch.randint(0, V, (len(c), T), dtype=torch.int16),
                    random_labels(rng, len(c), T, counts=c).to(torch.int16)) for i, c in enumerate(counts)]
    ds = SegmentDataset(segs)
    want = [max(1, max(c)) for c in counts]
    assert [ds.max_labels(s) for s in range(2)] == want, with_seed(seed)("")
    for idx in ([0, 1, 2], [10, 4], [11, 12, 18], [15]):
        batch = ds.__getitems__(idx)
        seg = 0 if idx[0] < 11 else 1
        assert batch[MAX_LABELS] == want[seg]
        assert int((batch["labels"] != IGNORE).sum(1).max()) <= batch[MAX_LABELS]
    assert ds.__getitems__([3, 12])[MAX_LABELS] == max(want)  # mixed segments (no sampler makes these)
    dev = ds.on_device("cpu")
    assert dev._max_labels == want and dev.__getitems__([12, 13])[MAX_LABELS] == want[1]
    # in chunks of rows: a row past the first chunk counts too
    big = torch.full((rows := 3 * (1 << 21) // 64 + 5, 64), IGNORE, dtype=torch.int8)
    big[rows - 1, :9] = 1
    assert max_labels(big) == 9


def test_mqar_batches_carry_the_pair_count():
    """MQAR labels one position per query: K of a segment is its number of key-value pairs."""
    seed = random.randrange(2**20)
    print(f"random seed {seed}")
    dm = MQARDataModule(vocab_size=96, batch_size=8, seed=seed, cache=False,
                        train_segments=[{"input_seq_len": 32, "num_kv_pairs": 4, "num_examples": 16},
                                        {"input_seq_len": 32, "num_kv_pairs": 8, "num_examples": 16}],
                        test_segments=[{"input_seq_len": 64, "num_kv_pairs": 2, "num_examples": 8}])
    dm.setup("fit")
    seen = set()
    for batch in dm.train_dataloader():
        k = batch[MAX_LABELS]
        assert ((batch["labels"] != IGNORE).sum(1) == k).all()
        seen.add(k)
    assert seen == {4, 8}
    assert [b[MAX_LABELS] for b in dm.val_dataloader()] == [2]


def test_fresh_batches_round_k_up_to_a_power_of_two():
    """Batches made fresh count their own labels (one K per batch), rounded up to a power of two
    so that a graphed run captures a few graphs, not one per count."""
    seed, rng = fresh_seed()
    print(f"random seed {seed}")
    made = {}

    def make(g):
        made[g] = random_labels(random.Random(seed + g), 4, 16, counts=[g % 7, 1, 0, 2])
        return torch.zeros(4, 16, dtype=torch.long), made[g]

    ds = FreshBatchDataset(make, 4, 7, "x")
    for g in range(7):
        batch = ds.__getitems__(list(range(4 * g, 4 * g + 4)))
        most = max(g % 7, 2)
        assert batch[MAX_LABELS] == (2 if most <= 2 else 4 if most <= 4 else 8), (g, batch[MAX_LABELS])
        assert int((batch["labels"] != IGNORE).sum(1).max()) <= batch[MAX_LABELS]


# ---- the loops use it -------------------------------------------------------------------------

def _spy_positions(monkeypatch, model):
    """Records, for each forward with labels, the shape of the positions passed (None: all)."""
    seen, forward = [], model.forward

    def spy(*a, positions=None, **kw):
        if kw.get("labels") is not None:
            seen.append(None if positions is None else tuple(positions.shape))
        return forward(*a, positions=positions, **kw)

    monkeypatch.setattr(model, "forward", spy)
    return seen


def _engine(lit):
    trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=torch.device("cpu")),
                                    max_steps=10, val_check_interval=None, log_every_n_steps=5,
                                    gradient_clip_val=1.0, precision="32-true", loggers=[])
    eng = engine.Engine(lit, None, trainer, record_cb=None, ckpt_path="unused", checkpoint_every=0, graphs=False)
    eng._optimizer()
    return eng


@pytest.mark.parametrize("gather", [True, False])
def test_engine_keys_its_graphs_by_k_and_steps_with_it(monkeypatch, gather):
    """Engine._key holds K (None when the gather is off): two segments of one shape with
    different K are two graphs; a step passes the model positions of K per row."""
    seed, rng = fresh_seed()
    print(f"random seed {seed}")
    model = TINY["mamba2"]()
    lit = SequenceLM(model, gather_labels=gather)
    eng = _engine(lit)
    seen = _spy_positions(monkeypatch, model)
    x = torch.randint(0, V, (4, 32))
    for k in (3, 6, 3):
        labels = random_labels(rng, 4, 32, counts=[k, 1, 0, k - 1])
        batch = {"input_ids": x, "labels": labels, "slice": torch.zeros(4, dtype=torch.long), MAX_LABELS: k}
        shapes, key_k = eng._key(batch)
        assert [s[0] for s in shapes] == ["input_ids", "labels"] and key_k == (k if gather else None)
        loss = eng.step(batch)
        assert torch.isfinite(loss)
    assert seen == ([(4, 3), (4, 6), (4, 3)] if gather else [None] * 3)
    assert len(eng.seen) == (2 if gather else 1)  # one graph per (shape, K) on a GPU


def test_lightning_loop_gathers_with_the_datasets_k(monkeypatch):
    """Lightning's loop: the batch's max_labels survives the loader and the transfer to the
    device, and training_step's loss gathers K = the segment's pair count; off, it does not."""
    import lightning as L

    seed = random.randrange(2**20)
    print(f"random seed {seed}")
    for gather, want in ((True, (8, 4)), (False, None)):
        dm = MQARDataModule(vocab_size=96, batch_size=8, seed=seed, cache=False,
                            train_segments=[{"input_seq_len": 32, "num_kv_pairs": 4, "num_examples": 16}],
                            test_segments=[{"input_seq_len": 32, "num_kv_pairs": 4, "num_examples": 8}])
        model = TINY["transformerpp"]()
        seen = _spy_positions(monkeypatch, model)
        lit = SequenceLM(model, gather_labels=gather, slice_names=["T=32,kv=4"])
        trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            limit_val_batches=0)
        trainer.fit(lit, datamodule=dm)
        assert seen == [want] * 3, (gather, seen)


# ---- configuration ----------------------------------------------------------------------------

def test_config_switch_and_bench_study_option():
    """trainer.gather_labels defaults to true, is left out of run directory names (it changes no
    result) and out of lightning.Trainer's arguments; bench study passes it."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from ssdbench import bench_study
    from ssdbench.record import config_differences

    GlobalHydra.instance().clear()
    with initialize_config_module("ssdbench.conf", version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
        assert cfg.trainer.gather_labels is True
        assert "trainer.gather_labels" in cfg.hydra.job.config.override_dirname.exclude_keys
        switch = [o for o in bench_study.overrides("mamba2", 64, 64, 100, True, False) if "gather" in o]
        assert switch == ["trainer.gather_labels=false"]
        assert compose("config", overrides=switch).trainer.gather_labels is False
    GlobalHydra.instance().clear()
    assert "trainer.gather_labels=true" in bench_study.overrides("mamba2", 64, 64, 100, True)
    # a record written before the key existed compares equal to a config holding the default
    assert config_differences({"trainer": {}}, {"trainer": {"gather_labels": True}}) == []
    assert config_differences({"trainer": {}}, {"trainer": {"gather_labels": False}}) == ["trainer.gather_labels"]


@pytest.mark.slow
def test_cli_runs_with_and_without_the_gather_log_the_same_losses(tmp_path):
    """End to end on the CPU (Lightning's loop): MQAR with trainer.gather_labels=false logs the
    losses and validation metrics of the default (the gather), to fp32 rounding; a value that is
    not a boolean is one line and exit 2."""
    import pandas as pd
    from test_cli import TINY as CLI_TINY
    from test_cli import ssdbench

    args = ["run", *CLI_TINY, "trainer.max_steps=30", "trainer.log_every_n_steps=10", "trainer.val_check_interval=30"]
    ssdbench(*args, f"results_dir={tmp_path / 'on'}", cwd=tmp_path, check=0)
    ssdbench(*args, f"results_dir={tmp_path / 'off'}", "trainer.gather_labels=false", cwd=tmp_path, check=0)
    (on,), (off,) = (list((tmp_path / d).rglob("record.json")) for d in ("on", "off"))
    assert on.parent.name == off.parent.name  # the same run directory name: the switch is operational
    ra, rb = (json.loads(p.read_text()) for p in (on, off))
    assert ra["config"]["trainer"]["gather_labels"] is True and rb["config"]["trainer"]["gather_labels"] is False
    a, b = (pd.read_csv(p.parent / "logs" / "version_0" / "metrics.csv") for p in (on, off))
    a, b = (df[df["train/loss"].notna()]["train/loss"].reset_index(drop=True) for df in (a, b))
    assert len(a) == 3
    pd.testing.assert_series_equal(a, b, rtol=1e-4)
    for key in ("val/loss", "val/acc"):
        assert rb["metrics"][key] == pytest.approx(ra["metrics"][key], rel=1e-4)
    p = ssdbench(*args, f"results_dir={tmp_path / 'bad'}", "trainer.gather_labels=maybe", cwd=tmp_path, check=2)
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "trainer.gather_labels" in err[0], p.stderr
