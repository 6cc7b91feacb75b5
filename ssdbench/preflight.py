"""Checks of `ssdbench run`'s overrides before anything heavy is imported.

Hydra reports a bad override with a multi-line message (or, for a wrong type, not at all: the
run starts and fails deep inside a constructor), and `ssdbench run` used to import Lightning and
the kernels (5-7 s) before it got that far. Here the overrides are checked against the composed
config with Hydra's compose API alone, in well under the 2 s a user should wait for a typo:

* a key the config does not have: one line naming the nearest keys it does have;
* a key the config does not list but the component's constructor takes (``task.seq_len`` of
  the MQAR data module): accepted, by rewriting the override to Hydra's ``+key=value``;
* ``+key=value`` at the top level, which nothing reads: one line;
* a value whose type differs from the config's (``optim.lr=abc``, ``seed=1.5``): one line;
* ``trainer.cuda_graph=true`` with a torch built without CUDA: the engine's one line, read from
  torch's version.py without importing it.

Only the component of a rewritten key is imported (to read its constructor's arguments).
"""
from __future__ import annotations

import difflib

from ssdbench.errors import ConfigError

GROUPS = ("model", "task", "trainer", "logger", "experiment", "heads", "hydra/launcher")
BUDGET_KEYS = ("budget", "budget_cut", "budget_over_paper")
FLAGS_WITHOUT_RUN = ("--help", "-h", "--hydra-help", "--info", "--shell-completion", "-sc")
# The graphed loop without graphs on a CPU, for the tests that compare it with Lightning's loop
# (read by ssdbench/engine.py; here so that this module need not import the engine)
CPU_LOOP_ENV = "SSDBENCH_ENGINE_ON_CPU"
NO_CUDA_GPU = "true needs a CUDA GPU and this machine has none (use auto or false)"


def _dotted_keys(node, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig

    out = []
    for k in node.keys():
        key = f"{prefix}{k}"
        out.append(key)
        v = node._get_node(k)
        if isinstance(v, DictConfig) and not v._is_missing() and not v._is_none():
            out += _dotted_keys(v, key + ".")
    return out


def _nearest(key: str, keys: list[str]) -> str:
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    if not close:  # the same last part elsewhere (seq_len -> task.seq_len)
        tail = key.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] == tail][:3]
    if close:
        return f" (nearest: {', '.join(close)})"
    parent = key.rpartition(".")[0]
    level = [k for k in keys if k.rpartition(".")[0] == parent]
    return f" (keys here: {', '.join(level)})" if level else ""


def _constructor_args(target: str) -> set[str] | None:
    """The keyword arguments of a config node's _target_, read from its module's source (no
    import: the task modules pull in Lightning, the models torch and Triton). None when they
    cannot be told this way (**kwargs, no __init__ of its own, not found): then anything goes,
    and the run's own check (train._check_fields) has the last word."""
    import ast
    import importlib.util

    module, _, name = target.rpartition(".")
    try:
        spec = importlib.util.find_spec(module)
        tree = ast.parse(open(spec.origin).read())
    except Exception:  # noqa: BLE001
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            init = next((f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None)
            if init is None or init.args.kwarg is not None:
                return None
            return {a.arg for a in init.args.args + init.args.kwonlyargs} - {"self"}
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return None if node.args.kwarg else {a.arg for a in node.args.args + node.args.kwonlyargs}
    return None


# keys whose consumer parses a string on its own: budget=1/8 (ssdbench/budget.py)
TAKES_STRINGS = {"budget"}


def _type_error(key: str, old, new) -> str | None:
    """Why ``new`` cannot replace the config's ``old`` value (None when it can)."""
    if old is None or new is None or isinstance(old, str) or key in TAKES_STRINGS:
        return None
    values = new if isinstance(new, list) and not isinstance(old, list) else [new]
    for v in values:
        if isinstance(old, bool):
            ok = isinstance(v, bool)
            want = "true or false"
        elif isinstance(old, int):
            ok = isinstance(v, int) and not isinstance(v, bool)
            want = "an integer"
        elif isinstance(old, float):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            want = "a number"
        else:
            return None
        if not ok and not (isinstance(v, str) and v.startswith("${")):
            return f"{key}: must be {want}, got {v!r}"
    return None


def check(argv: list[str]) -> list[str]:
    """The overrides of ``ssdbench run ARGV``, with constructor arguments that the config does
    not list rewritten to ``+key=value``; raises ConfigError (one line) for a bad override."""
    if any(a in FLAGS_WITHOUT_RUN for a in argv):
        return argv
    from hydra.core.override_parser.overrides_parser import OverridesParser

    items = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(items)
    except Exception:  # noqa: BLE001 - malformed syntax: Hydra's own message names the token
        return argv
    groups, values = [], []
    for text, o in zip(items, parsed):
        (groups if o.key_or_group.lstrip("+~") in GROUPS or "/" in o.key_or_group else values).append((text, o))

    def first(o) -> str:  # a sweep's first value stands for all (sweeps are checked per job)
        return next(iter(o.sweep_string_iterator())) if o.is_sweep_override() else o.get_value_element_as_str()

    base = _compose([o for _, o in groups], first)
    if base is None:  # a composition error is Hydra's to report, as before
        return argv
    from omegaconf import OmegaConf

    def select(key: str, default=None):
        """The raw value at a dotted key, interpolations unresolved (their resolvers are
        registered by the modules this check avoids importing); ``default`` when absent."""
        node = base
        for part in key.split("."):
            if not OmegaConf.is_dict(node) or part not in node.keys():
                return default
            node = node._get_node(part)
        return node if OmegaConf.is_config(node) else node._value()

    keys = [k for k in _dotted_keys(base) if not k.startswith("hydra")]
    rewritten: dict[str, str] = {}
    for text, o in values:
        bare = o.key_or_group.lstrip("+~")
        added = o.is_add() or o.is_force_add()
        if bare.startswith("hydra.") or o.is_delete():
            continue
        if select(bare, default="__absent__") != "__absent__":
            if not added:
                old = select(bare)
                new = [v for v in o.sweep_iterator()] if o.is_sweep_override() else [o.value()]
                for v in new:
                    err = _type_error(bare, old, v)
                    if err:
                        raise ConfigError(bare, err.split(": ", 1)[1])
            continue
        parent, _, leaf = bare.rpartition(".")
        node = select(parent) if parent else None
        target = node.get("_target_") if node is not None and OmegaConf.is_dict(node) else None
        args = _constructor_args(target) if target else None
        if target and (args is None or leaf in args):
            if not added:  # an argument of the component that its config does not list
                rewritten[text] = "+" + text
            continue
        if target:
            raise ConfigError(bare, f"is not an option of {target}{_nearest(bare, keys)}")
        raise ConfigError(bare, f"is not a config key{' (+ adds it, but nothing reads it)' if added else ''}"
                                f"{_nearest(bare, keys)}")
    argv = [rewritten.get(a, a) for a in argv]
    _check_cuda_graph(values)
    if any(o.key_or_group.lstrip("+~") in BUDGET_KEYS for _, o in values):
        _check_budget([a for a in argv if "=" in a and not a.startswith("-")], first)
    return argv


def parse_cuda_graph(value) -> str | bool:
    """trainer.cuda_graph as given on the command line or in YAML: auto, true or false."""
    if isinstance(value, str):
        value = {"true": True, "on": True, "false": False, "off": False, "auto": "auto"}.get(value.lower(), value)
    if value is True or value is False or value == "auto":
        return value
    raise ConfigError("trainer.cuda_graph", f"must be auto, true or false, got {value!r}")


def _check_cuda_graph(values) -> None:
    """trainer.cuda_graph=true (any value of a sweep) needs CUDA: the run's own check
    (engine.decide), here so that the error costs torch's import and not Lightning's as well."""
    import os

    for _, o in values:
        if o.key_or_group.lstrip("+~") != "trainer.cuda_graph":
            continue
        given = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        if any(parse_cuda_graph(v) is True for v in given) and os.environ.get(CPU_LOOP_ENV) != "1" \
                and _torch_is_cpu_build():
            raise ConfigError("trainer.cuda_graph", NO_CUDA_GPU)


def _torch_is_cpu_build() -> bool:
    """Whether the installed torch is built without CUDA or ROCm, read from its version.py
    (``cuda = None``, ``hip = None``) without importing it (1.5-2.5 s on a 2-core machine).
    A CUDA build on a machine without a GPU is left to the engine's check, after the imports."""
    import importlib.util
    import re
    from pathlib import Path

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    try:
        text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
    except OSError:
        return False
    values = dict(re.findall(r"^(cuda|hip)\b[^=\n]*=\s*(.+?)\s*$", text, re.M))
    return values.get("cuda") == "None" and values.get("hip") == "None"


def _check_budget(items: list[str], first) -> None:
    """budget / budget_cut / budget_over_paper checked on the config they compose (the run's own
    check, budget.check_budget), here so that a bad budget costs a second, not the imports."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ssdbench import budget

    cfg = _compose(OverridesParser.create().parse_overrides(items), first)
    if cfg is not None:  # else Hydra reports the composition error itself, as before
        budget.check_budget(cfg)


def _compose(overrides, first):
    """The config that ``overrides`` (parsed; a sweep by its first value) compose, or None where
    Hydra cannot compose it."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("ssdbench.conf", version_base="1.3"):
            return compose("config", overrides=[f"{o.key_or_group}={first(o)}" for o in overrides
                                                if not o.is_delete()])
    except Exception:  # noqa: BLE001 - a composition error is Hydra's to report
        return None
    finally:
        GlobalHydra.instance().clear()
