"""Chinchilla-style scaling fits: `ssdbench fit-scaling SOURCE`.

SOURCE is a results directory (every ``record.json`` under it with status ``ok``) or a CSV
with columns ``params, tokens, loss`` (optional ``flops``, default ``6 * params * tokens``, and
``model``). Each model (``model_name`` of the records, the CSV's ``model`` column) is fitted
on its own, with the three approaches of Hoffmann et al. 2022 ("Chinchilla"):

1. **Envelope.** Group the runs into FLOP budgets, keep the lowest-loss run of each budget, and
   of those the lower envelope (a budget whose best loss is not below every smaller budget's
   is dropped); fit ``N_opt = k_N C^a`` and ``D_opt = k_D C^b`` by least squares in log-log.
2. **IsoFLOP profiles.** Per budget (>= 3 runs), a parabola of loss in ``log N`` (and one in
   ``log D``); its vertex is ``N_opt(C)`` (``D_opt(C)``); power laws across budgets (>= 2).
3. **Parametric.** ``L(N, D) = E + A / N^alpha + B / D^beta``, fitted as
   ``log L = LSE(a - alpha log N, b - beta log D, e)`` (A = e^a, B = e^b, E = e^e) by
   minimising the Huber loss (delta 1e-3) of the log-loss residuals with L-BFGS-B from the best
   points of a grid of starts; bootstrap intervals by resampling runs. Under ``C = 6 N D``
   the compute-optimal allocation is closed form::

       G = (alpha A / (beta B))^(1 / (alpha + beta))
       N_opt = G (C / 6)^(beta / (alpha + beta)),  D_opt = (C / 6) / N_opt

FLOP units: approaches 1 and 2 use the runs' FLOPs (``--flops exact``: the per-architecture
count in the record, ``train_flops``; ``--flops 6nd``: ``6 N D``); approach 3's budgets are
``6 N D`` by construction. The tables say which unit each row is in.

Worked example (Chinchilla's published constants, no data needed)::

    >>> fit = ParametricFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
    >>> n, d, loss = fit.optimal(5.76e23)      # Gopher's budget
    >>> f"{n:.3g} {d:.3g} {loss:.3f}"
    '3.22e+10 2.98e+12 1.931'

Degenerate inputs (too few runs, one model size, non-positive or missing values) raise
``ScalingDataError`` (a ``ConfigError``: one line naming the field), never a nonsense fit.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import optimize, stats
from scipy.special import huber, logsumexp

from ssdbench.errors import ConfigError

LOSS_KEY = "val/loss"  # what SequenceLM logs on the validation split (ssdbench/lit.py)
HUBER_DELTA = 1e-3
BUDGET_TOLERANCE = 0.1  # runs whose FLOPs agree within 10 % share an IsoFLOP budget
N_BOOTSTRAP = 200
# Chinchilla's grid of starting points (appendix D.2): alpha, beta, e, a, b.
START_GRID = {
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}
PARAMETRIC_MIN_POINTS = 5  # five constants


class ScalingDataError(ConfigError):
    """The points cannot support the requested fit (``field`` names the culprit column)."""


# ============================================================================= loading points

def points_from_records(df: pd.DataFrame, loss_key: str = LOSS_KEY, params: str = "non_embedding",
                        flops: str = "exact") -> pd.DataFrame:
    """Scaling points from flattened records (``ssdbench.table.load_records``).

    Columns of the result: ``run, model, params, tokens, flops, loss``. ``params`` picks
    ``params.non_embedding`` (default, Kaplan's choice and the N of ``train_flops_6nd``) or
    ``params.total``; ``flops`` picks ``train_flops`` (exact) or ``train_flops_6nd``.
    """
    if df.empty:
        raise ScalingDataError("source", "no records")
    loss_col = loss_key if loss_key.startswith("metrics.") else f"metrics.{loss_key}"
    need = {"params": f"params.{params}", "tokens": "tokens_seen", "loss": loss_col}
    for name, col in need.items():
        if col not in df.columns:
            hint = " (choose it with --loss-key)" if name == "loss" else ""
            raise ScalingDataError(name, f"the records have no field {col!r}{hint}")
    out = pd.DataFrame({
        "run": df["run"].astype(str) if "run" in df.columns else [str(i) for i in range(len(df))],
        "model": _model_names(df),
        "params": pd.to_numeric(df[need["params"]], errors="coerce"),
        "tokens": pd.to_numeric(df["tokens_seen"], errors="coerce"),
        "loss": pd.to_numeric(df[loss_col], errors="coerce"),
    })
    col = {"exact": "train_flops", "6nd": "train_flops_6nd"}[flops]
    if col in df.columns:
        out["flops"] = pd.to_numeric(df[col], errors="coerce").to_numpy()
        if flops == "6nd" and params != "non_embedding":  # the record's 6ND uses non-embedding N
            out["flops"] = 6.0 * out["params"] * out["tokens"]
    else:
        out["flops"] = 6.0 * out["params"] * out["tokens"]
    return check_points(out)


def _model_names(df: pd.DataFrame) -> pd.Series:
    for c in ("model_name", "arch"):
        if c in df.columns:
            return df[c].fillna("model").astype(str)
    return pd.Series(["model"] * len(df), index=df.index)


def points_from_csv(path: Path) -> pd.DataFrame:
    """Scaling points from a CSV with ``params, tokens, loss`` (+ optional ``flops``, ``model``)."""
    try:
        raw = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.EmptyDataError) as e:
        raise ScalingDataError("source", f"cannot read {path}: {e}") from None
    missing = [c for c in ("params", "tokens", "loss") if c not in raw.columns]
    if missing:
        raise ScalingDataError(missing[0], f"{path} has no column {missing[0]!r} "
                                           f"(columns: {', '.join(map(str, raw.columns))})")
    out = pd.DataFrame({"run": [f"row {i + 2}" for i in range(len(raw))],  # spreadsheet line numbers
                        "model": raw["model"].astype(str) if "model" in raw.columns else "model"})
    for c in ("params", "tokens", "loss"):
        out[c] = pd.to_numeric(raw[c], errors="coerce")
    out["flops"] = (pd.to_numeric(raw["flops"], errors="coerce") if "flops" in raw.columns
                    else 6.0 * out["params"] * out["tokens"])
    return check_points(out)


def load_points(source: Path, loss_key: str = LOSS_KEY, params: str = "non_embedding",
                flops: str = "exact", status: str | None = "ok") -> pd.DataFrame:
    """Points from a CSV file or a results directory (records with ``status``; None keeps all)."""
    source = Path(source)
    if source.is_file():
        return points_from_csv(source)
    if not source.is_dir():
        raise ScalingDataError("source", f"{source} is neither a CSV file nor a results directory")
    from ssdbench.table import load_records

    df = load_records(source)
    if df.empty:
        raise ScalingDataError("source", f"no record.json under {source}")
    if status and "status" in df.columns:
        df = df[df["status"] == status].reset_index(drop=True)
        if df.empty:
            raise ScalingDataError("source", f"no record with status {status!r} under {source}")
    return points_from_records(df, loss_key, params, flops)


def select_points(points: pd.DataFrame, where: str) -> pd.DataFrame:
    """The points matching a pandas expression (``DataFrame.eval``) over their columns; one
    that does not parse, names no column, is not a filter or keeps nothing is a ScalingDataError."""
    try:
        mask = points.eval(where)
    except Exception as e:  # pandas raises SyntaxError, UndefinedVariableError, ValueError, ...
        why = " ".join(str(e).split())  # one line
        raise ScalingDataError("--where", f"cannot apply {where!r}: {why} "
                                          f"(columns: {', '.join(points.columns)})") from None
    if not (isinstance(mask, pd.Series) and mask.dtype == bool):
        raise ScalingDataError("--where", f"{where!r} is not a filter of the points (not true or false per point)")
    keep = points[mask]
    if keep.empty:
        raise ScalingDataError("--where", f"{where!r} keeps none of the {len(points)} points")
    return keep.reset_index(drop=True)


def check_points(points: pd.DataFrame) -> pd.DataFrame:
    """Every value present, finite and positive; else ScalingDataError naming the first bad run."""
    if points.empty:
        raise ScalingDataError("source", "no points")
    for c in ("params", "tokens", "flops", "loss"):
        v = points[c].to_numpy(dtype=float)
        bad = ~np.isfinite(v) | (v <= 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            what = "missing or not a number" if not np.isfinite(v[i]) else f"not positive ({v[i]:g})"
            raise ScalingDataError(c, f"{int(bad.sum())} point(s) with a value that is {what}, "
                                      f"first: {points['run'].iloc[i]}")
    return points.reset_index(drop=True)


def _require_sizes(points: pd.DataFrame, what: str, min_points: int = 2) -> None:
    if len(points) < min_points:
        raise ScalingDataError("points", f"{what} needs at least {min_points} runs, got {len(points)}")
    if points["params"].nunique() < 2:
        raise ScalingDataError("params", f"{what} needs at least 2 model sizes, "
                                         f"all runs have {points['params'].iloc[0]:g} parameters")


# ============================================================================= budgets

def group_budgets(flops, tolerance: float = BUDGET_TOLERANCE) -> np.ndarray:
    """Budget ids: runs sorted by FLOPs join the current budget while within ``1 + tolerance``
    of its smallest member, so ``[1e18, 1.05e18, 3e18]`` -> ``[0, 0, 1]`` with tolerance 0.1.

    >>> group_budgets([1e18, 3e18, 1.05e18]).tolist()
    [0, 1, 0]
    """
    c = np.asarray(flops, dtype=float)
    order = np.argsort(c, kind="stable")
    ids = np.empty(len(c), dtype=int)
    gid, start = -1, None
    for i in order:
        if start is None or c[i] > start * (1 + tolerance):
            gid, start = gid + 1, c[i]
        ids[i] = gid
    return ids


# ============================================================================= power laws

@dataclass
class PowerLaw:
    """``y = k x^exponent``, fitted by least squares of log10 y on log10 x, with 95 % intervals
    (t distribution; none with only two points)."""

    k: float
    exponent: float
    exponent_ci: tuple[float, float]
    k_ci: tuple[float, float]
    n: int

    @classmethod
    def fit(cls, x, y) -> PowerLaw:
        lx, ly = np.log10(np.asarray(x, float)), np.log10(np.asarray(y, float))
        if len(lx) < 2 or np.ptp(lx) == 0:
            raise ScalingDataError("flops", "a power law needs at least 2 distinct FLOP budgets")
        res = stats.linregress(lx, ly)
        if len(lx) > 2:
            t = stats.t.ppf(0.975, len(lx) - 2)
            e_ci = (res.slope - t * res.stderr, res.slope + t * res.stderr)
            k_ci = (10 ** (res.intercept - t * res.intercept_stderr), 10 ** (res.intercept + t * res.intercept_stderr))
        else:
            e_ci = k_ci = (math.nan, math.nan)
        return cls(10 ** res.intercept, float(res.slope), tuple(map(float, e_ci)), tuple(map(float, k_ci)), len(lx))

    def __call__(self, x):
        return self.k * np.asarray(x, float) ** self.exponent


@dataclass
class AllocationFit:
    """Approaches 1 and 2: ``N_opt = n_opt(C)``, ``D_opt = d_opt(C)`` and the points behind them."""

    approach: int
    n_opt: PowerLaw
    d_opt: PowerLaw
    table: pd.DataFrame  # approach 1: the envelope runs; approach 2: one row per budget profile
    notes: list[str] = field(default_factory=list)

    def optimal(self, C):
        return self.n_opt(C), self.d_opt(C)


def fit_envelope(points: pd.DataFrame, tolerance: float = BUDGET_TOLERANCE) -> AllocationFit:
    """Approach 1: the lowest-loss run of each FLOP budget, on the lower envelope of loss vs C.

    >>> pts = pd.DataFrame({"run": list("abcd"), "params": [1e6, 2e6, 4e6, 4e6],
    ...                     "tokens": [2e7, 8e7, 3.2e8, 2e7], "loss": [4.0, 3.5, 3.0, 4.5]})
    >>> pts["flops"] = 6 * pts.params * pts.tokens   # 1.2e14, 9.6e14, 7.7e15, 4.8e14
    >>> fit = fit_envelope(pts)   # run d (loss 4.5 at 4.8e14) is above the envelope: left out
    >>> fit.table.run.tolist(), round(fit.n_opt.exponent, 3), round(fit.d_opt.exponent, 3)
    (['a', 'b', 'c'], 0.333, 0.667)
    """
    _require_sizes(points, "approach 1 (envelope)")
    pts = points.assign(budget=group_budgets(points["flops"], tolerance))
    best = pts.loc[pts.groupby("budget")["loss"].idxmin()].sort_values("flops")
    prev_min = best["loss"].cummin().shift(fill_value=np.inf)
    frontier = best[best["loss"] < prev_min].reset_index(drop=True)
    notes = []
    if len(frontier) < len(best):
        notes.append(f"{len(best) - len(frontier)} budget(s) above the envelope left out")
    if len(frontier) < 2 or frontier["params"].nunique() < 2:
        raise ScalingDataError("flops", f"approach 1 needs an envelope of at least 2 budgets with "
                                        f"different best model sizes, got {len(frontier)} budget(s)")
    return AllocationFit(1, PowerLaw.fit(frontier["flops"], frontier["params"]),
                         PowerLaw.fit(frontier["flops"], frontier["tokens"]),
                         frontier[["run", "flops", "params", "tokens", "loss"]], notes)


def _parabola_vertex(logx: np.ndarray, loss: np.ndarray):
    """(vertex x, loss at vertex, curvature, coefficients) of loss = c2 x^2 + c1 x + c0."""
    c2, c1, c0 = np.polyfit(logx, loss, 2)
    xv = -c1 / (2 * c2) if c2 > 0 else math.nan
    return xv, (c0 - c1 ** 2 / (4 * c2)) if c2 > 0 else math.nan, c2, (c2, c1, c0)


def fit_isoflop(points: pd.DataFrame, tolerance: float = BUDGET_TOLERANCE,
                min_points: int = 3) -> AllocationFit:
    """Approach 2: a parabola of loss in log N (and in log D) per budget; vertices -> power laws.

    Budgets with fewer than ``min_points`` runs (or sizes), or a parabola that opens downwards
    (no minimum), are left out with a note; fewer than 2 usable budgets is an error.
    """
    _require_sizes(points, "approach 2 (IsoFLOP)", min_points)
    pts = points.assign(budget=group_budgets(points["flops"], tolerance))
    rows, notes = [], []
    for b, g in pts.groupby("budget"):
        C = float(np.exp(np.log(g["flops"]).mean()))  # geometric mean of the budget's FLOPs
        if len(g) < min_points or g["params"].nunique() < min_points:
            notes.append(f"budget {C:.3g}: {g['params'].nunique()} model size(s), needs {min_points}")
            continue
        ln, ld = np.log(g["params"].to_numpy(float)), np.log(g["tokens"].to_numpy(float))
        xn, ln_min, curv_n, coef_n = _parabola_vertex(ln, g["loss"].to_numpy(float))
        xd, _, curv_d, coef_d = _parabola_vertex(ld, g["loss"].to_numpy(float))
        if not (curv_n > 0 and curv_d > 0):
            notes.append(f"budget {C:.3g}: the loss profile has no minimum (parabola opens downwards)")
            continue
        inside = ln.min() <= xn <= ln.max()
        if not inside:
            notes.append(f"budget {C:.3g}: the vertex N={math.exp(xn):.3g} lies outside the sizes run "
                         f"({g['params'].min():.3g}..{g['params'].max():.3g}); extrapolated")
        rows.append(dict(budget=C, budget_id=int(b), n_runs=len(g), params_opt=math.exp(xn), tokens_opt=math.exp(xd),
                         loss_min=ln_min, curvature=curv_n, vertex_inside=inside,
                         coef_logN=list(coef_n), coef_logD=list(coef_d)))
    if len(rows) < 2:
        raise ScalingDataError("flops", f"approach 2 needs at least 2 FLOP budgets with >= {min_points} "
                                        f"model sizes each (runs within {tolerance:.0%} of each other's "
                                        f"FLOPs share a budget), got {len(rows)}"
                                        + (f": {'; '.join(notes)}" if notes else ""))
    table = pd.DataFrame(rows)
    return AllocationFit(2, PowerLaw.fit(table["budget"], table["params_opt"]),
                         PowerLaw.fit(table["budget"], table["tokens_opt"]), table, notes)


# ============================================================================= approach 3

@dataclass
class ParametricFit:
    """``L(N, D) = E + A / N^alpha + B / D^beta`` and what follows from it.

    ``ci`` maps a constant (E, A, B, alpha, beta, a, b) to its 95 % bootstrap interval;
    ``boot`` holds the bootstrap replicates' (E, A, B, alpha, beta) rows.
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float = math.nan
    n_points: int = 0
    ci: dict = field(default_factory=dict)
    boot: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    def loss(self, N, D):
        N, D = np.asarray(N, float), np.asarray(D, float)
        return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    @property
    def a(self) -> float:
        """N_opt grows as C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """D_opt grows as C^b."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))

    def optimal(self, C):
        """(N_opt, D_opt, predicted loss) under C = 6 N D."""
        half = np.asarray(C, float) / 6
        N = self.G * half ** self.a
        D = half / N
        return N, D, self.loss(N, D)

    def optimal_ci(self, C) -> dict[str, tuple]:
        """95 % bootstrap intervals of N_opt, D_opt and the loss at budget(s) C."""
        if self.boot is None or len(self.boot) == 0:
            nan = np.full(np.shape(C), np.nan)
            return {k: (nan, nan) for k in ("N", "D", "loss")}
        outs = np.array([ParametricFit(*row).optimal(C) for row in self.boot])  # (n_boot, 3, ...)
        lo, hi = np.percentile(outs, [2.5, 97.5], axis=0)
        return {k: (lo[i], hi[i]) for i, k in enumerate(("N", "D", "loss"))}

    @property
    def constants(self) -> dict[str, float]:
        return dict(E=self.E, A=self.A, B=self.B, alpha=self.alpha, beta=self.beta, a=self.a, b=self.b)


def _residuals(theta, logN, logD, logL):
    """r = LSE(a - alpha log N, b - beta log D, e) - log L, and the softmax weights (3, n)."""
    a, b, e, alpha, beta = theta
    u = np.stack([a - alpha * logN, b - beta * logD, np.broadcast_to(e, logN.shape)])
    lse = logsumexp(u, axis=0)
    return lse - logL, np.exp(u - lse)


def _objective(theta, logN, logD, logL, delta):
    """Summed Huber loss of the residuals (divided by delta so that its scale is O(|r|) and the
    optimiser's relative tolerances bite), and its gradient."""
    r, w = _residuals(theta, logN, logD, logL)
    g = np.clip(r, -delta, delta) / delta  # d huber / d r, scaled
    grad = np.array([g @ w[0], g @ w[1], g @ w[2], -(g * w[0]) @ logN, -(g * w[1]) @ logD])
    return float(huber(delta, r).sum() / delta), grad


def _grid_starts(logN, logD, logL, delta, grid, k) -> np.ndarray:
    """The k grid points with the lowest objective, (k, 5) as (a, b, e, alpha, beta)."""
    mesh = np.stack(np.meshgrid(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"],
                                indexing="ij"), -1).reshape(-1, 5)  # (G, 5)
    a, b, e, al, be = (mesh[:, i:i + 1] for i in range(5))
    u = np.stack([a - al * logN, b - be * logD, np.broadcast_to(e, (len(mesh), len(logN)))])
    r = logsumexp(u, axis=0) - logL  # (G, n)
    f = huber(delta, r).sum(1)
    return mesh[np.argsort(f, kind="stable")[:k]]


_BOUNDS = [(None, None), (None, None), (None, None), (0.0, None), (0.0, None)]
# log A, log B, log E above this overflow a float when exponentiated: a degenerate optimum
# (e.g. a bootstrap resample of overfitted runs whose loss rises with tokens)
_LOG_MAX = math.log(sys.float_info.max)


def _minimise(starts, logN, logD, logL, delta):
    best = None
    for x0 in starts:
        res = optimize.minimize(_objective, x0, args=(logN, logD, logL, delta), jac=True,
                                method="L-BFGS-B", bounds=_BOUNDS,
                                options={"maxiter": 5000, "ftol": 1e-14, "gtol": 1e-10})
        if np.all(np.isfinite(res.x)) and (best is None or res.fun < best.fun):
            best = res
    return best


def fit_parametric(points: pd.DataFrame, delta: float = HUBER_DELTA, n_bootstrap: int = N_BOOTSTRAP,
                   seed: int = 0, grid: dict | None = None, n_starts: int = 64,
                   boot_starts: int = 2) -> ParametricFit:
    """Approach 3 on points with ``params, tokens, loss``.

    L-BFGS-B runs from the ``n_starts`` best points of ``grid`` (Chinchilla's 4500-point grid by
    default; evaluating every point is cheap, optimising from every point is not) and the best
    optimum is kept. Each bootstrap replicate resamples the runs with replacement and restarts
    from the full fit's optimum and its own ``boot_starts`` best grid points.
    """
    _require_sizes(points, "approach 3 (parametric)", PARAMETRIC_MIN_POINTS)
    if points["tokens"].nunique() < 2:
        raise ScalingDataError("tokens", "approach 3 needs at least 2 distinct token counts")
    grid = grid or START_GRID
    logN, logD, logL = (np.log(points[c].to_numpy(float)) for c in ("params", "tokens", "loss"))
    res = _minimise(_grid_starts(logN, logD, logL, delta, grid, n_starts), logN, logD, logL, delta)
    if res is None:
        raise ScalingDataError("loss", "the parametric fit did not converge from any start")
    a, b, e, alpha, beta = res.x
    if max(a, b, e) > _LOG_MAX:
        raise ScalingDataError("loss", "the parametric fit diverged (a constant beyond a float's range)")
    fit = ParametricFit(math.exp(e), math.exp(a), math.exp(b), float(alpha), float(beta),
                        float(res.fun), len(points))
    for name, v in (("alpha", alpha), ("beta", beta)):
        if v < 1e-6:
            fit.notes.append(f"{name} fitted at 0: the data do not show the {name} term; the fit is unreliable")

    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        boots, failed = [], 0
        n = len(points)
        for _ in range(n_bootstrap):
            idx = rng.integers(0, n, n)
            if np.unique(logN[idx]).size < 2 or np.unique(logD[idx]).size < 2:
                failed += 1
                continue
            starts = np.vstack([res.x[None], _grid_starts(logN[idx], logD[idx], logL[idx], delta, grid, boot_starts)])
            r = _minimise(starts, logN[idx], logD[idx], logL[idx], delta)
            if r is None or max(r.x[:3]) > _LOG_MAX:
                failed += 1
                continue
            ba, bb, be_, bal, bbe = r.x
            boots.append((math.exp(be_), math.exp(ba), math.exp(bb), bal, bbe))
        fit.boot = np.array(boots).reshape(-1, 5)
        if failed:
            fit.notes.append(f"{failed} of {n_bootstrap} bootstrap resamples had a single size, did not converge or diverged")
        if len(boots) >= 2:
            reps = [ParametricFit(*row).constants for row in fit.boot]
            for k in fit.constants:
                vals = np.array([r[k] for r in reps])
                fit.ci[k] = tuple(float(v) for v in np.percentile(vals, [2.5, 97.5]))
    return fit


# ============================================================================= reports

APPROACH_NAMES = {1: "envelope", 2: "IsoFLOP", 3: "parametric"}


def default_budgets(points: pd.DataFrame) -> list[float]:
    """Powers of ten from the smallest budget run to 100x the largest."""
    lo = math.floor(math.log10(points["flops"].min()))
    hi = math.ceil(math.log10(points["flops"].max())) + 2
    return [10.0 ** k for k in range(lo, hi + 1)]


def fit_all(points: pd.DataFrame, approaches=(1, 2, 3), tolerance=BUDGET_TOLERANCE,
            n_bootstrap=N_BOOTSTRAP, seed=0, delta=HUBER_DELTA) -> tuple[dict, list[str]]:
    """{model: {approach: fit}} and the lines explaining every fit that could not be made."""
    fits, problems = {}, []
    for model, g in points.groupby("model", sort=True):
        g = g.reset_index(drop=True)
        fits[model] = {}
        for ap in approaches:
            try:
                if ap == 1:
                    fits[model][1] = fit_envelope(g, tolerance)
                elif ap == 2:
                    fits[model][2] = fit_isoflop(g, tolerance)
                else:
                    fits[model][3] = fit_parametric(g, delta, n_bootstrap, seed)
            except ScalingDataError as e:
                problems.append(f"{model}, approach {ap} ({APPROACH_NAMES[ap]}): {e}")
    return fits, problems


def constants_table(fits: dict) -> pd.DataFrame:
    """One row per (model, approach, quantity): estimate and 95 % interval."""
    rows = []
    for model, by_ap in fits.items():
        for ap, fit in sorted(by_ap.items()):
            if ap == 3:
                for k, v in fit.constants.items():
                    lo, hi = fit.ci.get(k, (math.nan, math.nan))
                    rows.append((model, ap, k, v, lo, hi))
            else:
                for name, law in (("a (N_opt ~ C^a)", fit.n_opt), ("b (D_opt ~ C^b)", fit.d_opt)):
                    rows.append((model, ap, name, law.exponent, *law.exponent_ci))
                rows.append((model, ap, "k_N", fit.n_opt.k, *fit.n_opt.k_ci))
                rows.append((model, ap, "k_D", fit.d_opt.k, *fit.d_opt.k_ci))
    return pd.DataFrame(rows, columns=["model", "approach", "quantity", "estimate", "ci_low", "ci_high"])


def optimal_table(fits: dict, budgets, flops_unit: str) -> pd.DataFrame:
    """Compute-optimal N, D (and loss for approach 3) per model, approach and budget."""
    rows = []
    C = np.asarray(budgets, float)
    for model, by_ap in fits.items():
        for ap, fit in sorted(by_ap.items()):
            if ap == 3:
                N, D, L = fit.optimal(C)
                ci = fit.optimal_ci(C)
                for i, c in enumerate(C):
                    rows.append(dict(model=model, approach=ap, flops=c, flops_unit="6ND",
                                     params_opt=N[i], params_lo=ci["N"][0][i], params_hi=ci["N"][1][i],
                                     tokens_opt=D[i], tokens_lo=ci["D"][0][i], tokens_hi=ci["D"][1][i],
                                     tokens_per_param=D[i] / N[i], loss=L[i], loss_lo=ci["loss"][0][i],
                                     loss_hi=ci["loss"][1][i]))
            else:
                N, D = fit.optimal(C)
                for i, c in enumerate(C):
                    rows.append(dict(model=model, approach=ap, flops=c, flops_unit=flops_unit,
                                     params_opt=N[i], tokens_opt=D[i], tokens_per_param=D[i] / N[i]))
    return pd.DataFrame(rows)


def fits_to_json(fits: dict, settings: dict, problems: list[str]) -> dict:
    out = {"settings": settings, "problems": problems, "models": {}}
    for model, by_ap in fits.items():
        m = out["models"][model] = {}
        for ap, fit in by_ap.items():
            if ap == 3:
                d = {k: v for k, v in asdict(fit).items() if k != "boot"}
                d.update(a=fit.a, b=fit.b, G=fit.G, n_bootstrap_ok=0 if fit.boot is None else len(fit.boot))
            else:
                d = {"n_opt": asdict(fit.n_opt), "d_opt": asdict(fit.d_opt), "notes": fit.notes,
                     "points": fit.table.to_dict(orient="records")}
            m[APPROACH_NAMES[ap]] = d
    return out


def _g(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, (int, np.integer)):
        return str(v)
    return f"{v:.4g}" if 1e-3 <= abs(v) < 1e5 or v == 0 else f"{v:.3e}"


# ============================================================================= CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=Path, help="a results directory or a CSV with params,tokens,loss[,flops,model]")
    p.add_argument("--budgets", type=float, nargs="+", default=None,
                   help="FLOP budgets for the compute-optimal table (default: powers of ten from the "
                        "smallest run to 100x the largest)")
    p.add_argument("--approach", type=int, nargs="+", choices=(1, 2, 3), default=[1, 2, 3],
                   help="1 envelope, 2 IsoFLOP parabolas, 3 parametric L(N, D) (default: all)")
    p.add_argument("--loss-key", default=LOSS_KEY, help=f"record metric holding the loss (default {LOSS_KEY})")
    p.add_argument("--params", choices=("non_embedding", "total"), default="non_embedding",
                   help="which parameter count is N (records only; default non_embedding)")
    p.add_argument("--flops", choices=("exact", "6nd"), default="exact",
                   help="FLOPs of approaches 1 and 2 (records only): the per-architecture count or 6ND")
    p.add_argument("--where", default=None, metavar="EXPR",
                   help="keep only the points for which this pandas expression (DataFrame.eval) over their "
                        "columns run, model, params, tokens, flops, loss is true (e.g. \"tokens <= 2e7\" to leave "
                        "out runs that repeat a small corpus too often)")
    p.add_argument("--tolerance", type=float, default=BUDGET_TOLERANCE,
                   help="runs whose FLOPs agree within this fraction share a budget (default 0.1)")
    p.add_argument("--bootstrap", type=int, default=N_BOOTSTRAP, help="bootstrap resamples of approach 3 (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--out", type=Path, default=None,
                   help="where scaling_*.csv/.md/.json go (default: SOURCE, or the CSV's folder)")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    try:
        if args.tolerance < 0:
            raise ScalingDataError("--tolerance", f"must not be negative, got {args.tolerance}")
        if args.bootstrap < 0:
            raise ScalingDataError("--bootstrap", f"must not be negative, got {args.bootstrap}")
        if args.budgets and any(not (b > 0) for b in args.budgets):
            raise ScalingDataError("--budgets", "FLOP budgets must be positive")
        points = load_points(args.source, args.loss_key, args.params, args.flops)
        if args.where:
            points = select_points(points, args.where)
    except ScalingDataError as e:
        print(f"ssdbench fit-scaling: {e}", file=sys.stderr)
        return 2
    approaches = tuple(sorted(set(args.approach)))
    fits, problems = fit_all(points, approaches, args.tolerance, args.bootstrap, args.seed)
    for line in problems:
        print(f"skipped {line}", file=sys.stderr)
    if not any(fits.values()):
        print("ssdbench fit-scaling: no fit could be made from these points", file=sys.stderr)
        return 2
    flops_unit = "6ND" if (args.flops == "6nd" or args.source.is_file()) else "exact"
    if args.source.is_file() and args.flops == "exact":
        flops_unit = "as given"
    budgets = args.budgets or default_budgets(points)
    consts = constants_table(fits)
    optimal = optimal_table(fits, budgets, flops_unit)

    console = Console()
    t = Table(title=f"fitted constants ({len(points)} runs, 95 % intervals)")
    for c in ("model", "approach", "quantity", "estimate", "95 % interval"):
        t.add_column(c, justify="right" if c in ("estimate", "approach") else "left")
    for r in consts.itertuples(index=False):
        t.add_row(r.model, f"{r.approach} {APPROACH_NAMES[r.approach]}", r.quantity, _g(r.estimate),
                  "-" if not np.isfinite(r.ci_low) else f"[{_g(r.ci_low)}, {_g(r.ci_high)}]")
    console.print(t)
    t = Table(title="compute-optimal allocation")
    for c in ("model", "approach", "FLOPs", "N_opt", "D_opt", "D/N", "loss"):
        t.add_column(c, justify="left" if c in ("model", "approach") else "right")
    for r in optimal.to_dict(orient="records"):
        loss = r.get("loss", math.nan)
        loss_txt = _g(loss) if np.isfinite(loss) else "-"
        if np.isfinite(r.get("loss_lo", math.nan)):
            loss_txt += f" [{_g(r['loss_lo'])}, {_g(r['loss_hi'])}]"
        n_txt = _g(r["params_opt"])
        if np.isfinite(r.get("params_lo", math.nan)):
            n_txt += f" [{_g(r['params_lo'])}, {_g(r['params_hi'])}]"
        t.add_row(r["model"], f"{r['approach']} {APPROACH_NAMES[r['approach']]}",
                  f"{r['flops']:.2e} ({r['flops_unit']})", n_txt, _g(r["tokens_opt"]),
                  f"{r['tokens_per_param']:.1f}", loss_txt)
    console.print(t)
    for model, by_ap in fits.items():
        for ap, fit in sorted(by_ap.items()):
            for note in fit.notes:
                print(f"note {model}, approach {ap}: {note}")

    out = args.out or (args.source.parent if args.source.is_file() else args.source)
    out.mkdir(parents=True, exist_ok=True)
    consts.to_csv(out / "scaling_constants.csv", index=False)
    optimal.to_csv(out / "scaling_optimal.csv", index=False)
    kept = f" (those matching `{args.where}`)" if args.where else ""
    md = ["# Scaling fits", "", f"Source: `{args.source}`, {len(points)} runs{kept}; loss `{args.loss_key}`, "
          f"N = {args.params} parameters, approach 1/2 FLOPs: {flops_unit}; approach 3 budgets: 6ND.", "",
          "## Fitted constants (95 % intervals)", "", consts.to_markdown(index=False, floatfmt=".4g"), "",
          "## Compute-optimal allocation", "", optimal.to_markdown(index=False, floatfmt=".4g"), ""]
    if problems:
        md += ["## Fits not made", ""] + [f"- {p}" for p in problems] + [""]
    (out / "scaling.md").write_text("\n".join(md))
    settings = dict(source=str(args.source), where=args.where, loss_key=args.loss_key, params=args.params, flops=args.flops,
                    tolerance=args.tolerance, bootstrap=args.bootstrap, seed=args.seed,
                    huber_delta=HUBER_DELTA, approaches=list(approaches), budgets=list(budgets))
    doc = _finite(fits_to_json(fits, settings, problems))
    (out / "scaling_fit.json").write_text(json.dumps(doc, indent=2, default=_json_default, allow_nan=False) + "\n")
    print(f"wrote {out / 'scaling_constants.csv'}, {out / 'scaling_optimal.csv'}, "
          f"{out / 'scaling.md'} and {out / 'scaling_fit.json'}")
    return 0


def _finite(o):
    """NaN and infinities become null (strict JSON has no NaN)."""
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None
    return o


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.bool_,)):
        return bool(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
