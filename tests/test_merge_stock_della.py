"""model_stock and DELLA against numpy implementations of their papers' formulas written here (not posttrain's
code), DELLA's seeded drops reproducible and unchanged by slicing, per-model parameter lists, the `normalize`
divisor of the sign-electing methods, and both methods streamed by the merge stage."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from posttrain.config import ConfigError, stage_pipeline
from posttrain.merging.methods import dare_ties, della, model_stock, ties
from posttrain.merging.ops import sign_consensus
from posttrain.merging.stream import model_generators
from posttrain.registry import MERGE_METHODS
from tests.conftest import load_tensors
from tests.test_merge_stage import make_ctx, merge, models_

F64 = torch.float64


def np_model_stock(base: np.ndarray, models: list[np.ndarray]) -> np.ndarray:
    """Jang et al. 2024, eq. for k models: t = k·cos θ / (1 + (k − 1)·cos θ), θ the angle between task vectors
    (the mean pairwise cosine for k > 2), merged = t·mean(θ_i) + (1 − t)·θ_0."""
    taus = [(m - base).ravel() for m in models]
    k = len(taus)
    cos = np.mean([taus[i] @ taus[j] / (np.linalg.norm(taus[i]) * np.linalg.norm(taus[j]))
                   for i in range(k) for j in range(i + 1, k)])
    t = k * cos / (1 + (k - 1) * cos)
    return t * np.mean(models, axis=0) + (1 - t) * base


def np_della(base, models, weights, rngs, density, epsilon, lam):
    """Deep et al. 2024 in mergekit's parameters: per row, keep probability density − ε + 2ε·r/(n − 1) for the
    entry of ascending magnitude rank r, survivors divided by it; TIES sign election on the weighted vectors
    and the mean of the agreeing entries; base + lam·that."""
    row = base.shape[-1]
    pruned = []
    for m, w, rng in zip(models, weights, rngs):
        tau = (m - base).reshape(-1, row)
        rank = np.argsort(np.argsort(np.abs(tau), axis=1, kind="stable"), axis=1, kind="stable")
        keep_p = density - epsilon + 2 * epsilon * rank / (row - 1)
        u = rng.random(tau.size).reshape(tau.shape)
        pruned.append(w * np.where(u < keep_p, tau / keep_p, 0.0).reshape(base.shape))
    x = np.stack(pruned)
    elected = np.where(x.sum(axis=0) >= 0, 1.0, -1.0)
    agree = x * elected > 0
    return base + lam * (x * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)


def rngs(*seeds: int) -> list[np.random.Generator]:
    return [np.random.Generator(np.random.PCG64(s)) for s in seeds]


def rand(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ------------------------------------------------------------------------------------------------ model_stock


def test_model_stock_two_unit_task_vectors_at_60_degrees_give_t_two_thirds():
    """cos θ = 1/2, k = 2: t = 2·(1/2) / (1 + 1/2) = 2/3; merged = 2/3·mean(θ_1, θ_2) + 1/3·θ_0."""
    base = torch.tensor([1.0, 2.0, 0.0], dtype=F64)
    a = base + torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    b = base + torch.tensor([0.5, math.sqrt(3) / 2, 0.0], dtype=F64)
    got = model_stock(base, [a, b], [1.0, 1.0], dtype=F64)
    expected = 2 / 3 * (a + b) / 2 + 1 / 3 * base
    assert torch.allclose(got, expected, rtol=0, atol=1e-15)


def test_model_stock_orthogonal_task_vectors_give_the_base_and_equal_ones_the_mean():
    base = rand((4, 6), 0)
    tau = torch.zeros(4, 6, dtype=F64)
    tau[0, 0], other = 1.0, torch.zeros(4, 6, dtype=F64)
    other[1, 1] = 3.0
    assert torch.allclose(model_stock(base, [base + tau, base + other], [1, 1], dtype=F64), base, atol=1e-15)
    same = [base + 2 * tau, base + 2 * tau, base + 2 * tau]  # cos 1: t = 1, the mean (the fine-tuned model)
    assert torch.allclose(model_stock(base, same, [1, 1, 1], dtype=F64), base + 2 * tau, atol=1e-15)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_model_stock_matches_the_paper_formula_in_numpy(k):
    base = rand((8, 5), 0)
    shared = rand((8, 5), 1, 0.1)  # a common direction: the cosines are well away from 0
    models = [base + shared + rand((8, 5), 10 + i, 0.05) for i in range(k)]
    got = model_stock(base, models, [1.0] * k, dtype=F64)
    expected = np_model_stock(base.numpy(), [m.numpy() for m in models])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-14)
    assert got.shape == base.shape


def test_model_stock_refuses_weights_and_a_single_model():
    base, a, b = rand((3,), 0), rand((3,), 1), rand((3,), 2)
    with pytest.raises(ValueError, match="model_stock takes no weights"):
        model_stock(base, [a, b], [0.5, 1.0])
    with pytest.raises(ValueError, match="at least 2 fine-tuned models"):
        model_stock(base, [a, b], [1.0, 0.0])


# ------------------------------------------------------------------------------------------------------ della


@pytest.mark.parametrize("density, epsilon, weights, lam", [(0.5, 0.15, [1.0, 1.0], 1.0),
                                                            (0.3, 0.2, [0.7, -0.4], 0.8),
                                                            (0.7, 0.05, [1.0, 2.0, 0.5], 1.0)])
def test_della_matches_the_paper_formula_in_numpy(density, epsilon, weights, lam):
    base = rand((6, 40), 0)
    models = [base + rand((6, 40), 1 + i, 0.1) for i in range(len(weights))]
    seeds = [11 + i for i in range(len(weights))]
    got = della(base, models, weights, generator=rngs(*seeds), density=density, epsilon=epsilon, lam=lam, dtype=F64)
    expected = np_della(base.numpy(), [m.numpy() for m in models], weights, rngs(*seeds), density, epsilon, lam)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-14)


def test_della_keeps_large_magnitudes_more_often_and_preserves_the_mean():
    """Keep rates at the two ends of each row's ranks are density ∓ epsilon; kept entries are τ/keep probability."""
    tau = torch.arange(1, 101, dtype=F64).repeat(2000, 1)  # rows 1..100: rank r is the entry r + 1
    got = della(torch.zeros_like(tau), [tau], [1.0], generator=rngs(3), density=0.5, epsilon=0.2, dtype=F64)
    kept = got != 0
    low, high = kept[:, :10].double().mean().item(), kept[:, -10:].double().mean().item()
    assert abs(low - (0.3 + 0.4 * 4.5 / 99)) < 0.02 and abs(high - (0.7 - 0.4 * 4.5 / 99)) < 0.02  # 5σ ≈ 0.016
    keep_p = 0.3 + 0.4 * torch.arange(100, dtype=F64) / 99
    assert torch.allclose(got[kept], (tau / keep_p)[kept], rtol=1e-15)
    assert abs(got.mean().item() / tau.mean().item() - 1) < 0.01  # E[τ̃] = τ


def test_della_with_epsilon_zero_is_dare_ties_bit_for_bit_and_density_one_draws_nothing():
    base = rand((5, 12), 0).float()
    models = [base + rand((5, 12), s, 0.1).float() for s in (1, 2)]
    got = della(base, models, [0.6, 0.9], generator=rngs(4, 5), density=0.4, epsilon=0.0)
    want = dare_ties(base, models, [0.6, 0.9], generator=rngs(4, 5), density=0.4)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    g = rngs(6)
    della(base, models[:1], [1.0], generator=g, density=1.0)
    assert g[0].random() == rngs(6)[0].random()  # no draw consumed
    assert torch.equal(della(base, models, [1.0, 1.0], density=1.0), ties(base, models, [1.0, 1.0], density=1.0))


def test_della_seeded_drops_are_reproducible_and_slicing_at_rows_draws_the_same():
    base = rand((30, 16), 0).float()
    models = [base + rand((30, 16), s, 0.1).float() for s in (1, 2)]
    whole = della(base, models, [1.0, 0.8], generator=rngs(7, 8), density=0.4, epsilon=0.1)
    assert torch.equal(whole, della(base, models, [1.0, 0.8], generator=rngs(7, 8), density=0.4, epsilon=0.1))
    assert not torch.equal(whole, della(base, models, [1.0, 0.8], generator=rngs(7, 9), density=0.4, epsilon=0.1))
    flat, g = base.reshape(-1), rngs(7, 8)
    parts = [(0, 48), (48, 160), (160, 480)]  # whole rows of 16, one generator per model running on
    sliced = torch.cat([della(flat[a:b], [m.reshape(-1)[a:b] for m in models], [1.0, 0.8], generator=g,
                              row_length=16, density=0.4, epsilon=0.1) for a, b in parts])
    assert torch.equal(sliced, whole.reshape(-1))


def test_row_ranks_are_a_stable_sort_in_float32_and_float64():
    """float32 ranks come from a sort of (bits, position) keys: the order of numpy's stable argsort, ties
    (equal magnitudes, zeros from both signed zeros, an infinity) by position."""
    from posttrain.merging.ops import row_ranks

    x = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    x[0, :10], x[1], x[2, ::3], x[3, 5] = 0.5, 0.0, -0.0, float("inf")
    mag = x.abs()
    expected = np.argsort(np.argsort(mag.numpy(), axis=1, kind="stable"), axis=1, kind="stable")
    for m in (mag, mag.double()):
        got = row_ranks(m, 50)
        assert got.dtype == m.dtype and np.array_equal(got.numpy().astype(np.int64), expected)
    assert np.array_equal(row_ranks(mag.reshape(-1), 25).numpy().astype(np.int64),
                          np.argsort(np.argsort(mag.reshape(12, 25).numpy(), axis=1, kind="stable"), axis=1))


@pytest.mark.parametrize("kw, message", [
    ({"density": 0.1, "epsilon": 0.1}, r"density ± epsilon must lie in \(0, 1\)"),
    ({"density": 0.9, "epsilon": 0.2}, "density ± epsilon"),
    ({"density": [0.5], "epsilon": 0.1}, "params.density: 1 values but 2 models"),
    ({"normalize": "mean"}, "normalize must be one of count, weights, none"),
])
def test_della_refuses_bad_parameters(kw, message):
    base = rand((4,), 0)
    with pytest.raises(ValueError, match=message):
        della(base, [base + 1, base - 1], [1.0, 1.0], generator=rngs(1, 2), **kw)


# -------------------------------------------------------------------------------- per-model lists, normalize


def test_ties_takes_one_density_per_model():
    """a keeps its top 2 of 4 (density 0.5), b its top 1 (0.25): τ_a = [4, −3, 0, 0], τ_b = [0, 0, 0, 4];
    elected signs [+, −, +, +]; disjoint mean [4, −3, 0, 4]."""
    base = torch.zeros(4)
    got = ties(base, [torch.tensor([4.0, -3, 2, 1]), torch.tensor([1.0, 2, -3, 4])], [1.0, 1.0], density=[0.5, 0.25])
    assert got.tolist() == [4.0, -3.0, 0.0, 4.0]
    same = [torch.tensor([4.0, -3, 2, 1]), torch.tensor([1.0, 2, -3, 4])]
    assert torch.equal(ties(base, same, [1.0, 1.0], density=[0.5, 0.5]), ties(base, same, [1.0, 1.0], density=0.5))


def test_normalize_divides_by_count_summed_weights_or_nothing():
    """x = w·τ: [2·1, 0.5·3, −1·1] at one entry, elected sign + (sum 2.5 ≥ 0): agreeing 2 and 1.5 (weights 2
    and 0.5). count: 3.5/2; weights (mergekit's normalize: true): 3.5/2.5; none: 3.5."""
    def taus():
        return [torch.tensor([v], dtype=F64) for v in (1.0, 3.0, 1.0)]

    w = [2.0, 0.5, -1.0]
    assert sign_consensus(taus(), w).item() == 3.5 / 2
    assert sign_consensus(taus(), w, normalize="weights").item() == 3.5 / 2.5
    assert sign_consensus(taus(), w, normalize="none").item() == 3.5
    zero = sign_consensus([torch.tensor([0.0]), torch.tensor([0.0])], [0.5, 0.5], normalize="weights")
    assert zero.item() == 0.0  # no model agrees: the divisor 0 becomes 1 (mergekit), not a NaN


@pytest.mark.parametrize("n", [2, 5])  # 5: sign_consensus sums a stack (posttrain.merging.ops), its other path
def test_normalize_weights_is_mergekits_divisor(n):
    """mergekit's GTA with consensus and normalize: Σ w_i·τ_i·m_i / Σ w_i·m_i, a divisor of 0 replaced by 1."""
    taus = [rand((200,), s) for s in range(n)]
    for t in taus:
        t[:20] = 0.0
    w = [1.5, -0.5, 0.7, 2.0, 0.3][:n]
    x = np.stack([wi * t.numpy() for wi, t in zip(w, taus)])
    mask = np.sign(x) == np.where(x.sum(axis=0) >= 0, 1.0, -1.0)
    divisor = (np.array(w)[:, None] * mask).sum(axis=0)
    divisor[divisor == 0] = 1
    got = sign_consensus([t.clone() for t in taus], w, normalize="weights")
    np.testing.assert_allclose(got.numpy(), (x * mask).sum(axis=0) / divisor, rtol=1e-12, atol=1e-15)


def test_a_per_model_list_of_the_wrong_length_is_one_config_error():
    with pytest.raises(ConfigError, match=r"params.density: 3 values but 2 models \(one per model\)") as e:
        stage_pipeline("merge", None, ["params.density=[0.2, 0.3, 0.4]"])
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------- merge stage


def test_stage_streams_della_in_whole_rows_and_gets_the_whole_tensor_bits(merge_trio, tmp_path, monkeypatch):
    """Slices of 24 elements: rows of 16 go one to a slice, rows of 32 (longer than a slice) one each, and every
    model's generator runs on: the bits of one whole-tensor call per name, in sorted-name order."""
    from posttrain.merging import stream

    monkeypatch.setattr(stream, "SLICE", 24)
    base, a, b = merge_trio
    params = {"density": [0.4, 0.6], "epsilon": 0.1, "normalize": "weights"}
    out = merge(make_ctx(tmp_path), method="della", base=str(base), models=models_((a, 0.6), (b, 0.5)),
                params=params, seed=4)
    got, tb, ta, tbb = load_tensors(out), load_tensors(base), load_tensors(a), load_tensors(b)
    gens = model_generators(4, 2)
    assert any(t.dim() == 2 and t.shape[-1] > 24 for t in tb.values())
    for name in sorted(tb):
        whole = della(tb[name], [ta[name], tbb[name]], [0.6, 0.5], generator=gens, **params)
        assert torch.equal(got[name].view(torch.uint8), whole.to(tb[name].dtype).view(torch.uint8)), name


@pytest.mark.parametrize("cache_bytes", [0, 2**30], ids=["read-twice", "read-once"])
def test_stage_merges_model_stock_with_the_whole_tensor_angle(merge_trio, tmp_path, monkeypatch, cache_bytes):
    """Default slices (every tiny tensor is one): the bits of a whole-tensor call; 40-element slices: the angle
    summed over slices, equal up to the rounding of those sums."""
    from posttrain.merging import stream

    monkeypatch.setattr(stream, "CACHE_BYTES", cache_bytes)
    base, a, b = merge_trio
    tb, ta, tbb = load_tensors(base), load_tensors(a), load_tensors(b)
    whole = {n: model_stock(tb[n], [ta[n], tbb[n]], [1.0, 1.0]) for n in tb}
    got = load_tensors(merge(make_ctx(tmp_path), method="model_stock", base=str(base), models=models_((a, 1), (b, 1))))
    for name in tb:
        assert torch.equal(got[name], whole[name].to(tb[name].dtype)), name
    monkeypatch.setattr(stream, "SLICE", 40)
    sliced = load_tensors(merge(make_ctx(tmp_path / "s"), method="model_stock", base=str(base),
                                models=models_((a, 1), (b, 1))))
    for name in tb:
        torch.testing.assert_close(sliced[name], whole[name], rtol=1e-5, atol=1e-6)
    assert MERGE_METHODS.get("model_stock").streaming == "stats" and MERGE_METHODS.get("della").streaming == "rows"
