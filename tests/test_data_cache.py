"""The synthetic tasks' data: chunked generators equal to the unchunked ones they replaced, the
on-disk cache (hit, miss, corrupt and truncated files, concurrent writers, off switches), the
compact dtypes, and induction heads' fresh training batches (deterministic per seed and batch
number, also across a resumed Lightning run). Random seeds and sizes every run; every test
points SSDBENCH_CACHE at its own tmp_path."""
import pickle
import random
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ssdbench.errors import ConfigError
from ssdbench.tasks import base, cache, induction_heads, mqar, selective_copying
from ssdbench.tasks.induction_heads import InductionHeadsDataModule
from ssdbench.tasks.mqar import MQARDataModule
from ssdbench.tasks.selective_copying import SelectiveCopyingDataModule

IGNORE = -100


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private cache, with every split written (however quickly it was made)."""
    monkeypatch.setenv("SSDBENCH_CACHE", str(tmp_path))
    monkeypatch.delenv(cache.ENV_SWITCH, raising=False)
    monkeypatch.setattr(cache, "MIN_GENERATION_S", 0.0)
    return tmp_path / "synthetic"


# --- the generators as they were before chunking (the data must not change) ---------------

def _mqar_before(n, T, K, V, power_a, random_non_queries, seed):
    rng = np.random.default_rng(seed)
    context = 2 * K
    key_pool, value_pool = np.arange(1, V // 2), np.arange(V // 2, V)
    keys = key_pool[np.argsort(rng.random((n, key_pool.size)), axis=1)[:, :K]]
    values = value_pool[np.argsort(rng.random((n, value_pool.size)), axis=1)[:, :K]]
    kvs = np.empty((n, context), dtype=np.int64)
    kvs[:, 0::2], kvs[:, 1::2] = keys, values
    space = (T - context) // 2
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    p /= p.sum()
    gumbel = -np.log(-np.log(rng.random((n, space))))
    gaps = np.argsort(-(np.log(p)[None, :] + gumbel), axis=1)[:, :K]
    queries = np.zeros((n, T - context + 1), dtype=np.int64)
    rows = np.arange(n)[:, None]
    queries[rows, 2 * gaps] = keys
    full = np.concatenate([kvs, queries], axis=1)
    labels_full = np.full_like(full, IGNORE)
    labels_full[rows, context + 2 * gaps + 1] = values
    inputs, labels = full[:, :-1], labels_full[:, 1:]
    if random_non_queries:
        noise = rng.integers(0, V, size=inputs.shape)
        filler = np.zeros_like(inputs, dtype=bool)
        filler[:, context:] = inputs[:, context:] == 0
        inputs = np.where(filler, noise, inputs)
    return torch.from_numpy(np.ascontiguousarray(inputs)), torch.from_numpy(np.ascontiguousarray(labels))


def _selective_copying_before(n, T, K, D, seed):
    region = T - K
    rng = np.random.default_rng(seed)
    pos = np.sort(np.argsort(rng.random((n, region)), axis=1)[:, :K], axis=1)
    data = rng.integers(2, 2 + D, size=(n, K))
    rows = np.arange(n)[:, None]
    inputs = np.full((n, T), 0, dtype=np.int64)
    inputs[rows, pos] = data
    inputs[:, region:] = 1
    labels = np.full((n, T), IGNORE, dtype=np.int64)
    labels[:, region:] = data
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def _induction_heads_before(n, T, V, seed):
    special = V - 1
    rng = np.random.default_rng(seed)
    full = rng.integers(0, special, size=(n, T + 1))
    p = rng.integers(0, T - 2, size=n)
    rows = np.arange(n)
    full[rows, p] = special
    full[:, T - 1] = special
    full[:, T] = full[rows, p + 1]
    labels_full = np.full_like(full, IGNORE)
    labels_full[:, T] = full[:, T]
    inputs, labels = full[:, :-1], labels_full[:, 1:]
    return torch.from_numpy(np.ascontiguousarray(inputs)), torch.from_numpy(np.ascontiguousarray(labels))


def _assert_same(new, old, msg):
    x, y = new
    assert x.shape == old[0].shape and y.shape == old[1].shape, msg
    assert torch.equal(x.long(), old[0]) and torch.equal(y.long(), old[1]), msg


@pytest.mark.parametrize("chunk_rows", [1, 7, None])  # None: the real chunk size
@pytest.mark.parametrize("trial", range(2))
def test_chunked_generators_equal_the_unchunked_ones(monkeypatch, chunk_rows, trial):
    """Byte for byte, in int64 and in the compact dtype, whatever the chunk size (a chunk of
    1 or 7 rows makes every chunk boundary fall inside the split)."""
    if chunk_rows is not None:
        for module in (mqar, selective_copying, induction_heads):
            monkeypatch.setattr(module, "rows_per_chunk", lambda width, elements=0: chunk_rows)
    seed = random.randrange(2**31)
    n = random.randint(1, 40)
    T = random.choice([16, 64, 128])
    K = random.randint(1, T // 4)
    V = random.choice([T + 1, 300, 8192])
    a, noise = random.choice([0.01, 0.5]), random.random() < 0.5
    msg = f"seed={seed} n={n} T={T} K={K} V={V} a={a} noise={noise} chunk={chunk_rows}"
    old = _mqar_before(n, T, K, V, a, noise, seed)
    _assert_same(mqar.mqar_examples(n, T, K, V, a, noise, seed=seed), old, msg)
    _assert_same(mqar.mqar_examples(n, T, K, V, a, noise, seed=seed, dtype=base.token_dtype(V)), old, msg)

    Ks = random.randint(1, 16)
    Ts = random.choice([2 * Ks, 2 * Ks + 1, 256, 4096])
    D = random.choice([2, 16, 100])
    msg = f"seed={seed} n={n} T={Ts} K={Ks} D={D} chunk={chunk_rows}"
    old = _selective_copying_before(n, Ts, Ks, D, seed)
    _assert_same(selective_copying.selective_copying_examples(n, Ts, Ks, D, seed=seed), old, msg)
    _assert_same(selective_copying.selective_copying_examples(n, Ts, Ks, D, seed=seed,
                                                              dtype=base.token_dtype(D + 2)), old, msg)

    Ti, Vi = random.choice([3, 4, 64, 257]), random.choice([3, 16, 200])
    msg = f"seed={seed} n={n} T={Ti} V={Vi} chunk={chunk_rows}"
    old = _induction_heads_before(n, Ti, Vi, seed)
    _assert_same(induction_heads.induction_heads_examples(n, Ti, Vi, seed=seed), old, msg)
    _assert_same(induction_heads.induction_heads_examples(n, Ti, Vi, seed=seed,
                                                          dtype=base.token_dtype(Vi)), old, msg)


@pytest.mark.parametrize("k", [1, 5, 64, 256, 1100])
def test_smallest_k_is_the_head_of_argsort(k):
    """Including rows that hold fewer than k values under the threshold (sorted in full)."""
    rng = np.random.default_rng(random.randrange(2**31))
    r = rng.random((50, 4095))
    r[::7] = 0.999 + 0.001 * r[::7]  # every 7th row: nothing below the threshold
    assert np.array_equal(base.smallest_k(r, k), np.argsort(r, axis=1)[:, :k])


def test_token_dtype_holds_the_vocabulary_and_ignore():
    assert base.token_dtype(16) == torch.int8 and base.token_dtype(128) == torch.int8
    assert base.token_dtype(129) == torch.int16 and base.token_dtype(8192) == torch.int16
    assert base.token_dtype(2**15 + 1) == torch.int32 and base.token_dtype(50277) == torch.int32
    for dtype in (torch.int8, torch.int16, torch.int32):
        assert torch.iinfo(dtype).min <= IGNORE


# --- the cache --------------------------------------------------------------------------

def _mqar(seed, **kw):
    args = dict(vocab_size=256, batch_size=8, seed=seed,
                train_segments=[{"input_seq_len": 32, "num_kv_pairs": 4, "num_examples": 24},
                                {"input_seq_len": 64, "num_kv_pairs": 8, "num_examples": 16}],
                test_segments=[{"input_seq_len": 64, "num_kv_pairs": 8, "num_examples": 8}]) | kw
    return MQARDataModule(**args)


def _splits(dm):
    return [(s.name, s.inputs, s.labels) for ds in (dm.train_set, dm.test_set) for s in ds.segments]


def _assert_splits_equal(a, b):
    assert len(a) == len(b)
    for (na, xa, ya), (nb, xb, yb) in zip(a, b):
        assert na == nb and xa.dtype == xb.dtype and torch.equal(xa, xb) and torch.equal(ya, yb)


def _fresh(seed, **kw):
    dm = _mqar(seed, cache=False, **kw)
    dm.setup("fit")
    return _splits(dm)


def _no_generation(*args, **kwargs):
    raise AssertionError("generated although the split is in the cache")


def test_miss_writes_the_split_and_hit_reads_it_back(cache_dir, monkeypatch, capsys):
    seed = random.randrange(2**20)
    dm = _mqar(seed)
    dm.setup("fit")
    files = sorted(p.name for p in cache_dir.iterdir())
    assert [f.rsplit("-", 1)[0] for f in files] == ["MQARDataModule-test", "MQARDataModule-train"]
    assert all(f.endswith(".seg") for f in files)
    expected = _fresh(seed)
    _assert_splits_equal(_splits(dm), expected)  # what was written is what generation gives
    monkeypatch.setattr(mqar, "mqar_examples", _no_generation)
    dm2 = _mqar(seed)
    dm2.setup("fit")  # read from the files, or _no_generation raises
    _assert_splits_equal(_splits(dm2), expected)
    assert dm2.train_set.segments[0].inputs.dtype == torch.int16  # vocabulary 256: compact in memory
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("change", [dict(seed_offset=1), dict(power_a=0.5), dict(vocab_size=300),
                                    dict(random_non_queries=False), dict(seq_len=64, segments=True)])
def test_a_different_seed_or_parameter_is_a_different_file(cache_dir, monkeypatch, change):
    seed = random.randrange(2**20)
    _mqar(seed).setup("fit")
    before = set(cache_dir.iterdir())
    kw = {k: v for k, v in change.items() if k not in ("seed_offset", "segments")}
    if change.get("segments"):  # the same segments, but the first one's length comes from seq_len
        kw["train_segments"] = [{"num_kv_pairs": 4, "num_examples": 24},
                                {"input_seq_len": 64, "num_kv_pairs": 8, "num_examples": 16}]
    seed2 = seed + change.get("seed_offset", 0)
    dm = _mqar(seed2, **kw)
    dm.setup("fit")
    new = set(cache_dir.iterdir()) - before
    changed_test = "seed_offset" in change or "segments" not in change
    assert len(new) == (2 if changed_test else 1), sorted(p.name for p in new)
    _assert_splits_equal(_splits(dm), _fresh(seed2, **kw))
    monkeypatch.setattr(mqar, "mqar_examples", _no_generation)
    _mqar(seed).setup("fit")  # the first key's files are still there and still read


def test_other_tasks_are_cached_too(cache_dir, monkeypatch):
    seed = random.randrange(2**20)
    make = [lambda **kw: SelectiveCopyingDataModule(seq_len=64, num_data_tokens=8, num_train_examples=40,
                                                    num_test_examples=8, seed=seed, **kw),
            lambda **kw: InductionHeadsDataModule(train_seq_len=32, test_lengths=[16, 64],
                                                  num_train_examples=40, num_test_examples=8, seed=seed, **kw)]
    for build, module, name in zip(make, (selective_copying, induction_heads),
                                   ("selective_copying_examples", "induction_heads_examples")):
        dm = build()
        dm.setup("fit")
        fresh = build(cache=False)
        fresh.setup("fit")
        _assert_splits_equal(_splits(dm), _splits(fresh))
        assert dm.train_set.segments[0].inputs.dtype == torch.int8
        with monkeypatch.context() as m:
            m.setattr(module, name, _no_generation)
            again = build()
            again.setup("fit")
        _assert_splits_equal(_splits(again), _splits(fresh))
    assert len(list(cache_dir.iterdir())) == 4


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_payload_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # a label or token near the end
    path.write_bytes(bytes(data))


def _flip_header_byte(path):
    data = bytearray(path.read_bytes())
    data[20] ^= 0x20  # inside the JSON header
    path.write_bytes(bytes(data))


def _append(path):
    path.write_bytes(path.read_bytes() + b"\0" * 16)


def _other_key(path):
    """A whole, valid file, written for another seed, under this key's name (e.g. copied by hand)."""
    dm = _mqar(12345)
    segs = dm.build_split("train", 12345)
    cache.write_segments(path, cache.cache_key("MQARDataModule", dm.data_params("train"), 12345, 1), segs)


@pytest.mark.parametrize("damage", [_truncate, _flip_payload_byte, _flip_header_byte, _append, _other_key,
                                    lambda p: p.write_bytes(b""), lambda p: p.write_bytes(b"not a cache file")],
                         ids=["truncated", "payload-bit", "header-bit", "trailing-bytes", "other-key", "empty",
                              "garbage"])
def test_an_untrustworthy_file_is_regenerated_with_one_warning(cache_dir, capsys, damage):
    seed = random.randrange(2**20)
    _mqar(seed).setup("fit")
    (train_file,) = cache_dir.glob("MQARDataModule-train-*.seg")
    damage(train_file)
    capsys.readouterr()
    dm = _mqar(seed)
    dm.setup("fit")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unusable" in err and train_file.name in err, err
    _assert_splits_equal(_splits(dm), _fresh(seed))
    again = _mqar(seed)  # the file was replaced by a good one: read without a warning
    again.setup("fit")
    assert capsys.readouterr().err == ""
    _assert_splits_equal(_splits(again), _fresh(seed))


def test_concurrent_writers_leave_one_whole_file(cache_dir):
    seed = random.randrange(2**20)
    dm = _mqar(seed)
    segs = dm.build_split("train", seed)
    key = cache.cache_key("MQARDataModule", dm.data_params("train"), seed, mqar.GENERATOR_VERSION)
    path = cache.cache_path(key)
    errors = []

    def write():
        try:
            for _ in range(5):
                cache.write_segments(path, key, segs)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [p.name for p in cache_dir.iterdir()] == [path.name]  # no temporary files left
    back = cache.read_segments(path, key)
    for a, b in zip(back, segs):
        assert a.name == b.name and torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)


def test_a_failed_write_warns_and_keeps_the_data(cache_dir, monkeypatch, capsys):
    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.os, "replace", fail)
    seed = random.randrange(2**20)
    dm = _mqar(seed)
    dm.setup("fit")
    err = capsys.readouterr().err
    assert "could not write" in err and "No space left" in err
    assert list(cache_dir.iterdir()) == []  # the temporary files are removed
    _assert_splits_equal(_splits(dm), _fresh(seed))


def test_switches_and_time_floor(cache_dir, monkeypatch):
    seed = random.randrange(2**20)
    _mqar(seed, cache=False).setup("fit")
    assert not cache_dir.exists()
    monkeypatch.setenv(cache.ENV_SWITCH, "0")
    _mqar(seed).setup("fit")
    assert not cache_dir.exists()
    monkeypatch.delenv(cache.ENV_SWITCH)
    monkeypatch.setattr(cache, "MIN_GENERATION_S", 3600.0)  # made faster than that: not written
    _mqar(seed).setup("fit")
    assert not cache_dir.exists()
    monkeypatch.setattr(cache, "MIN_GENERATION_S", 0.0)
    _mqar(seed).setup("fit")
    assert len(list(cache_dir.iterdir())) == 2
    with pytest.raises(ConfigError, match="task.cache"):
        _mqar(seed, cache="yes")


def test_batches_are_int64_whatever_the_segments_hold(cache_dir):
    dm = _mqar(random.randrange(2**20), vocab_size=8192)
    dm.setup("fit")
    assert dm.train_set.segments[0].inputs.dtype == torch.int16
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        for batch in loader:
            assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    item = dm.train_set[3]
    assert item["input_ids"].dtype == item["labels"].dtype == torch.int64
    assert torch.equal(item["labels"], dm.train_set.segments[0].labels[3].long())


# --- induction heads: fresh data every step ----------------------------------------------

def _ih(seed, **kw):
    args = dict(vocab_size=16, train_seq_len=32, test_lengths=[16, 32], num_train_examples=40,
                num_test_examples=8, batch_size=8, seed=seed, fresh_data=True, cache=False) | kw
    return InductionHeadsDataModule(**args)


def _train_batches(dm):
    return [b for b in dm.train_dataloader()]


def test_fresh_batches_are_determined_by_seed_and_batch_number():
    seed = random.randrange(2**20)
    dm, same, other = _ih(seed), _ih(seed), _ih(seed + 1)
    for d in (dm, same, other):
        d.setup("fit")
    loader = dm.train_dataloader()  # one loader per fit, as Lightning makes it: epochs continue
    a, b, c = list(loader), _train_batches(same), _train_batches(other)
    assert len(a) == len(loader) == 40 // 8
    for x, y, z in zip(a, b, c):
        assert x["input_ids"].shape == (8, 32) and x["input_ids"].dtype == x["labels"].dtype == torch.int64
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
        assert not torch.equal(x["input_ids"], z["input_ids"])
        assert set(x) == {"input_ids", "labels", "slice", "max_labels"} and x["slice"].tolist() == [0] * 8
        assert x["max_labels"] == 1  # induction heads score the last position only
    rows = {tuple(r) for bt in a for r in bt["input_ids"].tolist()}
    assert len(rows) == 40  # every batch new
    second_epoch = list(loader)
    assert not {tuple(r) for bt in second_epoch for r in bt["input_ids"].tolist()} & rows
    # batch g is fresh_batch(g), whichever way it is fetched (row by row, or a rank's share)
    x, y = dm.fresh_batch(6)
    assert torch.equal(second_epoch[1]["input_ids"], x.long())
    assert torch.equal(dm.train_set[6 * 8 + 3]["labels"], y[3].long())
    share = dm.train_set.__getitems__([6 * 8 + 1, 6 * 8 + 5])
    assert torch.equal(share["input_ids"], x[[1, 5]].long())
    # loader workers get the dataset by pickle: it must not drag the datamodule (and trainer) along
    dm.trainer = threading.Lock()  # unpicklable
    copy = pickle.loads(pickle.dumps(dm.train_set))
    assert torch.equal(copy.batch(6)[0], x.long())


def test_fresh_batches_have_the_fixed_sets_distribution():
    dm = _ih(random.randrange(2**20), vocab_size=10, train_seq_len=64)
    dm.setup("fit")
    special = 9
    for batch in _train_batches(dm):
        x, y = batch["input_ids"], batch["labels"]  # (b, T) each
        assert (x[:, -1] == special).all() and ((x == special).sum(1) == 2).all()
        assert ((y != IGNORE).sum(1) == 1).all()
        p = (x[:, :-1] == special).int().argmax(1)  # (b,) the first special
        assert torch.equal(y[:, -1], x[torch.arange(len(x)), p + 1])
    assert dm.slice_names == ["T=16", "T=32"]  # the test sets stay fixed


def test_fresh_epochs_start_where_the_trainer_is():
    """With a trainer attached, an epoch starts at the batch the step count says: a run resumed
    in the middle of an epoch gets the rest of that epoch, batch for batch."""
    dm = _ih(random.randrange(2**20))
    dm.setup("fit")
    dm.trainer = SimpleNamespace(global_step=7, accumulate_grad_batches=1)  # 5 batches an epoch
    batches = _train_batches(dm)
    assert len(batches) == 3  # batches 7, 8, 9: the rest of the second epoch
    assert torch.equal(batches[0]["input_ids"], dm.fresh_batch(7)[0].long())
    dm.trainer = SimpleNamespace(global_step=2, accumulate_grad_batches=2)
    assert torch.equal(_train_batches(dm)[0]["input_ids"], dm.fresh_batch(4)[0].long())


# Lightning warns that a loader without state_dict cannot resume mid-epoch: this one can (the
# epoch starts at the trainer's step), which is what the test checks.
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fresh_data_resumes_with_the_same_batches_under_lightning(tmp_path):
    """A real Lightning run stopped mid-epoch and resumed from its checkpoint sees, step for
    step, the batches of an uninterrupted run (5 batches an epoch; stop after 3 of 8 steps)."""
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, i):
            self.seen.append((self.global_step, batch["input_ids"].clone()))
            return (self.w * batch["input_ids"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def trainer(steps, **kw):
        return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, **kw)

    seed = random.randrange(2**20)
    full = Recorder()
    trainer(8, enable_checkpointing=False).fit(full, datamodule=_ih(seed))
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    trainer(3, callbacks=[ckpt]).fit(Recorder(), datamodule=_ih(seed))
    (path,) = tmp_path.glob("*.ckpt")
    resumed = Recorder()
    trainer(8, enable_checkpointing=False).fit(resumed, datamodule=_ih(seed), ckpt_path=str(path))
    assert [s for s, _ in full.seen] == list(range(8))
    assert [s for s, _ in resumed.seen] == list(range(3, 8))
    for (_, a), (_, b) in zip(full.seen[3:], resumed.seen):
        assert torch.equal(a, b)


def test_fresh_data_must_be_a_bool():
    with pytest.raises(ConfigError, match="task.fresh_data"):
        _ih(0, fresh_data="yes")
