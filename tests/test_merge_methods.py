"""Merge methods: identities, hand-computed values for every method, DARE statistics, per-block coefficients,
registry behaviour. Expected numbers are written out literally; the arithmetic is in the comments."""
from __future__ import annotations

import math

import pytest
import torch

from posttrain.merging.compat import block_of, coefficients_for
from posttrain.merging.methods import (
    breadcrumbs,
    dare_linear,
    dare_ties,
    linear,
    task_arithmetic,
    ties,
)
from posttrain.registry import MERGE_METHODS, RegistryError

TASK_VECTOR_METHODS = [task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs]
ALL = {
    "linear": linear,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "breadcrumbs": breadcrumbs,
}


def T(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------- identities


@pytest.mark.parametrize("fn", TASK_VECTOR_METHODS, ids=lambda f: f.__name__)
def test_zero_coefficients_give_base_bit_exact(fn):
    base = torch.randn(4, 5, generator=gen(1)).to(torch.bfloat16)
    base[0, 0] = -0.0  # -0.0 + 0.0 is +0.0: only skipping zero-weight models keeps the sign bit
    others = [torch.randn(4, 5, generator=gen(s)).to(torch.bfloat16) for s in (2, 3)]
    out = fn(base, others, [0.0, 0.0], generator=gen())
    assert out.dtype == torch.float32
    # bit-exact after the caller's cast back to the input dtype
    assert torch.equal(out.to(torch.bfloat16).view(torch.int16), base.view(torch.int16))
    out_lam0 = fn(base, others, [1.0, 1.0], generator=gen(), lam=0.0)
    assert torch.equal(out_lam0.to(torch.bfloat16).view(torch.int16), base.view(torch.int16))


@pytest.mark.parametrize("fn", TASK_VECTOR_METHODS, ids=lambda f: f.__name__)
def test_result_never_aliases_base(fn):
    base = T(1, 2, 3)
    out = fn(base, [T(1, 2, 3)], [0.0], generator=gen())
    out.add_(100)
    assert torch.equal(base, T(1, 2, 3))


def test_zero_weight_models_draw_no_random_numbers():
    base = torch.zeros(64)
    m0, m1 = torch.randn(64, generator=gen(1)), torch.randn(64, generator=gen(2))
    alone = dare_linear(base, [m1], [1.0], density=0.5, generator=gen(5))
    assert torch.equal(dare_linear(base, [m0, m1], [0.0, 1.0], density=0.5, generator=gen(5)), alone)


def test_task_arithmetic_one_model_lambda_one_is_that_model():
    base, model = torch.randn(8, 8, generator=gen(1)), torch.randn(8, 8, generator=gen(2))
    torch.testing.assert_close(task_arithmetic(base, [model], [1.0]), model)


def test_ties_density_one_single_model_is_that_model():
    base, model = torch.randn(8, 8, generator=gen(1)), torch.randn(8, 8, generator=gen(2))
    torch.testing.assert_close(ties(base, [model], [1.0], density=1.0), model)


def test_dare_without_drops_equals_task_arithmetic():
    base = torch.randn(6, 7, generator=gen(1))
    models = [torch.randn(6, 7, generator=gen(s)) for s in (2, 3)]
    expected = task_arithmetic(base, models, [0.7, -0.3], lam=0.9)
    assert torch.equal(dare_linear(base, models, [0.7, -0.3], density=1.0, generator=gen(), lam=0.9), expected)


def test_dare_ties_without_drops_equals_ties_without_trim():
    base = torch.randn(6, 7, generator=gen(1))
    models = [torch.randn(6, 7, generator=gen(s)) for s in (2, 3, 4)]
    expected = ties(base, models, [1.0, 0.5, 2.0], density=1.0)
    assert torch.equal(dare_ties(base, models, [1.0, 0.5, 2.0], density=1.0, generator=gen()), expected)


def test_averaging_identical_models_gives_that_model():
    x = torch.randn(5, 3, generator=gen(1))
    torch.testing.assert_close(linear(None, [x, x, x], [0.2, 0.3, 0.5]), x)
    torch.testing.assert_close(linear(None, [x, x], [1.0, 1.0]), x)


def test_float64_on_request():
    out = task_arithmetic(T(1, 2), [T(2, 2)], [1.0], dtype=torch.float64)
    assert out.dtype == torch.float64
    assert out.tolist() == [2.0, 2.0]


# ----------------------------------------------------------------------------------------- exact values


def test_linear_exact():
    a, b = T(1, 2, 3, 4), T(3, 6, 1, 0)
    # (1·a + 3·b) / 4 = ([1,2,3,4] + [9,18,3,0]) / 4
    assert linear(None, [a, b], [1.0, 3.0]).tolist() == [2.5, 5.0, 1.5, 1.0]
    assert linear(None, [a, b], [1.0, 3.0], normalize=False).tolist() == [10.0, 20.0, 6.0, 4.0]
    # base is ignored
    assert linear(T(9, 9, 9, 9), [a, b], [1.0, 3.0]).tolist() == [2.5, 5.0, 1.5, 1.0]


def test_linear_refuses_weights_summing_to_zero():
    with pytest.raises(ValueError, match="sum to 0"):
        linear(None, [T(1), T(2)], [1.0, -1.0])


def test_task_arithmetic_exact():
    base = T(1, 1, 1, 1)
    m1, m2 = T(2, 0, 1, 3), T(1, 3, 0, 1)  # τ1 = [1,-1,0,2], τ2 = [0,2,-1,0]
    # 0.5·τ1 + 2·τ2 = [0.5, 3.5, -2, 1]
    assert task_arithmetic(base, [m1, m2], [0.5, 2.0]).tolist() == [1.5, 4.5, -1.0, 2.0]
    assert task_arithmetic(base, [m1, m2], [0.5, 2.0], lam=0.5).tolist() == [1.25, 2.75, 0.0, 1.5]
    # negation: base − τ1
    assert task_arithmetic(base, [m1], [-1.0]).tolist() == [0.0, 2.0, 1.0, -1.0]


def _ties_case():
    base = T(1, 1, 1, 1, 1, 1)
    taus = [T(4, -3, 2, -1, 0.5, 0), T(-2, -5, 1, 3, -0.25, 1), T(1, 2, -6, 0.5, 1, -2)]
    return base, [base + t for t in taus]


def test_ties_exact():
    base, models = _ties_case()
    # trim to 3 of 6:   τ1 → [4,-3,2,0,0,0]  τ2 → [-2,-5,0,3,0,0]  τ3 → [0,2,-6,0,0,-2]
    # summed:           [2,-6,-4,3,0,-2]      elected sign: [+,-,-,+,+,-]
    # disjoint mean:    [4, (-3-5)/2, -6, 3, 0, -2] = [4,-4,-6,3,0,-2]
    out = ties(base, models, [1.0, 1.0, 1.0], density=0.5)
    assert out.tolist() == [5.0, -3.0, -5.0, 4.0, 1.0, -1.0]
    out = ties(base, models, [1.0, 1.0, 1.0], density=0.5, lam=0.5)
    assert out.tolist() == [3.0, -1.0, -2.0, 2.5, 1.0, 0.0]


def test_ties_keeps_shape_of_matrices():
    base, models = _ties_case()
    out = ties(base.view(2, 3), [m.view(2, 3) for m in models], [1.0, 1.0, 1.0], density=0.5)
    assert out.tolist() == [[5.0, -3.0, -5.0], [4.0, 1.0, -1.0]]


def test_ties_elects_sign_on_weighted_task_vectors():
    base = T(0, 0)
    m1, m2 = T(3, 2), T(-2, 4)
    # weighted: 1·τ1 = [3,2], 2·τ2 = [-4,8]. Entry 0: 3 − 4 < 0 → negative wins → -4 (peft, which elects on
    # the unweighted 3 − 2 > 0, would give 3). Entry 1: both positive → (2 + 8) / 2 = 5.
    assert ties(base, [m1, m2], [1.0, 2.0], density=1.0).tolist() == [-4.0, 5.0]


def test_ties_density_rounding_is_exact():
    # 0.29 · 100 is 28.999999999999996 in floats; keep 29 entries, not 28.
    base = torch.zeros(100)
    model = torch.arange(1, 101, dtype=torch.float32)
    out = ties(base, [model], [1.0], density=0.29)
    assert int((out != 0).sum()) == 29
    assert out[out != 0].min().item() == 72.0


def test_dare_linear_values_are_dropped_or_rescaled():
    base = torch.zeros(256)
    m1, m2 = torch.full((256,), 1.0), torch.full((256,), 10.0)
    out = dare_linear(base, [m1, m2], [1.0, 1.0], density=0.5, generator=gen(3))
    # each entry: (0 or 1/0.5) + (0 or 10/0.5)
    assert set(out.tolist()) == {0.0, 2.0, 20.0, 22.0}


def test_dare_ties_values_are_sign_consensus_of_rescaled():
    base = torch.zeros(256)
    m1, m2 = torch.full((256,), 1.0), torch.full((256,), -3.0)
    out = dare_ties(base, [m1, m2], [1.0, 1.0], density=0.5, generator=gen(3))
    # kept pairs (2, 0) → 2; (0, -6) → -6; (2, -6): sum −4 elects −, mean of agreeing = -6; (0, 0) → 0.
    # dare_linear would give -4 for (2, -6); TIES never does.
    assert set(out.tolist()) == {0.0, 2.0, -6.0}
    lin = dare_linear(base, [m1, m2], [1.0, 1.0], density=0.5, generator=gen(3))
    assert -4.0 in set(lin.tolist())


def test_dare_density_zero_drops_everything():
    assert dare_linear(T(1, 2), [T(5, 5)], [1.0], density=0.0, generator=gen()).tolist() == [1.0, 2.0]


def test_dare_is_reproducible_with_a_seeded_generator():
    base = torch.zeros(1000)
    model = torch.randn(1000, generator=gen(1))
    a = dare_linear(base, [model], [1.0], density=0.5, generator=gen(7))
    b = dare_linear(base, [model], [1.0], density=0.5, generator=gen(7))
    c = dare_linear(base, [model], [1.0], density=0.5, generator=gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_breadcrumbs_exact():
    base = torch.ones(10)
    tau1 = T(10, -9, 8, -7, 6, -5, 4, -3, 2, -1)
    tau2 = T(0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5)
    # beta 0.1 drops the 1 largest, gamma 0.3 the 3 smallest magnitudes of each τ:
    #   τ1 → [0,-9,8,-7,6,-5,4,0,0,0]     τ2 → [0,0,0,2,2.5,3,3.5,4,4.5,0]
    #   τ1 + 2·τ2 = [0,-9,8,-3,11,1,11,8,9,0]
    out = breadcrumbs(base, [base + tau1, base + tau2], [1.0, 2.0], beta=0.1, gamma=0.3)
    assert out.tolist() == [1.0, -8.0, 9.0, -2.0, 12.0, 2.0, 12.0, 9.0, 10.0, 1.0]


def test_breadcrumbs_with_no_outliers_to_drop_keeps_the_top():
    # 0.01 · 10 rounds down to 0 outliers; only the 3 smallest go (mergekit's slice [n:-0] would drop all).
    base = torch.zeros(10)
    tau = T(10, -9, 8, -7, 6, -5, 4, -3, 2, -1)
    out = breadcrumbs(base, [tau], [1.0], beta=0.01, gamma=0.3)
    assert out.tolist() == [10.0, -9.0, 8.0, -7.0, 6.0, -5.0, 4.0, 0.0, 0.0, 0.0]


def test_breadcrumbs_dropping_everything_gives_base():
    assert breadcrumbs(T(1, 2, 3, 4), [T(5, 6, 7, 8)], [1.0], beta=0.5, gamma=0.75).tolist() == [1.0, 2.0, 3.0, 4.0]


def test_breadcrumbs_without_masking_is_task_arithmetic():
    base = torch.randn(5, 4, generator=gen(1))
    models = [torch.randn(5, 4, generator=gen(s)) for s in (2, 3)]
    assert torch.equal(
        breadcrumbs(base, models, [0.3, 0.6], beta=0.0, gamma=0.0), task_arithmetic(base, models, [0.3, 0.6])
    )


# ------------------------------------------------------------------------------------------ DARE stats


def test_dare_keeps_density_fraction_and_preserves_the_mean():
    n, density = 200_000, 0.3
    tau = 1.0 + 0.5 * torch.randn(n, generator=gen(1))
    out = dare_linear(torch.zeros(n), [tau], [1.0], density=density, generator=gen(2))
    kept = out != 0
    # kept fraction ~ Binomial(n, 0.3)/n: std 0.001, tolerance 5σ
    assert abs(kept.float().mean().item() - density) < 0.005
    # kept entries are exactly τ / density
    torch.testing.assert_close(out[kept], tau[kept] / density)
    # E[out] = E[τ]; std of the mean ≈ sqrt(1.25 · (1/0.3 − 1) / n) ≈ 0.0038, tolerance ≈ 5σ
    assert abs(out.mean().item() - tau.mean().item()) < 0.02


# ------------------------------------------------------------------------------------------- per block


@pytest.mark.parametrize(
    "name, block",
    [
        ("model.layers.3.mlp.up_proj.weight", "layers.3"),
        ("model.layers.12.input_layernorm.weight", "layers.12"),
        ("model.embed_tokens.weight", "embed"),
        ("lm_head.weight", "lm_head"),
        ("model.norm.weight", "norm"),
        ("transformer.h.0.attn.c_attn.weight", "layers.0"),
        ("transformer.wte.weight", "embed"),
        ("transformer.ln_f.weight", "norm"),
        ("model.rotary_emb.inv_freq", "other"),
    ],
)
def test_block_of(name, block):
    assert block_of(name) == block


def test_coefficients_for_uses_block_then_global():
    per_block = {"layers.0": [0.1, 0.9], "lm_head": [0.0, 1.0]}
    assert coefficients_for("model.layers.0.self_attn.q_proj.weight", [0.5, 0.5], per_block) == [0.1, 0.9]
    assert coefficients_for("lm_head.weight", [0.5, 0.5], per_block) == [0.0, 1.0]
    assert coefficients_for("model.layers.1.self_attn.q_proj.weight", [0.5, 0.5], per_block) == [0.5, 0.5]
    assert coefficients_for("model.norm.weight", [0.5, 0.5], None) == [0.5, 0.5]


def test_coefficients_for_refuses_wrong_length():
    with pytest.raises(ValueError, match="'layers.0' have 3 entries but there are 2 models"):
        coefficients_for("model.layers.0.mlp.up_proj.weight", [0.5, 0.5], {"layers.0": [1.0, 1.0, 1.0]})


def test_per_block_coefficients_change_only_their_block():
    base = T(0, 0)
    models = [T(1, 0), T(0, 1)]
    per_block = {"layers.1": [2.0, 0.0]}
    merged = {
        name: task_arithmetic(base, models, coefficients_for(name, [1.0, 1.0], per_block)).tolist()
        for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight")
    }
    assert merged == {
        "model.layers.0.mlp.down_proj.weight": [1.0, 1.0],
        "model.layers.1.mlp.down_proj.weight": [2.0, 0.0],
    }


# ------------------------------------------------------------------------------------- registry, checks


def test_every_method_is_registered():
    for name, fn in ALL.items():
        assert MERGE_METHODS.get(name) is fn


def test_registering_a_method_twice_is_refused():
    with pytest.raises(RegistryError, match="'ties' is registered twice"):
        MERGE_METHODS.register("ties", lambda *a, **k: None)
    assert MERGE_METHODS.get("ties") is ties


def test_unknown_method_suggests_close_name():
    with pytest.raises(RegistryError, match=r"unknown merge method 'tie'.*did you mean 'ties'"):
        MERGE_METHODS.get("tie")


def test_task_vector_methods_need_a_base():
    with pytest.raises(ValueError, match="needs a base model"):
        ties(None, [T(1)], [1.0])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: task_arithmetic(T(1, 2), [T(1, 2)], [1.0, 1.0]), "1 tensors but 2 weights"),
        (lambda: task_arithmetic(T(1, 2), [T(1, 2, 3)], [1.0]), r"shape \(3,\) differs from \(2,\)"),
        (lambda: ties(T(1, 2), [T(3, 4)], [1.0], density=1.5), "density must be in"),
        (lambda: breadcrumbs(T(1, 2), [T(3, 4)], [1.0], gamma=-0.1), "gamma must be in"),
    ],
)
def test_bad_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("n_models", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sign_consensus_is_peft_bit_for_bit(n_models: int, dtype: torch.dtype) -> None:
    peft_merge = pytest.importorskip("peft.utils.merge_utils")
    from posttrain.merging.ops import sign_consensus as _sign_consensus

    g = torch.Generator().manual_seed(n_models)
    taus = [torch.randn(4099, generator=g, dtype=dtype) for _ in range(n_models)]
    for i, tau in enumerate(taus):  # zeros (trimmed entries), negative zeros and ties in magnitude
        tau[i * 7 : i * 7 + 50] = 0.0
        tau[400 + i : 420] = -0.0
        tau[600:610] = 0.5 * (-1) ** i
    weights = [1.0, -0.7, 0.3, 2.0, 0.5, 1.5][:n_models]
    stacked = torch.stack([tau * w for tau, w in zip(taus, weights)], dim=0)
    mask = peft_merge.calculate_majority_sign_mask(stacked, method="total")
    expected = peft_merge.disjoint_merge(stacked, mask)
    got = _sign_consensus(taus, weights)
    assert got.dtype == expected.dtype
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))  # the same bits, signed zeros too


def test_dare_mask_is_the_bernoulli_stream_it_replaced() -> None:
    from posttrain.merging.ops import drop_random

    for dtype in (torch.float32, torch.float64):
        tau = torch.randn(10007, generator=torch.Generator().manual_seed(1), dtype=dtype)
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        expected = tau * torch.bernoulli(torch.full_like(tau, 0.3), generator=g1) / 0.3
        assert torch.equal(drop_random(tau, 0.3, g2).view(torch.uint8), expected.view(torch.uint8))
        assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))  # same draws consumed


def test_dare_with_numpy_generators_is_reproducible_and_slices_draw_the_same_masks() -> None:
    """The stage's generators (numpy PCG64, one per model): a merge in slices equals the whole-tensor merge,
    and each model keeps ~density of its entries, scaled by 1/density."""
    import numpy as np

    base = torch.zeros(10_001)
    models = [torch.randn(10_001, generator=gen(s)) for s in (1, 2)]

    def gens():
        return [np.random.Generator(np.random.PCG64(s)) for s in (11, 12)]

    whole = dare_linear(base, models, [1.0, 0.0], generator=gens(), density=0.3)
    g = gens()
    sliced = torch.cat([dare_linear(base[a:b], [m[a:b] for m in models], [1.0, 0.0], generator=g, density=0.3)
                        for a, b in [(0, 777), (777, 5000), (5000, 10_001)]])
    assert torch.equal(whole, sliced)
    assert torch.equal(whole, dare_linear(base, models, [1.0, 0.0], generator=gens(), density=0.3))
    kept = whole != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.025  # Binomial(10001, 0.3)/n: std 0.0046, 5σ
    torch.testing.assert_close(whole[kept], models[0][kept] / 0.3)


def test_trim_keeps_every_magnitude_tied_with_the_kth() -> None:
    from posttrain.merging.ops import trim_magnitude, trim_threshold

    tau = T(5, -3, 3, 1, -3, 0.5)  # k = floor(0.5 · 6) = 3: the 3rd largest magnitude is 3, held by three entries
    assert trim_threshold(tau, 0.5) == 3.0
    assert trim_magnitude(tau, 0.5).tolist() == [5.0, -3.0, 3.0, 0.0, -3.0, 0.0]
    assert trim_threshold(tau, 0.1) == float("inf")  # k = 0: nothing kept
    assert trim_magnitude(tau, 0.1).tolist() == [0.0] * 6


def test_scratch_buffers_give_the_same_bits_as_fresh_tensors() -> None:
    from posttrain.merging.ops import Scratch

    base = torch.randn(300, generator=gen(1))
    models = [base + 0.1 * torch.randn(300, generator=gen(s)) for s in (2, 3, 4)]
    scratch = Scratch()
    for fn, kw in [(task_arithmetic, {}), (ties, {"density": 0.3}), (dare_ties, {"density": 0.5}),
                   (dare_linear, {"density": 0.5}), (linear, {})]:
        for _ in range(2):  # the second call reuses the buffers of the first
            fresh = fn(base, models, [0.5, 1.0, -0.3], generator=gen(9), **kw)
            reused = fn(base, models, [0.5, 1.0, -0.3], generator=gen(9), scratch=scratch, **kw)
            assert torch.equal(fresh.view(torch.uint8), reused.view(torch.uint8)), fn.__name__


def test_slerp_is_the_closed_form_on_the_great_circle():
    """SLERP (Shoemake 1985): for θ_0 and θ_1 at angle Ω, sin((1−t)Ω)/sin Ω·θ_0 + sin(tΩ)/sin Ω·θ_1. Two
    orthogonal tensors of norms 1 and 2 (Ω = π/2) give cos(πt/2)·θ_0 + sin(πt/2)·θ_1; t = 0 and 1 are the ends."""
    from posttrain.merging.methods import slerp

    assert MERGE_METHODS.get("slerp") is slerp
    v0 = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    v1 = torch.tensor([[0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    for t in (0.0, 0.25, 0.5, 1.0):
        got = slerp(v0, [v1], [1.0], t=t, dtype=torch.float64)
        expected = math.cos(math.pi * t / 2) * v0 + math.sin(math.pi * t / 2) * v1
        assert got.shape == v0.shape and torch.allclose(got, expected, rtol=0, atol=1e-15), (t, got)
    # A general angle: 60 degrees between unit vectors scaled by 3 and 5.
    a = torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)
    b = 5 * torch.tensor([0.5, math.sqrt(3) / 2, 0.0], dtype=torch.float64)
    omega, t = math.pi / 3, 0.3
    expected = math.sin((1 - t) * omega) / math.sin(omega) * a + math.sin(t * omega) / math.sin(omega) * b
    assert torch.allclose(slerp(a, [b], [1.0], t=t, dtype=torch.float64), expected, rtol=0, atol=1e-14)


def test_slerp_of_nearly_parallel_tensors_is_linear_and_it_takes_one_model():
    from posttrain.merging.methods import slerp

    a = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    b = 2 * a + 1e-6  # cos Ω > 0.9995: sin Ω is too small to divide by
    assert torch.equal(slerp(a, [b], [1.0], t=0.25, dtype=torch.float64), torch.lerp(a, b, 0.25))
    with pytest.raises(ValueError, match="one model"):
        slerp(a, [b, b], [1.0, 1.0], t=0.5)
    with pytest.raises(ValueError, match=r"t must be in \[0, 1\]"):
        slerp(a, [b], [1.0], t=1.5)


def test_readme_lists_every_merge_method_with_its_parameters():
    """README's merge-method table names each registered method and its keyword parameters (a new method
    without a row, or a renamed parameter, fails here)."""
    import inspect
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]*) \|", readme, re.M))
    stage_set = {"generator", "dtype", "scratch", "thresholds", "row_length", "stats"}
    for name in MERGE_METHODS.names():
        params = [p for p, v in inspect.signature(MERGE_METHODS.get(name)).parameters.items()
                  if v.kind is inspect.Parameter.KEYWORD_ONLY and p not in stage_set]
        assert name in rows, f"README has no row for merge method {name!r}"
        assert re.findall(r"`(\w+)`", rows[name]) == params, (name, rows[name])
