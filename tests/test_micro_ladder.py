"""The micro ladder's size table (conf/experiment/micro_ladder.yaml): every rung builds for every
architecture, its non-embedding parameter count doubles from rung to rung (so that the diagonals
of the sweep share a 6ND budget, which fit-scaling's IsoFLOP grouping relies on), and the
architectures stay close at each rung."""
import pytest
from conftest import compose_config
from hydra.utils import instantiate

import ssdbench.train  # noqa: F401  (registers the config resolvers)

ARCHS = ("transformerpp", "mamba2", "mamba1", "based")
SMALL = ("250k", "500k", "1m", "2m", "3m", "6m")  # the larger rungs cost seconds each to build on a CPU


def _non_embedding(arch: str, size: str) -> int:
    cfg = compose_config(f"experiment=micro_ladder_{arch}", f"ladder.size={size}")
    return instantiate(cfg.model).num_params(non_embedding=True)


@pytest.fixture(scope="module")
def counts():
    return {(a, s): _non_embedding(a, s) for a in ARCHS for s in SMALL}


def test_every_rung_is_in_the_table():
    cfg = compose_config("experiment=micro_ladder_transformerpp")
    assert list(cfg.ladder.sizes)[: len(SMALL)] == list(SMALL)


@pytest.mark.parametrize("arch", ARCHS)
def test_rungs_roughly_double(counts, arch):
    for small, large in zip(SMALL, SMALL[1:]):
        ratio = counts[arch, large] / counts[arch, small]
        assert 1.6 < ratio < 2.5, (arch, small, large, ratio)


@pytest.mark.parametrize("size", SMALL)
def test_architectures_close_at_each_rung(counts, size):
    ref = counts["transformerpp", size]
    for arch in ARCHS:
        assert 0.7 < counts[arch, size] / ref < 1.35, (arch, size, counts[arch, size], ref)


def test_unknown_size_is_one_config_error_naming_ladder_size():
    """A size not in the table fails before anything is built (it used to end in Hydra's
    interpolation traceback from the model's constructor)."""
    from ssdbench.errors import ConfigError
    from ssdbench.train import _check_run_options

    _check_run_options(compose_config("experiment=micro_ladder_mamba2", "ladder.size=250k"))
    with pytest.raises(ConfigError, match=r"ladder\.size.*'300k'.*250k, 500k, 1m"):
        _check_run_options(compose_config("experiment=micro_ladder_mamba2", "ladder.size=300k"))
