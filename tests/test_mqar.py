"""Properties of the MQAR generator and datamodule (random seeds: any seed must satisfy them)."""
import random

import pytest
import torch

from ssdbench.errors import ConfigError
from ssdbench.tasks.mqar import IGNORE, MQARDataModule, mqar_examples


def _params():
    seed = random.randrange(2**31)
    T = random.choice([32, 64, 128])
    K = random.choice([1, 2, T // 8, T // 4])
    V = random.choice([T + 1, 2 * T, 512])
    return seed, T, K, V


@pytest.mark.parametrize("random_non_queries", [False, True])
@pytest.mark.parametrize("trial", range(4))
def test_generator_properties(random_non_queries, trial):
    seed, T, K, V = _params()
    n = 64
    x, y = mqar_examples(n, T, K, V, power_a=0.01, random_non_queries=random_non_queries, seed=seed)
    msg = f"seed={seed} T={T} K={K} V={V}"
    assert x.shape == y.shape == (n, T) and x.dtype == y.dtype == torch.int64, msg
    assert int(x.min()) >= 0 and int(x.max()) < V, msg
    keys, values = x[:, 0:2 * K:2], x[:, 1:2 * K:2]  # (n, K) each
    # keys from [1, V/2), values from [V/2, V), both distinct within an example
    assert ((keys >= 1) & (keys < V // 2)).all(), msg
    assert ((values >= V // 2) & (values < V)).all(), msg
    for row in range(n):
        assert len(set(keys[row].tolist())) == K and len(set(values[row].tolist())) == K, msg
    # exactly one supervised position per pair, never inside the context
    sup = y != IGNORE
    assert (sup.sum(1) == K).all(), msg
    assert not sup[:, : 2 * K].any(), msg
    for row in range(n):
        binding = dict(zip(keys[row].tolist(), values[row].tolist()))
        pos = sup[row].nonzero().flatten().tolist()
        queried = [int(x[row, p]) for p in pos]
        # the token at a supervised position is a key, and its label is the value bound to it
        assert sorted(queried) == sorted(binding), msg
        for p in pos:
            assert int(y[row, p]) == binding[int(x[row, p])], msg


def test_deterministic_per_seed_and_seed_sensitive():
    seed = random.randrange(2**31)
    a = mqar_examples(32, 64, 8, 256, seed=seed)
    b = mqar_examples(32, 64, 8, 256, seed=seed)
    c = mqar_examples(32, 64, 8, 256, seed=seed + 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_power_law_gaps_favour_short_distances():
    x, y = mqar_examples(2000, 256, 16, 1024, power_a=0.01, random_non_queries=False,
                         seed=random.randrange(2**31))
    pos = (y != IGNORE).nonzero()[:, 1].numpy() - 2 * 16  # offset after the context
    first_half = (pos < (256 - 32) / 2).mean()
    assert first_half > 0.6  # a power law with a=0.01 concentrates queries early


def test_datamodule_slices_and_disjoint_train_test():
    seed = random.randrange(2**20)
    dm = MQARDataModule(vocab_size=256, batch_size=16, seed=seed,
                        train_segments=[{"input_seq_len": 32, "num_kv_pairs": 4, "num_examples": 200},
                                        {"input_seq_len": 64, "num_kv_pairs": 8, "num_examples": 100}],
                        test_segments=[{"input_seq_len": 32, "num_kv_pairs": 4, "num_examples": 50},
                                       {"input_seq_len": 64, "num_kv_pairs": 8, "num_examples": 40}])
    dm.setup("fit")
    assert dm.slice_names == ["T=32,kv=4", "T=64,kv=8"]
    train_rows = {tuple(r) for s in dm.train_set.segments for r in s.inputs.tolist()}
    test_rows = {tuple(r) for s in dm.test_set.segments for r in s.inputs.tolist()}
    assert not train_rows & test_rows
    n_test = 0
    for batch in dm.val_dataloader():
        assert len(set(batch["slice"].tolist())) == 1  # batches never mix segments
        L = batch["input_ids"].shape[1]
        assert L == (32 if batch["slice"][0] == 0 else 64)
        n_test += len(batch["input_ids"])
    assert n_test == 90
    seen = sum(len(b["input_ids"]) for b in dm.train_dataloader())
    assert seen == 300


@pytest.mark.parametrize("T,K,V,field", [
    (64, 17, 256, "num_kv_pairs"),  # 4 * pairs > length: the queries do not fit
    (64, 8, 64, "vocab_size"),      # vocabulary not larger than the sequence
])
def test_bad_shapes_name_the_field(T, K, V, field):
    with pytest.raises(ConfigError, match=field):
        mqar_examples(4, T, K, V)
    with pytest.raises(ConfigError, match=field):
        MQARDataModule(vocab_size=V, train_segments=[{"input_seq_len": T, "num_kv_pairs": K, "num_examples": 4}],
                       test_segments=[{"input_seq_len": 32, "num_kv_pairs": 2, "num_examples": 4}])


def test_missing_segment_fields():
    with pytest.raises(ConfigError, match=r"task.train_segments\[0\]"):
        MQARDataModule(vocab_size=256, train_segments=[{"input_seq_len": 64}], test_segments=[])


def test_curriculum_trains_segments_in_order_and_fractions_follow_seq_len():
    """Figure 8's curriculum: pair counts T/32 .. T/4 from kv_fraction, easiest segment first,
    examples still shuffled within a segment; task.seq_len sets every segment's length."""
    fracs = [1 / 32, 1 / 16, 1 / 8, 1 / 4]
    seed = random.randrange(2**20)
    dm = MQARDataModule(vocab_size=512, batch_size=8, seed=seed, seq_len=128, curriculum=True,
                        train_segments=[{"kv_fraction": f, "num_examples": 24} for f in fracs],
                        test_segments=[{"kv_fraction": 0.25, "num_examples": 8}])
    dm.setup("fit")
    assert [s.name for s in dm.train_set.segments] == ["T=128,kv=4", "T=128,kv=8", "T=128,kv=16", "T=128,kv=32"]
    assert dm.slice_names == ["T=128,kv=32"]
    for epoch in range(2):  # the same order every epoch
        order = [int(b["slice"][0]) for b in dm.train_dataloader()]
        assert order == sorted(order) and len(order) == 12
    first = next(iter(dm.train_dataloader()))["input_ids"]
    assert not torch.equal(first, dm.train_set.segments[0].inputs[:8])  # shuffled within the segment
    # without the curriculum the segments interleave (12 batches: in order by chance ~ 1/369600)
    dm2 = MQARDataModule(vocab_size=512, batch_size=8, seed=seed, seq_len=128,
                         train_segments=[{"kv_fraction": f, "num_examples": 24} for f in fracs],
                         test_segments=[{"kv_fraction": 0.25, "num_examples": 8}])
    dm2.setup("fit")
    order = [int(b["slice"][0]) for b in dm2.train_dataloader()]
    assert order != sorted(order)


@pytest.mark.parametrize("seg,field", [({"kv_fraction": 0.5, "num_examples": 4}, "kv_fraction"),
                                       ({"num_kv_pairs": 4, "num_examples": 4}, r"train_segments\[0\]")])
def test_fraction_and_length_errors(seg, field):
    # a fraction above 1/4 cannot fit its queries; a segment without a length needs task.seq_len
    with pytest.raises(ConfigError, match=field):
        MQARDataModule(vocab_size=512, seq_len=64 if "kv_fraction" in seg else None,
                       train_segments=[seg], test_segments=[{"input_seq_len": 32, "num_kv_pairs": 2, "num_examples": 4}])
