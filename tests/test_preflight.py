"""`ssdbench run`'s overrides checked before the heavy imports (ssdbench/preflight.py): one
line and exit code 2 for a key nothing reads or a value of the wrong type, in about half a
second; constructor arguments that the config does not list are settable without `+`."""
import subprocess
import sys
import time

import pytest
from test_cli import _env

from ssdbench import preflight
from ssdbench.errors import ConfigError


@pytest.mark.parametrize("args, needle", [
    (["optim.lr=abc"], "optim.lr: must be a number, got 'abc'"),
    (["seed=abc"], "seed: must be an integer, got 'abc'"),
    (["seed=1.5"], "seed: must be an integer, got 1.5"),
    (["compile=3"], "compile: must be true or false, got 3"),
    (["-m", "optim.lr=1e-3,abc"], "optim.lr: must be a number, got 'abc'"),
    (["nonexistent_key=1"], "nonexistent_key: is not a config key (keys here: study, results_dir, seed"),
    (["+typo_key=1"], "typo_key: is not a config key (+ adds it, but nothing reads it)"),
    (["optim.lrr=1e-3"], "optim.lrr: is not a config key (nearest: optim.lr"),
    (["model.d_modle=64"], "model.d_modle: is not an option of ssdbench.models.mamba2.Mamba2 (nearest: model.d_model"),
    (["model=transformerpp", "+model.d_state=16"], "model.d_state: is not an option of "
                                                   "ssdbench.models.transformerpp.TransformerPP"),
    # the budget keys, checked on the composed config (budget.check_budget) before the imports
    (["budget=1/8"], "budget: is the fraction of a paper's training steps"),
    (["experiment=mqar_fig8", "budget=2"], "budget: 2 is more than the paper's budget"),
    (["experiment=mqar_fig8", "budget=0"], "budget: must be in (0, 1]"),
    (["experiment=mqar_fig8", "budget=1/8", "budget_cut=foo"], "budget_cut: must be steps"),
    (["-m", "experiment=mqar_fig8", "budget=1/3,1/8", "budget_cut=batch"], "budget: with budget_cut=batch, 1/3"),
])
def test_bad_override_is_a_config_error(args, needle):
    with pytest.raises(ConfigError) as e:
        preflight.check(args)
    assert needle in str(e.value), str(e.value)


@pytest.mark.parametrize("args, expected", [
    (["task.seq_len=7"], ["+task.seq_len=7"]),  # an MQARDataModule argument its config does not list
    (["model=based", "model.feature_dim=8"], ["model=based", "model.feature_dim=8"]),  # listed
    (["-m", "task.seq_len=64,128", "seed=1,2"], ["-m", "+task.seq_len=64,128", "seed=1,2"]),
    (["optim.lr=1e-3", "seed=3", "compile=true", "trainer.cuda_graph=false"],
     ["optim.lr=1e-3", "seed=3", "compile=true", "trainer.cuda_graph=false"]),
    (["experiment=mqar_fig8", "budget=1/8"], ["experiment=mqar_fig8", "budget=1/8"]),
    (["experiment=mqar_fig8", "budget=1/8", "budget_cut=batch"], ["experiment=mqar_fig8", "budget=1/8", "budget_cut=batch"]),
    (["experiment=mqar_fig8", "budget=2", "budget_over_paper=true"],
     ["experiment=mqar_fig8", "budget=2", "budget_over_paper=true"]),
    (["optim.lr=1"], ["optim.lr=1"]),  # an integer is a number
    # a key whose value is an interpolation of a resolver this check does not load is present
    (["trainer=ddp", "trainer.precision=32-true"], ["trainer=ddp", "trainer.precision=32-true"]),
    (["--help"], ["--help"]),
])
def test_good_overrides_pass_and_listed_arguments_need_no_plus(args, expected):
    assert preflight.check(args) == expected


def test_bad_override_from_the_command_line_is_one_line_exit_2_and_fast(tmp_path):
    """Through the CLI: one line, exit 2, nothing written, before Lightning and the kernels are
    imported (0.4-0.7 s on an idle 2-core machine; the limit leaves room for a loaded one)."""
    cases = [["optim.lr=abc"], ["seed=abc"], ["nonexistent_key=1"], ["+typo_key=1"], ["task.nope=1"],
             ["experiment=mqar_fig8", "budget=2"]]
    if preflight._torch_is_cpu_build():  # (the CPU machines of CI; the engine's own check elsewhere)
        cases.append(["trainer.cuda_graph=true"])
    for args in cases:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "ssdbench.cli", "run", *args, f"results_dir={tmp_path}"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120, env=_env())
        took = time.perf_counter() - t0
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(err) == 1 and err[0].startswith("ssdbench run: invalid config: "), p.stderr
        assert "Traceback" not in p.stderr and not any(tmp_path.iterdir())
        assert took < 4.0, f"{args}: {took:.1f} s"


@pytest.mark.parametrize("cuda,hip,cpu", [("None", "None", True), ("'13.0'", "None", False), ("None", "'6.2'", False)])
def test_torch_build_read_without_importing_it(tmp_path, monkeypatch, cuda, hip, cpu):
    """trainer.cuda_graph=true is refused before the imports only for a torch built without CUDA
    and ROCm, as its version.py says (the typed form torch writes, ``cuda: Optional[str] = ...``)."""
    import importlib.machinery
    import importlib.util

    pkg = tmp_path / "torch"
    pkg.mkdir()
    (pkg / "version.py").write_text(f"__version__ = 'x'\ncuda: Optional[str] = {cuda}\nhip: Optional[str] = {hip}\n")
    spec = importlib.machinery.ModuleSpec("torch", None, is_package=True)
    spec.submodule_search_locations = [str(pkg)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    assert preflight._torch_is_cpu_build() is cpu
