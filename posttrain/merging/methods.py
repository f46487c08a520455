"""Model-merging methods: one pure, registered function per method, applied to one tensor name at a time.

Every method has the signature::

    fn(base, tensors, weights, *, generator=None, dtype=torch.float32, scratch=None, **method_params) -> Tensor

``base`` is the pre-trained tensor (``None`` is allowed only for ``linear``), ``tensors`` the same tensor from
each fine-tuned model and ``weights`` one coefficient per fine-tuned model. The math runs in ``dtype``
(float32, or float64 when the caller asks); the result comes back in that dtype and the caller casts it to
the output dtype. The merge stage streams tensors through these functions one name at a time (mergekit's
design), so nothing here sees a whole model; each method declares at registration whether the stream may
pass it slices (``merge_method(name, streaming)``, see posttrain.merging.ops and posttrain.merging.stream).

``generator`` (DARE's masks) is one generator shared by the models (drawn in model order) or a list of one per
model (the stage's choice: each model's stream then continues slice after slice, so slicing does not change
which numbers a model draws); a ``torch.Generator`` or a ``numpy.random.Generator`` (the stage uses PCG64).

Task-vector methods (everything except ``linear`` and ``slerp``) work on τ_i = θ_i − θ_base and return
``base + lam · combine(w_i, τ_i)``. Models whose weight is exactly 0 are left out before any math, so a
coefficient of 0 gives the base back bit for bit and a zero-weight model neither votes in a sign election
nor draws from the random generator.

A method's ``density`` (and DELLA's ``epsilon``, Breadcrumbs' ``beta``/``gamma``) is one number for every
model or a list with one per model, as mergekit's per-model ``parameters:``. The sign-electing methods (TIES,
DARE-TIES, DELLA) take ``normalize``: what the disjoint sum is divided by (posttrain.merging.ops.sign_consensus).

Libraries checked: ``peft.utils.merge_utils`` (0.21) and mergekit's ``generalized_task_arithmetic.py``,
``sparsify.py``, ``slerp.py`` and ``model_stock.py``. TIES steps 2-3 give peft's bits
(posttrain.merging.ops.sign_consensus).
Adding a method is one function here: ``@merge_method(name, streaming)`` on ``fn``; its keyword-only
parameters are the method's ``params:`` in a merge stage's config.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from posttrain.merging.ops import (ROWS, SLICES, STATS, TRIM, WHOLE, Scratch, base_copy, check_fraction,
                                   check_normalize, check_tensors, count_of, drop_, drop_outliers, empty,
                                   generators_for, magprune_, merge_method, per_model, per_model_values, rebase,
                                   sign_consensus, task_vectors, trim_, weighted_sum, work_dtype)

__all__ = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "slerp", "model_stock",
           "della"]

Fraction = float | list[float]  # one value for every model, or one per model (a list as long as `models:`)


def fractions(value: Fraction, weights: list[float], what: str) -> list[float]:
    """``value`` for each model with nonzero weight, every given value checked to lie in [0, 1]."""
    for v in value if isinstance(value, (list, tuple)) else [value]:
        check_fraction(what, float(v))
    return per_model_values(value, weights, what)


# --------------------------------------------------------------------------------------------- methods
# Every method also takes ``scratch`` (set by the stage, not by users): buffers for its temporaries.


@merge_method("linear", SLICES)
def linear(
    base: Tensor | None,
    tensors: list[Tensor],
    weights: list[float],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    scratch: Scratch | None = None,
    normalize: bool = True,
) -> Tensor:
    """Weighted average of the models, Σ w_i θ_i / Σ w_i ("model soups", Wortsman et al. 2022).

    ``base`` is ignored (a soup averages fine-tuned models; list the base among ``tensors`` to include it).
    With ``normalize=False`` the weighted sum is returned as is. The paper's uniform soup is all weights
    equal; its greedy soup is a selection loop above this function.
    """
    del base, generator  # same signature as every method; a soup needs neither
    check_tensors(None, tensors, weights, needs_base=False)
    wd = work_dtype(dtype)
    out = weighted_sum([t.to(wd) for t in tensors], [float(w) for w in weights], scratch)
    if normalize:
        total = math.fsum(float(w) for w in weights)
        if abs(total) < 1e-12:
            raise ValueError("linear merge with normalize=True needs weights that do not sum to 0")
        out = out.div_(total)
    return out


@merge_method("task_arithmetic", SLICES)
def task_arithmetic(
    base: Tensor | None,
    tensors: list[Tensor],
    weights: list[float],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    scratch: Scratch | None = None,
    lam: float = 1.0,
) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic"):
    θ = θ_base + lam · Σ w_i (θ_i − θ_base). Negative weights are task negation.

    Computed as (1 − Σ c_i)·θ_base + Σ c_i·θ_i with c_i = lam·w_i, the same sum regrouped: one accumulator
    and no task-vector tensors (a third of the memory passes), and one model at c = 1 gives that model bit
    for bit. Rounding differs from the τ form by an ulp or so of the weights' magnitude.
    """
    del generator
    check_tensors(base, tensors, weights, needs_base=True)
    wd = work_dtype(dtype)
    kept = [(t, lam * float(w)) for t, w in zip(tensors, weights) if float(w) != 0.0]
    if not kept or lam == 0:
        return base_copy(base, dtype)
    out = torch.mul(kept[0][0].to(wd), kept[0][1], out=empty(scratch, "sum", base, wd))
    for t, c in kept[1:]:
        out.add_(t, alpha=c)  # t in its own dtype: add_ widens it element by element, no converted copy
    base_coeff = 1.0 - math.fsum(c for _, c in kept)
    if base_coeff != 0.0:  # at 0 the add is skipped, so that -0.0 entries of a model stay -0.0
        out.add_(base, alpha=base_coeff)
    return out


@merge_method("ties", TRIM)
def ties(
    base: Tensor | None,
    tensors: list[Tensor],
    weights: list[float],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    scratch: Scratch | None = None,
    thresholds: list[float] | None = None,
    density: Fraction = 0.2,
    lam: float = 1.0,
    normalize: str = "count",
) -> Tensor:
    """TIES-Merging (Yadav et al. 2023): trim each τ_i to its top-``density`` magnitudes, elect a sign per
    entry by total magnitude, take the disjoint mean of the agreeing entries, return θ_base + lam · τ_m.

    Departure: the paper has no per-model weights. Here TIES runs on the weighted vectors w_i·τ_i (weights
    all 1 is the paper). peft elects the sign on the unweighted vectors; mergekit divides by Σ w_i over the
    agreeing models instead of their count (``normalize="weights"``; ``"none"`` divides by nothing). Trimming
    is per tensor, the paper trims the whole task vector; magnitudes tied with the k-th largest are all kept
    (see :func:`trim_magnitude`). ``density`` may be one per model. ``thresholds`` (one per model; set by the
    stage, not by users) are the trim magnitudes of the whole tensor when ``base`` and ``tensors`` are slices
    of it; None computes them from the tensors given.
    """
    del generator
    dens = fractions(density, weights, "density")
    check_normalize(normalize)
    b, taus, ws = task_vectors(base, tensors, weights, dtype, scratch)
    if not taus or lam == 0:
        return base_copy(base, dtype)
    for tau, d, limit in zip(taus, dens, per_model(thresholds, weights, "thresholds")):
        if d < 1.0:
            trim_(tau, d, limit, scratch)
    return rebase(b, lam, sign_consensus(taus, ws, scratch, normalize))


@merge_method("dare_linear", SLICES)
def dare_linear(
    base: Tensor | None,
    tensors: list[Tensor],
    weights: list[float],
    *,
    generator: torch.Generator | np.random.Generator | list | None = None,
    dtype: torch.dtype = torch.float32,
    scratch: Scratch | None = None,
    density: Fraction = 0.1,
    lam: float = 1.0,
) -> Tensor:
    """DARE then task arithmetic (Yu et al. 2024, "Language Models are Super Mario"): each τ_i loses every
    entry with probability 1 − ``density`` and the rest are scaled by 1/``density``; then
    θ = θ_base + lam · Σ w_i τ̃_i. ``density=1`` is exactly task arithmetic. Pass a seeded ``generator`` (or
    one per model) for reproducible merges; the masks are drawn per tensor, in model order."""
    dens = fractions(density, weights, "density")
    if all(d >= 1.0 for d in dens):  # nothing dropped, no random numbers drawn: task arithmetic, bit for bit
        return task_arithmetic(base, tensors, weights, dtype=dtype, scratch=scratch, lam=lam)
    gens = generators_for(generator, weights)
    b, taus, ws = task_vectors(base, tensors, weights, dtype, scratch)
    if not taus or lam == 0:
        return base_copy(base, dtype)
    dropped = [tau if d >= 1.0 else drop_(tau, d, g, scratch) for tau, d, g in zip(taus, dens, gens)]
    return rebase(b, lam, weighted_sum(dropped, ws, scratch))


@merge_method("dare_ties", SLICES)
def dare_ties(
    base: Tensor | None,
    tensors: list[Tensor],
    weights: list[float],
    *,
    generator: torch.Generator | np.random.Generator | list | None = None,
    dtype: torch.dtype = torch.float32,
    scratch: Scratch | None = None,
    density: Fraction = 0.1,
    lam: float = 1.0,
    normalize: str = "count",
) -> Tensor:
    """DARE then TIES sign election and disjoint mean (Yu et al. 2024, the DARE + TIES-Merging setting).

    DARE's random drop replaces TIES's magnitude trim (as in mergekit and peft); the sign election and the
    disjoint mean run on w_i·τ̃_i, as in :func:`ties`.
    """
    dens = fractions(density, weights, "density")
    check_normalize(normalize)
    gens = generators_for(generator, weights)
    b, taus, ws = task_vectors(base, tensors, weights, dtype, scratch)
    if not taus or lam == 0:
        return base_copy(base, dtype)
    for tau, d, g in zip(taus, dens, gens):
        if d < 1.0:
            drop_(tau, d, g, scratch)
    return rebase(b, lam, sign_consensus(taus, ws, scratch, normalize))


@merge_method("breadcrumbs", WHOLE)
def breadcrumbs(
    base: Tensor | None,
    tensors: list[Tensor],
    weights: list[float],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    scratch: Scratch | None = None,
    beta: Fraction = 0.01,
    gamma: Fraction = 0.9,
    lam: float = 1.0,
) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2024): in each τ_i zero the ``beta`` fraction of largest and the
    ``gamma`` fraction of smallest magnitudes, then task arithmetic θ_base + lam · Σ w_i τ̂_i.

    Departure: the paper masks per layer; here per tensor (one tensor is all this function sees; the stage
    never slices it), and magnitudes tied with a bound are all kept (:func:`drop_outliers`). The defaults
    keep the middle 9% of magnitudes; tune ``beta`` and ``gamma`` per model family.
    """
    del generator
    check_tensors(base, tensors, weights, needs_base=True)
    betas, gammas = fractions(beta, weights, "beta"), fractions(gamma, weights, "gamma")
    if all(count_of(x, base.numel()) == 0 for x in betas + gammas):
        return task_arithmetic(base, tensors, weights, dtype=dtype, lam=lam)  # nothing masked: the same bits
    b, taus, ws = task_vectors(base, tensors, weights, dtype, scratch)
    if not taus or lam == 0:
        return base_copy(base, dtype)
    masked = [drop_outliers(tau, bt, gm) for tau, bt, gm in zip(taus, betas, gammas)]
    return rebase(b, lam, weighted_sum(masked, ws, scratch))


@merge_method("slerp", WHOLE)
def slerp(
    base: Tensor | None,
    tensors: list[Tensor],
    weights: list[float],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    scratch: Scratch | None = None,
    t: float = 0.5,
) -> Tensor:
    """Spherical linear interpolation (Shoemake 1985, "Animating Rotation with Quaternion Curves") from the
    base θ_0 to one model θ_1, tensor by tensor, as mergekit's ``slerp``: with Ω the angle between θ_0 and θ_1
    (each flattened), θ = sin((1 − t)Ω)/sin Ω · θ_0 + sin(tΩ)/sin Ω · θ_1. Nearly parallel tensors
    (|cos Ω| > 0.9995, where sin Ω loses its precision) are interpolated linearly, (1 − t)·θ_0 + t·θ_1.
    t = 0 gives the base, t = 1 the model.

    Departures from mergekit: t is one number for every tensor (mergekit also takes a gradient of t across
    layers); ``weights`` are not used (t is the coefficient), and there is exactly one model besides the base.
    """
    del generator, scratch
    check_tensors(base, tensors, weights, needs_base=True)
    if len(tensors) != 1:
        raise ValueError(f"slerp interpolates the base and one model; got {len(tensors)} models")
    check_fraction("t", t)
    wd = work_dtype(dtype)
    v0, v1 = base.to(wd).reshape(-1), tensors[0].to(wd).reshape(-1)
    # mergekit's normalize: a vector of norm <= eps is left as is (a zero bias has no direction).
    n0, n1 = float(v0.norm()), float(v1.norm())
    cos = float(torch.dot(v0 / n0 if n0 > _EPS else v0, v1 / n1 if n1 > _EPS else v1))
    if abs(cos) > _PARALLEL:
        return torch.lerp(v0, v1, t).reshape(base.shape)
    omega = math.acos(cos)
    s0, s1 = math.sin((1.0 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    return (v0 * s0).add_(v1, alpha=s1).reshape(base.shape)


_EPS, _PARALLEL = 1e-8, 0.9995  # mergekit's eps and DOT_THRESHOLD


def _gram(base: Tensor, tensors: list[Tensor], weights: list[float], dtype: torch.dtype,
          scratch: Scratch | None = None) -> np.ndarray:
    """model_stock's statistic of a slice: G[i, j] = Σ τ_i·τ_j over its entries, for the models with nonzero
    weight (k × k, float64; each slice's dots in the work dtype). Sums over slices give the whole tensor's."""
    _, taus, _ = task_vectors(base, tensors, weights, dtype, scratch)
    gram = np.zeros((len(taus), len(taus)))
    for i, a in enumerate(taus):
        for j in range(i, len(taus)):
            gram[i, j] = gram[j, i] = float(torch.dot(a.reshape(-1), taus[j].reshape(-1)))
    return gram


def stock_ratio(gram: np.ndarray) -> float:
    """Model Stock's t = k·cos θ / (1 + (k − 1)·cos θ), cos θ the mean of the pairwise cosines of the k task
    vectors (mergekit's reading of the paper, which defines θ for two models; a norm product below 1e-6 counts
    as 1e-6 and each cosine is clipped to [−1, 1], as mergekit)."""
    k = gram.shape[0]
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    cos = [min(1.0, max(-1.0, gram[i, j] / max(norms[i] * norms[j], 1e-6))) for i in range(k) for j in range(i + 1, k)]
    c = math.fsum(cos) / len(cos)
    return k * c / (1.0 + (k - 1) * c)


@merge_method("model_stock", STATS, stats=_gram)
def model_stock(
    base: Tensor | None,
    tensors: list[Tensor],
    weights: list[float],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    scratch: Scratch | None = None,
    stats: np.ndarray | None = None,
) -> Tensor:
    """Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models"): per tensor,
    θ = t·mean(θ_i) + (1 − t)·θ_base with t = k·cos θ / (1 + (k − 1)·cos θ) from the angle between the task
    vectors τ_i = θ_i − θ_base (:func:`stock_ratio`). Needs k ≥ 2 models.

    ``stats`` (set by the stage, not by users) is the Gram matrix of the whole tensor's task vectors, summed
    over its slices in a first pass (:func:`_gram`); None computes it from the tensors given. Departures: the
    paper works per layer and defines θ for two models; as mergekit, here it is per tensor and cos θ is the
    mean pairwise cosine. Weights are not coefficients (t is): each is 1, or 0 to leave a model out.
    """
    del generator
    check_tensors(base, tensors, weights, needs_base=True)
    if any(float(w) not in (0.0, 1.0) for w in weights):
        raise ValueError(f"model_stock takes no weights (t comes from the angle): give 1, or 0 to leave a model "
                         f"out; got {list(weights)}")
    kept = [t for t, w in zip(tensors, weights) if float(w) != 0.0]
    if len(kept) < 2:
        raise ValueError(f"model_stock needs at least 2 fine-tuned models (with weight 1), got {len(kept)}")
    t = stock_ratio(stats if stats is not None else _gram(base, tensors, weights, dtype))
    out = empty(scratch, "sum", base, work_dtype(dtype)).copy_(kept[0])
    for x in kept[1:]:
        out.add_(x)
    return out.div_(len(kept)).mul_(t).add_(base, alpha=1.0 - t)  # mergekit's order: t·mean + (1 − t)·base


@merge_method("della", ROWS)
def della(
    base: Tensor | None,
    tensors: list[Tensor],
    weights: list[float],
    *,
    generator: torch.Generator | np.random.Generator | list | None = None,
    dtype: torch.dtype = torch.float32,
    scratch: Scratch | None = None,
    row_length: int | None = None,
    density: Fraction = 0.5,
    epsilon: float | list[float] = 0.15,
    lam: float = 1.0,
    normalize: str = "count",
) -> Tensor:
    """DELLA-Merging (Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through
    Magnitude-Based Sampling"): MagPrune each τ_i (:func:`posttrain.merging.ops.magprune_`: keep probabilities
    from density − ε for the smallest magnitude of a row to density + ε for the largest, survivors scaled by
    1/keep probability), then TIES's sign election and disjoint mean (on w_i·τ̃_i, as :func:`ties`), and
    θ_base + lam · τ_m. ``density`` ≥ 1 prunes nothing (no draws); ``epsilon`` 0 is DARE-TIES bit for bit.

    ``row_length`` (set by the stage, which cuts slices at row boundaries): the length of the rows magnitudes
    are ranked in; None: the last dimension of ``base`` (a 1-D tensor is one row). Parameters as mergekit's
    ``della``, whose ``normalize: true`` is ``normalize: weights`` here.
    """
    check_normalize(normalize)
    dens, eps = fractions(density, weights, "density"), per_model_values(epsilon, weights, "epsilon")
    for d, e in zip(dens, eps):  # mergekit's condition: every keep probability in (0, 1)
        if e < 0 or (0.0 < d < 1.0 and not (d - e > 0.0 and d + e < 1.0)):
            raise ValueError(f"epsilon {e} with density {d}: density ± epsilon must lie in (0, 1)")
    gens = generators_for(generator, weights)
    b, taus, ws = task_vectors(base, tensors, weights, dtype, scratch)
    row = row_length or (base.shape[-1] if base.dim() >= 2 else base.numel())
    if row < 1 or base.numel() % row:
        raise ValueError(f"row_length {row} does not divide the {base.numel()} entries")
    if not taus or lam == 0:
        return base_copy(base, dtype)
    for tau, d, e, g in zip(taus, dens, eps, gens):
        if d <= 0.0:
            tau.zero_()
        elif d < 1.0:
            magprune_(tau, row, d, e, g, scratch)
    return rebase(b, lam, sign_consensus(taus, ws, scratch, normalize))
