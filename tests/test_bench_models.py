"""The benchmarks' FLOP and byte models (the numerators of every TFLOP/s and GB/s figure),
counted by hand on tiny cases. Only the counting functions are imported: no GPU needed.

Conventions the models use (and the hand counts below follow): a multiply-add is 2 FLOPs; a
causal Q x Q product within a chunk counts half the square (Q^2 / 2 pairs x 2 FLOPs = Q^2 per
contracted element); a sliding window counts min(W, L) keys for every query.
"""
import pytest

from ssdbench.bench_based import based_bytes, based_flops
from ssdbench.bench_scan import SCAN_FLOPS_PER_STATE, _scan_bytes
from ssdbench.bench_ssd import _ssd_bytes, _ssd_flops
from ssdbench.bench_window import window_flops


def test_ssd_flops_hand_count():
    # batch 2, L 5, H 3 heads, P 2, N 4, G 1 group, chunk Q 4 -> ceil(5/4) = 2 chunks a row, 4 chunks.
    # per chunk:  C B^T, causal half, once per group:   1 * (4*4/2 pairs * 2) * N 4 = 1 * 16 * 4 =  64
    #             masked scores @ x, causal half, per head: 3 * 16 * P 2             =  96
    #             chunk states B^T x (2 Q P N) + state output C S (2 Q P N), per head:
    #                                                   3 * (2*4*2*4 + 2*4*2*4) = 3 * 128 = 384
    #             = 544;  4 chunks -> 2176
    assert _ssd_flops(2, 5, 3, 2, 4, 1, 4) == 4 * (64 + 96 + 384) == 2176
    # a length that is a multiple of the chunk: batch 1, L 8, H 1, P 1, N 1, G 1, Q 4 -> 2 chunks
    # of 16 * 1 + 16 * 1 + 4*4*1*1 = 48 -> 96
    assert _ssd_flops(1, 8, 1, 1, 1, 1, 4) == 96
    # G = H = 2 groups: C B^T twice. batch 1, L 2, H 2, P 1, N 1, Q 2 -> 1 chunk:
    # 2 * (2*2) * 1 + 2 * 4 * 1 + 4 * 2 * 2 * 1 * 1 = 8 + 8 + 16 = 32
    assert _ssd_flops(1, 2, 2, 1, 1, 2, 2) == 32


def test_ssd_bytes_hand_count():
    # batch 2, L 3 -> 6 tokens; H 2, P 4, N 5, G 1; 2-byte elements.
    # forward, per token: x 8 + y 8 (H P each) + B 5 + C 5 (G N each) + dt 2 (H) = 28 elements
    #   -> 28 * 2 B * 6 tokens = 336
    assert _ssd_bytes(2, 3, 2, 4, 5, 1, 2, False) == 336
    # backward adds, per token: dy, x again, dx (3 H P = 24) + dB, dC (2 G N = 10) + ddt (H = 2)
    #   = 36 elements -> 36 * 2 * 6 = 432; forward + backward = 768
    assert _ssd_bytes(2, 3, 2, 4, 5, 1, 2, True) == 336 + 432 == 768
    # fp32 (4-byte) elements double it
    assert _ssd_bytes(2, 3, 2, 4, 5, 1, 4, True) == 2 * 768


def test_scan_flops_per_state_hand_count():
    # per channel d and state n, each step: dA = exp(delta * A)  (1 mul + 1 exp)
    # dBu = (delta u) * B (delta u is per channel, shared over n: 1 mul per state)
    # h = dA * h + dBu  (1 mul + 1 add);  y += C * h  (1 mul + 1 add)
    assert SCAN_FLOPS_PER_STATE == (1 + 1) + 1 + 2 + 2 == 7


def test_scan_bytes_hand_count():
    # forward: batch 1, dim 2, L 3 -> 3 tokens, N 4, 2-byte elements.
    # per token: u, delta, z, y (4 * dim = 8) + B, C (2 N = 8) = 16 elements -> 32 B; 3 tokens: 96
    assert _scan_bytes(1, 2, 3, 4, 2, False) == 96
    # forward + backward: L 128 -> 128 tokens, block states every 64 steps: 2 blocks.
    # forward: 128 * 32 = 4096
    # states: batch 1 * dim 2 * N 4 * 2 blocks * 4 B (fp32) * 2 (written, read) = 128
    # backward per token: u, delta, z, dy read + du, ddelta, dz written = 7 * dim 2 * 2 B = 28;
    #   B, C read (2 B each) + dB, dC fp32 atomics (8 B each): 2 N 4 * (2 + 8) = 80 -> 108 a token
    #   -> 128 * 108 = 13824
    assert _scan_bytes(1, 2, 128, 4, 2, True) == 4096 + 128 + 13824 == 18048
    # L 63 < 64: no block state saved
    assert _scan_bytes(1, 2, 63, 4, 2, True) == 63 * 32 + 63 * 108


def test_based_flops_hand_count():
    # batch 2, L 3, H 2, feature dim F 2, P 3, chunk Q 2 -> 2 chunks a row, 4 chunks.
    # Taylor feature map size D = 1 + F + F^2 = 1 + 2 + 4 = 7.
    # per chunk and head:  q k^T, causal half:     (2*2/2 pairs * 2) * F 2 = 4 * 2 =   8
    #                      scores @ v, causal half:                  4 * P 3 =      12
    #                      chunk state phi(k)^T v (2 Q D P) + readout phi(q) S (2 Q D P):
    #                                                  4 * 2 * 7 * 3 =             168
    #                      normaliser: sum phi(k) (2 Q D) + phi(q) . z (2 Q D): 4*2*7 = 56
    #                      = 244;  4 chunks * 2 heads -> 1952
    assert based_flops(2, 3, 2, 2, 3, 2) == 4 * 2 * (8 + 12 + 168 + 56) == 1952


def test_based_bytes_hand_count():
    # batch 1, L 2, H 2 -> 4 (token, head) rows; F 3, P 4; 2-byte elements.
    # forward a row: q, k (F each: 6) + v, y (P each: 8) = 14 elements * 2 B = 28, + fp32 den 4 = 32
    #   -> 4 * 32 = 128
    assert based_bytes(1, 2, 2, 3, 4, 2, False) == 128
    # backward a row, with 2 blocks over P: q, k (6) + v, dy, dv (12) = 18 elements * 2 B = 36;
    #   den, delta fp32 8; dq, dk fp32 partials, one per v block: 2 * F 3 * 4 B * 2 blocks = 48
    #   -> 92 a row, 4 * 92 = 368; forward + backward 128 + 368 = 496
    assert based_bytes(1, 2, 2, 3, 4, 2, True, n_vblocks=2) == 128 + 368 == 496
    # one v block: dq, dk partials 24 instead of 48 -> 4 * 68 = 272
    assert based_bytes(1, 2, 2, 3, 4, 2, True) == 128 + 272


def test_window_flops_hand_count():
    # batch 2, L 5, H 3, P 4, window W 2: every query scores W 2 keys (2 * W * P = 16) and sums
    # W 2 values (16): 32 FLOPs a (token, head); 2 * 5 tokens * 3 heads = 30 -> 960
    assert window_flops(2, 5, 3, 4, 2) == 30 * 32 == 960
    # window wider than the sequence: W 8, L 5 -> 5 keys a query: 4 * 5 * 4 = 80 a (token, head)
    assert window_flops(2, 5, 3, 4, 8) == 30 * 80 == 2400


@pytest.mark.parametrize("bad", ["abc", "0", "-2"])
def test_bench_scan_segments_must_be_auto_or_a_positive_count(bad, capsys):
    from ssdbench import bench_scan

    with pytest.raises(SystemExit) as e:
        bench_scan.main(["--op", "long", "--segments", "auto", bad])
    assert e.value.code == 2
    assert "--segments: expected auto or a positive integer" in capsys.readouterr().err
