"""The ``budget`` knob: run a paper's synthetic protocol at a fraction of its training steps, and say so.

A protocol preset (``conf/experiment/mqar_fig8.yaml``, ``induction_heads.yaml``,
``selective_copying.yaml``, ``selective_copying_small.yaml``) has a top-level ``paper:`` block, the
budget the paper trained with (``steps``, ``batch_size``, ``seq_len``, ``tokens``, ``source``), and
a top-level ``budget``, the fraction of the paper's steps to run. Whatever scales with the run is
written with the resolvers below, so that one override moves all of it::

    trainer.max_steps: ${ssdbench.budget_steps:${paper.steps},${budget}}
    trainer.val_check_interval: ${ssdbench.every:${trainer.max_steps},8}    # 8 validations a run

    ssdbench run experiment=mqar_fig8 budget=1/8     # 1,024 of the paper's 8,192 steps at T=256

``budget_cut`` says what the fraction cuts: ``steps`` (the default: the paper's batch, a fraction
of its steps) or ``batch`` (all of the paper's steps, a fraction of its batch, so the same
tokens are spent on the paper's number of updates). Synthetic tasks like MQAR are learned by
leaving a plateau after a number of steps, so at a fraction below 1 ``budget_cut=batch`` is the
closer test (results/h100/fig8_t256_steps/README.md)::

    trainer.max_steps: ${ssdbench.cut_if:${paper.steps},${budget},${budget_cut},steps}
    task.batch_size: ${ssdbench.cut_if:${paper.batch_size},${budget},${budget_cut},batch}

``budget`` takes a number or a fraction written ``1/8``. It must lie in (0, 1]: more than the
paper trained is allowed only with ``budget_over_paper=true``, so that a typo (``budget=8``
for ``1/8``) cannot start a run eight times the paper's. The record keeps the fraction and the
paper's budget (:func:`record_fields`); ``ssdbench table`` and ``ssdbench plot-results`` show
them (:func:`add_table_columns`, :func:`figure_note`), so that no result hides that it ran at a
fraction of the paper.

The resolvers return None for input they cannot read (a budget of ``abc``) instead of raising:
an exception inside a resolver reaches the user as an OmegaConf traceback, whereas
:func:`check_budget`, which runs before anything is built, reports it as one line naming the key.
"""
from __future__ import annotations

import math
from fractions import Fraction

from omegaconf import DictConfig, OmegaConf

from ssdbench.errors import ConfigError

# The keys every paper block states (protocol presets may add their own, e.g. epochs).
PAPER_KEYS = ("source", "steps", "batch_size", "seq_len", "tokens")
PROTOCOL_PRESETS = "experiment=mqar_fig8, induction_heads, selective_copying or selective_copying_small"


# ----------------------------------------------------------------------------- the fraction

def parse_fraction(value) -> Fraction | None:
    """The budget as an exact fraction: 0.125, "0.125" and "1/8" all give 1/8; None when the
    value is not a finite number (booleans included: ``budget=true`` is a mistake, not 1)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        # str() first: Fraction(0.1) would be the binary double, not 1/10 ("inf", "nan" raise)
        return Fraction(str(value).strip())
    except (ValueError, ZeroDivisionError):
        return None


def budget_fraction(value) -> Fraction | None:
    """The fraction a config's ``budget`` stands for: null means the paper's whole budget."""
    return Fraction(1) if value is None else parse_fraction(value)


def label(frac: Fraction) -> str:
    """How tables and figures write a budget: 1/8, 1/100, 3/4 or 1 (one part, or halvings), else
    the decimal (3/10 reads better as 0.3)."""
    simple = frac.limit_denominator(1000)
    halvings = simple.denominator & (simple.denominator - 1) == 0
    if simple == frac and (simple.numerator == 1 or halvings):
        return str(simple)
    return f"{float(frac):.3g}"


# ----------------------------------------------------------------------------- resolvers

def _int(value) -> int | None:
    try:
        out = int(value)
    except (TypeError, ValueError):
        return None
    return out if out == value or isinstance(value, str) else None


def budget_steps(count, budget) -> int | None:
    """``${ssdbench.budget_steps:count,budget}``: a count of the paper's (steps, examples per
    curriculum stage) cut to the budget, at least 1."""
    n, frac = _int(count), budget_fraction(budget)
    if n is None or frac is None or frac <= 0:
        return None
    return max(1, round(n * frac))


CUTS = ("steps", "batch")  # what a budget below 1 cuts; the first is the default


def budget_cut(cfg: DictConfig) -> str:
    """The config's ``budget_cut`` (configs composed before the key existed: steps)."""
    return cfg.get("budget_cut", CUTS[0])


def cut_if(count, budget, cut, what) -> int | None:
    """``${ssdbench.cut_if:count,budget,budget_cut,what}``: ``count`` (the paper's steps, or its
    batch) cut to the budget when ``budget_cut`` is ``what``, else as it is: a fraction cuts the
    steps or the batch, never both. None for a ``budget_cut`` it cannot read (reported by
    :func:`check_budget`)."""
    n = _int(count)
    if n is None or cut not in CUTS or what not in CUTS:
        return None
    return budget_steps(n, budget) if cut == what else n


def every(steps, times) -> int | None:
    """``${ssdbench.every:max_steps,times}``: an interval that happens ``times`` times in a run
    of ``steps`` steps (validation), never longer than the run and at least one step."""
    n, k = _int(steps), _int(times)
    if n is None or k is None or n < 1 or k < 1:
        return None
    return max(1, n // k)


def mul(*values) -> int | None:
    """``${ssdbench.mul:a,b,...}``: the product of integers (a paper's steps x batch x length)."""
    ints = [_int(v) for v in values]
    return None if any(v is None for v in ints) else math.prod(ints)


def div(a, b) -> int | None:
    """``${ssdbench.div:a,b}``: a // b (e.g. 2^18 tokens a batch at length T: 2^18 // T sequences)."""
    a, b = _int(a), _int(b)
    return None if a is None or not b else a // b


RESOLVERS = {"ssdbench.budget_steps": budget_steps, "ssdbench.cut_if": cut_if, "ssdbench.every": every,
             "ssdbench.mul": mul, "ssdbench.div": div}


def register_resolvers() -> None:
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


# ----------------------------------------------------------------------------- checks

def check_budget(cfg: DictConfig) -> None:
    """ConfigError naming the key for a budget that is not a fraction in (0, 1] (above 1 only
    with budget_over_paper=true), a budget on a config that follows no paper, or a paper block
    that does not state its budget. Runs before anything is built or trained."""
    value, paper = cfg.get("budget"), cfg.get("paper")
    if value is not None and paper is None:
        raise ConfigError("budget", f"is the fraction of a paper's training steps; it applies to the "
                                    f"presets that follow a paper ({PROTOCOL_PRESETS}), and this config has "
                                    f"no paper block")
    if paper is None:
        if budget_cut(cfg) != CUTS[0]:
            raise ConfigError("budget_cut", f"says what a budget cuts of a paper's protocol ({PROTOCOL_PRESETS}), "
                                            f"and this config has no paper block")
        return
    frac = budget_fraction(value)
    if frac is None:
        raise ConfigError("budget", f"must be a fraction of the paper's training steps such as 0.125 or "
                                    f"1/8, got {value!r}")
    if frac <= 0:
        raise ConfigError("budget", f"must be in (0, 1] (a fraction of the paper's steps), got {value}")
    over = cfg.get("budget_over_paper", False)
    if not isinstance(over, bool):
        raise ConfigError("budget_over_paper", f"must be true or false, got {over!r}")
    if frac > 1 and not over:
        raise ConfigError("budget", f"{value} is more than the paper's budget (1 = the paper's "
                                    f"{paper.get('steps')} steps); add budget_over_paper=true to train longer "
                                    f"than the paper did")
    _check_paper(paper)
    cut = budget_cut(cfg)
    if cut not in CUTS:
        raise ConfigError("budget_cut", f"must be steps (the paper's batch, a fraction of its steps) or "
                                        f"batch (all of its steps, a fraction of its batch), got {cut!r}")
    sequences = frac * paper.batch_size
    if cut == "batch" and (sequences.denominator != 1 or sequences < 1):
        raise ConfigError("budget", f"with budget_cut=batch, {label(frac)} of the paper's batch of "
                                    f"{paper.batch_size} sequences is not a whole number of sequences; "
                                    f"pick a fraction that divides it (e.g. 1/{paper.batch_size})")


def _check_paper(paper: DictConfig) -> None:
    for key in PAPER_KEYS:
        v = paper.get(key)
        if key == "source":
            if not (isinstance(v, str) and v.strip()):
                raise ConfigError("paper.source", "must name the paper and section the protocol follows")
        elif not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            raise ConfigError(f"paper.{key}", f"must be a positive integer, got {v!r}")


# ----------------------------------------------------------------------------- the record

def record_fields(cfg: DictConfig, tokens_seen: int | None = None) -> dict | None:
    """The record's ``budget`` block, None for a config that follows no paper.

    fraction / label: the knob; cut: what it cut (steps or batch); steps: the steps this run was set to train (trainer.max_steps,
    which an explicit override may have moved off the knob), steps_fraction: those steps over the
    paper's; paper: the paper's block, resolved. With ``tokens_seen``, tokens_fraction: the tokens
    trained over the paper's (``ssdbench table`` computes it from the record's tokens_seen).
    """
    paper = cfg.get("paper")
    if paper is None:
        return None
    frac = budget_fraction(cfg.get("budget")) or Fraction(1)
    block = OmegaConf.to_container(paper, resolve=True)
    steps = int(cfg.trainer.max_steps)
    out = {"fraction": float(frac), "label": label(frac), "over_paper": frac > 1,
           "cut": budget_cut(cfg), "steps": steps,
           "steps_fraction": steps / block["steps"], "paper": block}
    if tokens_seen is not None:
        out["tokens_fraction"] = tokens_seen / block["tokens"]
    return out


# ----------------------------------------------------------------------------- tables, figures

def _tokens_of_paper(df):
    """tokens_seen / the paper's tokens per record (NaN where either is missing)."""
    import pandas as pd

    if "tokens_seen" not in df.columns or "budget.paper.tokens" not in df.columns:
        return pd.Series(float("nan"), index=df.index)
    return pd.to_numeric(df["tokens_seen"], errors="coerce") / pd.to_numeric(df["budget.paper.tokens"], errors="coerce")


def add_table_columns(df):
    """Records as a table (pandas, flattened): a ``budget`` column (the steps run as a fraction
    of the paper's, e.g. "1/8 of 8,192 steps") and ``tokens_of_paper`` (tokens trained over
    the paper's), or neither when no record follows a paper."""
    if "budget.steps_fraction" not in df.columns:
        return df.drop(columns=["budget"], errors="ignore")  # all null: records outside a protocol
    import pandas as pd  # here, not at the top: training imports this module, tables need pandas

    df = df.copy()
    frac = pd.to_numeric(df["budget.steps_fraction"], errors="coerce")
    steps = pd.to_numeric(df["budget.paper.steps"], errors="coerce")
    df["budget"] = [f"{label(Fraction(f).limit_denominator(100000))} of {int(s):,} steps"
                    if pd.notna(f) and pd.notna(s) else "-" for f, s in zip(frac, steps)]
    if "tokens_seen" in df.columns:
        df["tokens_of_paper"] = _tokens_of_paper(df)
    return df


def run_labels(df):
    """Each run's budget as a figure legend writes it: the fraction of the paper's steps, and
    its fraction of the paper's tokens where that differs ("1 of steps, 1/8 of tokens" for all
    of Figure 8's steps at 1/8 of its batch, whether that batch was set by ``budget_cut=batch``
    or by hand). None outside a paper's protocol."""
    import pandas as pd

    if "budget.steps_fraction" not in df.columns:
        return pd.Series([None] * len(df), index=df.index, dtype=object)
    frac = pd.to_numeric(df["budget.steps_fraction"], errors="coerce")
    tok = _tokens_of_paper(df)
    out = []
    for f, t in zip(frac, tok):
        if pd.isna(f):
            out.append(None)
            continue
        f = Fraction(f).limit_denominator(100000)
        t = Fraction(t).limit_denominator(1000) if pd.notna(t) and t > 0 else None
        out.append(label(f) if t is None or t == f else f"{label(f)} of steps, {label(t)} of tokens")
    return pd.Series(out, index=df.index, dtype=object)


def figure_note(df) -> str | None:
    """One line for a figure's title saying which fraction of whose budget its runs had, e.g.
    "1/8 of the paper's training steps (Mamba-2 (Dao & Gu 2024), Figure 8, Appendix D.1)";
    None when no run follows a paper."""
    if "budget.steps_fraction" not in df.columns:
        return None
    import pandas as pd

    frac = pd.to_numeric(df["budget.steps_fraction"], errors="coerce")
    fracs = sorted({Fraction(f).limit_denominator(100000) for f in frac.dropna()})
    if not fracs:
        return None
    # tokens over the paper's: differs from the steps' fraction when the batch was changed
    # (Figure 8 with all 8,192 steps at batch 128 is 1/8 of the paper's tokens)
    tfracs = sorted({Fraction(t).limit_denominator(1000) for t in _tokens_of_paper(df).dropna() if t > 0})
    if fracs == [1] and tfracs in ([], [1]):
        note = "the paper's full training budget"
    else:
        steps = "all" if fracs == [1] else ", ".join(label(f) for f in fracs)
        note = f"{steps} of the paper's training steps"
        if tfracs and tfracs != fracs:
            note += f", {', '.join(label(t) for t in tfracs)} of its tokens"
    sources = sorted({str(s) for s in df["budget.paper.source"].dropna()}) \
        if "budget.paper.source" in df.columns else []
    if sources:
        note += f" ({'; '.join(sources)})"
    outside = int(frac.isna().sum())
    if outside:
        note += f"; {outside} run(s) outside a paper protocol"
    return note
