"""Properties of the selective-copying and induction-heads generators and datamodules, and one
CLI smoke run per task (random seeds: any seed must satisfy the properties)."""
import os
import random
import subprocess
import sys

import pytest
import torch

from ssdbench.errors import ConfigError
from ssdbench.tasks.induction_heads import InductionHeadsDataModule, induction_heads_examples
from ssdbench.tasks.selective_copying import (FIRST_DATA, IGNORE, MARKER, NOISE,
                                               SelectiveCopyingDataModule,
                                               selective_copying_examples)


# --- selective copying --------------------------------------------------------------------

@pytest.mark.parametrize("trial", range(4))
def test_selective_copying_properties(trial):
    seed = random.randrange(2**31)
    K = random.choice([1, 4, 16])
    T = random.choice([2 * K, 2 * K + 1, 64, 256])
    D = random.choice([2, 16, 50])
    n = 64
    x, y = selective_copying_examples(n, T, K, D, seed=seed)
    msg = f"seed={seed} T={T} K={K} D={D}"
    assert x.shape == y.shape == (n, T) and x.dtype == y.dtype == torch.int64, msg
    assert int(x.min()) >= 0 and int(x.max()) < D + 2, msg
    region = T - K
    assert (x[:, region:] == MARKER).all(), msg
    assert not (x[:, :region] == MARKER).any(), msg
    sup = y != IGNORE
    assert (sup.sum(1) == K).all() and sup[:, region:].all(), msg  # exactly the markers
    for row in range(n):
        data = x[row, :region][x[row, :region] != NOISE]
        assert len(data) == K, msg  # the noise run holds exactly K data tokens
        assert torch.equal(y[row, region:], data), msg  # answers: the data in order
    assert ((y[sup] >= FIRST_DATA) & (y[sup] < FIRST_DATA + D)).all(), msg


def test_selective_copying_deterministic_and_seed_sensitive():
    seed = random.randrange(2**31)
    a = selective_copying_examples(16, 128, 16, 16, seed=seed)
    b = selective_copying_examples(16, 128, 16, 16, seed=seed)
    c = selective_copying_examples(16, 128, 16, 16, seed=seed + 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_selective_copying_datamodule():
    seed = random.randrange(2**20)
    dm = SelectiveCopyingDataModule(seq_len=64, num_data_tokens=8, data_vocab=16, vocab_size=18,
                                    num_train_examples=100, num_test_examples=30, batch_size=16,
                                    seed=seed)
    assert dm.vocab_size == 18 and dm.max_seq_len == 64
    dm.setup("fit")
    assert dm.slice_names == ["T=64,k=8"]
    train_rows = {tuple(r) for r in dm.train_set.segments[0].inputs.tolist()}
    test_rows = {tuple(r) for r in dm.test_set.segments[0].inputs.tolist()}
    assert not train_rows & test_rows
    assert sum(len(b["input_ids"]) for b in dm.val_dataloader()) == 30
    assert sum(len(b["input_ids"]) for b in dm.train_dataloader()) == 100
    # same seed, same data
    dm2 = SelectiveCopyingDataModule(seq_len=64, num_data_tokens=8, data_vocab=16,
                                     num_train_examples=100, num_test_examples=30, seed=seed)
    dm2.setup("fit")
    assert torch.equal(dm.test_set.segments[0].inputs, dm2.test_set.segments[0].inputs)


@pytest.mark.parametrize("kwargs,field", [
    (dict(seq_len=31, num_data_tokens=16), "num_data_tokens"),  # data + markers do not fit
    (dict(data_vocab=1), "data_vocab"),                         # nothing to copy
    (dict(seq_len=0), "seq_len"),
    (dict(num_data_tokens=0), "num_data_tokens"),
])
def test_selective_copying_bad_settings_name_the_field(kwargs, field):
    args = dict(seq_len=64, num_data_tokens=8, data_vocab=16) | kwargs
    with pytest.raises(ConfigError, match=field):
        selective_copying_examples(4, args["seq_len"], args["num_data_tokens"], args["data_vocab"])
    with pytest.raises(ConfigError, match=field):
        SelectiveCopyingDataModule(**args)


def test_selective_copying_vocab_size_must_agree():
    with pytest.raises(ConfigError, match="task.vocab_size"):
        SelectiveCopyingDataModule(data_vocab=8, vocab_size=18)


# --- induction heads ----------------------------------------------------------------------

@pytest.mark.parametrize("trial", range(4))
def test_induction_heads_properties(trial):
    seed = random.randrange(2**31)
    T = random.choice([3, 4, 64, 257])
    V = random.choice([3, 16, 40])
    n = 128
    x, y = induction_heads_examples(n, T, V, seed=seed)
    msg = f"seed={seed} T={T} V={V}"
    special = V - 1
    assert x.shape == y.shape == (n, T) and x.dtype == y.dtype == torch.int64, msg
    assert int(x.min()) >= 0 and int(x.max()) < V, msg
    sup = y != IGNORE
    assert (sup.sum(1) == 1).all() and sup[:, -1].all(), msg  # only the last position
    assert (x[:, -1] == special).all(), msg
    assert ((x == special).sum(1) == 2).all(), msg  # the special token exactly twice
    for row in range(n):
        p = int((x[row, :-1] == special).nonzero()[0])
        assert p <= T - 3, msg
        assert int(y[row, -1]) == int(x[row, p + 1]) != special, msg


def test_induction_heads_deterministic_and_seed_sensitive():
    seed = random.randrange(2**31)
    a = induction_heads_examples(16, 64, 16, seed=seed)
    b = induction_heads_examples(16, 64, 16, seed=seed)
    c = induction_heads_examples(16, 64, 16, seed=seed + 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_induction_heads_datamodule_slices():
    seed = random.randrange(2**20)
    dm = InductionHeadsDataModule(vocab_size=16, train_seq_len=32, test_lengths=[16, 32, 64],
                                  num_train_examples=80, num_test_examples=20, batch_size=8,
                                  seed=seed)
    assert dm.max_seq_len == 64
    dm.setup("fit")
    assert dm.slice_names == ["T=16", "T=32", "T=64"]
    assert dm.train_set.segments[0].inputs.shape == (80, 32)
    n_test = 0
    for batch in dm.val_dataloader():
        assert len(set(batch["slice"].tolist())) == 1  # batches never mix lengths
        assert batch["input_ids"].shape[1] == [16, 32, 64][int(batch["slice"][0])]
        n_test += len(batch["input_ids"])
    assert n_test == 60
    # the test at the training length is not the training data
    train_rows = {tuple(r) for r in dm.train_set.segments[0].inputs.tolist()}
    assert not train_rows & {tuple(r) for r in dm.test_set.segments[1].inputs.tolist()}


def test_induction_heads_warns_when_the_training_length_is_not_tested(capsys):
    InductionHeadsDataModule(vocab_size=16, train_seq_len=32, test_lengths=[16, 32])
    assert capsys.readouterr().err == ""
    InductionHeadsDataModule(vocab_size=16, train_seq_len=64, test_lengths=[256, 1024])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "task.test_lengths [256, 1024] leave out task.train_seq_len 64" in err


@pytest.mark.parametrize("kwargs,field", [
    (dict(train_seq_len=2), "train_seq_len"),          # no room for special, target, special
    (dict(vocab_size=2), "vocab_size"),                # one ordinary token: nothing to recall
    (dict(test_lengths=[64, 2]), r"test_lengths\[1\]"),
    (dict(test_lengths=[]), "test_lengths"),
    (dict(test_lengths=[64, 64]), "test_lengths"),
    (dict(test_lengths=["long"]), r"test_lengths\[0\]"),
])
def test_induction_heads_bad_settings_name_the_field(kwargs, field):
    args = dict(vocab_size=16, train_seq_len=32, test_lengths=[32]) | kwargs
    with pytest.raises(ConfigError, match=field):
        InductionHeadsDataModule(**args)
    if "test_lengths" not in kwargs:
        with pytest.raises(ConfigError, match=field.replace("train_", "")):
            induction_heads_examples(4, args["train_seq_len"], args["vocab_size"])


# --- CLI smoke runs -----------------------------------------------------------------------

def _cli(tmp_path, *args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # a user's CPU run never has the Triton interpreter on
    p = subprocess.run([sys.executable, "-m", "ssdbench.cli", "run", *args, "model=transformerpp",
                        "progress_bar=false", "trainer=cpu", "trainer.max_steps=5",
                        "trainer.val_check_interval=5", "optim.warmup_steps=1",
                        f"results_dir={tmp_path}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"


@pytest.mark.slow
def test_cli_selective_copying(tmp_path):
    _cli(tmp_path, "task=selective_copying", "task.seq_len=32", "task.num_data_tokens=4",
         "task.num_train_examples=64", "task.num_test_examples=16", "task.batch_size=16")


@pytest.mark.slow
def test_cli_induction_heads(tmp_path):
    _cli(tmp_path, "task=induction_heads", "task.train_seq_len=32", "task.test_lengths=[16,64]",
         "task.num_train_examples=64", "task.num_test_examples=16", "task.batch_size=16",
         "task.eval_lengths=[128]", "task.eval_examples=4")
    import json
    (record,) = tmp_path.rglob("record.json")
    metrics = json.loads(record.read_text())["metrics"]
    assert 0.0 <= metrics["extrapolation/acc/T=128"] <= 1.0  # scored after training


@pytest.mark.slow
def test_cli_induction_heads_fresh_data(tmp_path, monkeypatch):
    """task.fresh_data=true through the real trainer: 5 steps (_cli's) over epochs of 2 batches."""
    monkeypatch.setenv("SSDBENCH_CACHE", str(tmp_path / "cache"))
    _cli(tmp_path, "task=induction_heads", "task.fresh_data=true", "task.train_seq_len=32",
         "task.test_lengths=[16,64]", "task.num_train_examples=32", "task.num_test_examples=16",
         "task.batch_size=16")
    import json
    (record,) = tmp_path.rglob("record.json")
    record = json.loads(record.read_text())
    assert record["status"] == "ok" and record["global_step"] == 5
    assert record["tokens_seen"] == 5 * 16 * 32


# --- induction heads: evaluation at long lengths --------------------------------------------

class _Oracle(torch.nn.Module):
    """Solves induction heads exactly (copies the token after the first special token);
    records the batch shapes it saw, and runs out of memory from ``oom_at`` tokens per row."""

    def __init__(self, V, oom_at=None, error=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.V, self.oom_at, self.error, self.shapes = V, oom_at, error, []

    def forward(self, x):  # (b, T) -> (b, T, V)
        self.shapes.append(tuple(x.shape))
        if self.error is not None:
            raise self.error
        if self.oom_at is not None and x.shape[1] >= self.oom_at:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")
        first = (x == self.V - 1).int().argmax(dim=1)  # (b,) position of the first special token
        target = x.gather(1, (first + 1)[:, None])[:, 0]  # (b,)
        logits = torch.zeros(*x.shape, self.V)
        logits[torch.arange(len(x)), -1, target] = 1.0
        return logits


def test_induction_heads_evaluation_lengths_batches_and_oom():
    dm = InductionHeadsDataModule(vocab_size=16, train_seq_len=32, test_lengths=[32],
                                  eval_lengths=[64, 256, 1024, 4096], eval_examples=6,
                                  eval_tokens_per_batch=1024, seed=random.randrange(2**20))
    oracle = _Oracle(16)
    out = dm.evaluate_model(oracle)
    assert out == {f"extrapolation/acc/T={T}": 1.0 for T in (64, 256, 1024, 4096)}
    # batches fit the token budget: 6 rows of 64 in one batch, 4 rows of 256, then one row each
    assert oracle.shapes[:3] == [(6, 64), (4, 256), (2, 256)]
    assert all(b * T <= 1024 for b, T in oracle.shapes[:-6]) and oracle.shapes[-1] == (1, 4096)
    assert oracle.training  # mode restored

    # out of memory from 1024 on: NaN there and beyond (not attempted), the run goes on
    oom = _Oracle(16, oom_at=1024)
    out = dm.evaluate_model(oom)
    assert out["extrapolation/acc/T=256"] == 1.0 and out["extrapolation/oom_from"] == 1024
    assert all(out[f"extrapolation/acc/T={T}"] != out[f"extrapolation/acc/T={T}"] for T in (1024, 4096))
    assert max(T for _, T in oom.shapes) == 1024

    # any other error is a real failure
    with pytest.raises(RuntimeError, match="shape mismatch"):
        dm.evaluate_model(_Oracle(16, error=RuntimeError("shape mismatch")))
    with pytest.raises(ConfigError, match=r"eval_lengths\[0\]"):
        InductionHeadsDataModule(test_lengths=[32], eval_lengths=[2])


def test_induction_heads_evaluation_with_a_real_model():
    from ssdbench.models.mamba2 import Mamba2
    dm = InductionHeadsDataModule(vocab_size=16, train_seq_len=32, test_lengths=[32],
                                  eval_lengths=[64, 512], eval_examples=4, seed=random.randrange(2**20))
    model = Mamba2(vocab_size=16, d_model=32, n_layers=1, d_state=8, headdim=16, chunk_size=32)
    out = dm.evaluate_model(model)
    assert set(out) == {"extrapolation/acc/T=64", "extrapolation/acc/T=512"}
    assert all(0.0 <= v <= 1.0 for v in out.values())


def test_induction_heads_evaluation_time_limit():
    dm = InductionHeadsDataModule(vocab_size=16, train_seq_len=32, test_lengths=[32],
                                  eval_lengths=[64, 128], eval_examples=2, eval_time_limit_s=1e-9)
    out = dm.evaluate_model(_Oracle(16))
    assert out["extrapolation/acc/T=64"] == 1.0  # the first length always runs
    assert out["extrapolation/time_limit_from"] == 128 and out["extrapolation/acc/T=128"] != out["extrapolation/acc/T=128"]


def test_induction_heads_time_limit_looks_ahead(monkeypatch):
    """A length that would end past the limit is not started: with times growing 4x per
    doubling (attention), 1 s and 4 s for the first two lengths predict 16 s for the third,
    which a 10 s limit does not allow, although only 5 s have passed."""
    from ssdbench.tasks import induction_heads as ih
    assert ih._next_time([], 64) == 0.0 and ih._next_time([(64, 1.0)], 128) == 0.0
    assert ih._next_time([(64, 1.0), (128, 4.0)], 256) == pytest.approx(16.0)  # quadratic
    assert ih._next_time([(64, 1.0), (128, 2.0)], 512) == pytest.approx(8.0)  # linear
    assert ih._next_time([(64, 1.0), (128, 1.0)], 256) == pytest.approx(2.0)  # at least linear
    assert ih._next_time([(64, 1.0), (128, 64.0)], 256) == pytest.approx(256.0)  # at most quadratic

    clock = {"now": 1000.0}
    monkeypatch.setattr(ih.time, "time", lambda: clock["now"])

    class Quadratic(_Oracle):  # scoring length T "takes" (T / 64)^2 seconds of the fake clock
        def forward(self, x):
            clock["now"] += (x.shape[1] / 64) ** 2
            return super().forward(x)

    dm = InductionHeadsDataModule(vocab_size=16, train_seq_len=32, test_lengths=[32],
                                  eval_lengths=[64, 128, 256], eval_examples=2, eval_time_limit_s=10.0)
    out = dm.evaluate_model(Quadratic(16))
    assert out["extrapolation/acc/T=64"] == 1.0 and out["extrapolation/acc/T=128"] == 1.0
    assert out["extrapolation/time_limit_from"] == 256
    assert out["extrapolation/acc/T=256"] != out["extrapolation/acc/T=256"]  # NaN, not started
    assert clock["now"] == 1005.0  # 1 s + 4 s: the 16 s length never ran
