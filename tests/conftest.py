"""Test set-up shared by the whole suite.

Triton's interpreter must be chosen before any ``@triton.jit`` decorator runs, so it is set
here, before test modules import the kernels: on a machine without a GPU it is always on
(TRITON_INTERPRET=1, whatever the environment says). On a machine with a GPU the kernels compile
for real and the same tests run on the device. Tests marked ``triton`` (the kernel test modules)
fail when they launched no Triton kernel.
"""
import os
import random

# Under pytest-xdist the workers share the cores: each gets its share of threads for torch and
# BLAS, in its own process and in the CLI runs it starts (they inherit the environment). With
# every worker on all cores, OpenBLAS threads spun against each other on 2 cores and the
# scaling fits ran 10x slower than alone. Set before torch and numpy load their thread pools.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, _threads)

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Forced, not defaulted: with TRITON_INTERPRET=0 (or anything but 1) in the environment the
    # kernel modules take their PyTorch references on CPU tensors, and the kernel tests compared
    # the reference against itself and passed. Before any kernel module is imported: @triton.jit
    # reads it when it decorates.
    os.environ["TRITON_INTERPRET"] = "1"

# The device every kernel test runs on: the GPU when there is one, else the CPU interpreter.
DEVICE = "cuda" if HAS_CUDA else "cpu"
ON_GPU = DEVICE == "cuda"

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402  (after TRITON_INTERPRET)
from triton.runtime.jit import JITFunction  # noqa: E402

# Kernel launches in this process: every launch, through an autotuner or not, ends in the run of
# a JITFunction (compiled, on the GPU) or an InterpretedFunction (TRITON_INTERPRET=1); a warmup
# compiles without launching. Tests marked ``triton`` must raise it (see pytest_runtest_call).
TRITON_LAUNCHES = [0]


def _count_launches(cls) -> None:
    run = cls.run
    if getattr(run, "_counts_launches", False):
        return

    def counted(self, *args, **kwargs):
        if not kwargs.get("warmup", False):
            TRITON_LAUNCHES[0] += 1
        return run(self, *args, **kwargs)

    counted._counts_launches = True
    cls.run = counted


for _cls in (JITFunction, InterpretedFunction):
    _count_launches(_cls)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "triton: the test runs Triton kernels (GPU, or the CPU interpreter) and fails if "
                   "none launched; kernel test modules set it for all their tests")
    config.addinivalue_line(
        "markers", "no_triton: in a module marked triton, a test that launches no kernel by design "
                   "(the PyTorch reference, CPU dispatch, input checks)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A test marked ``triton`` (and not ``no_triton``) fails when it launched no Triton kernel:
    a kernel test that silently took the PyTorch reference would compare it with itself."""
    if item.get_closest_marker("triton") is None or item.get_closest_marker("no_triton") is not None:
        return (yield)
    before = TRITON_LAUNCHES[0]
    result = yield
    if TRITON_LAUNCHES[0] == before:
        pytest.fail(f"{item.nodeid} launched no Triton kernel (TRITON_INTERPRET="
                    f"{os.environ.get('TRITON_INTERPRET')!r}, CUDA {HAS_CUDA}): the kernel path did "
                    "not run; mark it no_triton if that is by design", pytrace=False)
    return result


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def random_seed():
    """A fresh seed per test, printed so a failure can be replayed (modules opt in with
    ``pytestmark = pytest.mark.usefixtures("random_seed")``)."""
    import random

    s = random.randrange(2**31)
    print(f"random seed {s}")
    torch.manual_seed(s)


def nan_allocator(monkeypatch, module, name: str) -> None:
    """Make ``module.torch.<name>`` (empty / empty_like) return NaN-filled floating tensors, so
    an output element a kernel leaves unwritten fails every comparison."""
    alloc = getattr(torch, name)

    def nan_alloc(*a, **k):
        t = alloc(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(module.torch, name, nan_alloc)


def poison_fixture(module, name: str = "empty"):
    """A ``poison`` fixture for a kernel module's tests: the outputs its launchers allocate with
    ``torch.<name>`` start as NaN (``nan_allocator``). Use: ``poison = poison_fixture(module)``."""

    @pytest.fixture
    def poison(monkeypatch):
        nan_allocator(monkeypatch, module, name)

    return poison


def random_seq_idx(batch: int, L: int, cuts: int = 3) -> torch.Tensor:
    """(batch, L) int32 on DEVICE: non-decreasing document ids with ``cuts`` random boundaries
    per row (repeated cuts merge, so a row may hold fewer documents)."""
    seq = torch.zeros(batch, L, dtype=torch.int32)
    for b in range(batch):
        for cut in torch.randint(1, max(L, 2), (cuts,)).tolist():
            seq[b, cut:] += 1
    return seq.to(DEVICE)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out - ref‖ / ‖ref‖ in float64; NaN anywhere fails any threshold."""
    out, ref = out.double(), ref.double()
    err = (out - ref).norm() / ref.norm().clamp_min(1e-30)
    return float(err) if torch.isfinite(out).all() else float("inf")


def decode_logits(model, x: torch.Tensor) -> torch.Tensor:
    """Logits from stepping a LanguageModel through x (batch, L) one token at a time,
    (batch, L, vocab): compared with the full forward by every recurrent model's tests."""
    with torch.no_grad():
        state = model.allocate_state(x.shape[0], device=x.device, dtype=model.embedding.weight.dtype)
        steps = []
        for t in range(x.shape[1]):
            logits, state = model.step(x[:, t], state)
            steps.append(logits)
    return torch.stack(steps, 1)


def check_mixer_steps(mixer, ref, d_model: int, batch: int = 2, steps: int = 4, prompt_len: int = 5) -> None:
    """A mixer on its Triton decode kernels against the same weights' PyTorch step in float64
    (``ref``, impl="torch", .double()): a prefill of a random prompt, then ``steps`` steps, each
    output within the limit. fp32 on the interpreter: the projections dominate (measured below
    4e-7); on a GPU the fp32 projections may run in TF32."""
    assert mixer._triton(torch.empty(1, device=DEVICE)) and not ref._triton(torch.empty(1, device=DEVICE))
    limit = 2e-6 if not ON_GPU else 2e-3
    prompt = torch.randn(batch, prompt_len, d_model, device=DEVICE)
    state = mixer.allocate_state(batch, device=DEVICE)
    state_ref = ref.allocate_state(batch, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        mixer.prefill(prompt, state)
        ref.prefill(prompt.double(), state_ref)
        for t in range(steps):
            u = torch.randn(batch, d_model, device=DEVICE)
            y, state = mixer.step(u, state)
            yr, state_ref = ref.step(u.double(), state_ref)
            err = rel_err(y, yr)
            assert err < limit, f"step {t}: relative error {err:.3g} (limit {limit:.3g})"


def fresh_seed():
    """A new seed for torch (weights, tokens) and for a random.Random of its own (sizes), returned
    so that every failure message can name it and the draw can be replayed."""
    seed = torch.seed() % (2**31)
    torch.manual_seed(seed)
    return seed, random.Random(seed)


def with_seed(seed):
    """A msg callable for torch.testing.assert_close that puts the seed in front."""
    return lambda msg: f"seed={seed}: {msg}"


def compose_config(*overrides: str):
    """The run config that `ssdbench run OVERRIDES` composes (ssdbench.conf), without running it."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("ssdbench.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))
