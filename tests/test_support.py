"""The random support: uniform, without replacement, reproducible, different per layer, int32."""

from __future__ import annotations

import types

import pytest
import torch

from peft_sltrain import support
from peft_sltrain.support import check_support, layer_seed, num_nonzeros, random_support, support_fingerprint


def test_num_nonzeros_rounds_and_keeps_one():
    assert num_nonzeros(4096, 11008, 0.05) == 2254438
    assert num_nonzeros(10, 10, 0.034) == 3
    assert num_nonzeros(10, 10, 0.036) == 4  # 3.6: rounded, not truncated
    assert num_nonzeros(2, 2, 0.01) == 1


@pytest.mark.parametrize(
    "shape,nnz", [((7, 9), 1), ((7, 9), 20), ((7, 9), 32), ((7, 9), 62), ((7, 9), 63), ((300, 200), 1800),
                  ((300, 200), 59_400)],
)  # fmt: skip
def test_support_is_sorted_distinct_in_range(shape, nnz):
    idx = random_support(*shape, nnz, seed=3)
    assert idx.dtype == torch.int32 and idx.numel() == nnz
    assert idx.unique().numel() == nnz and torch.equal(idx, idx.sort().values)
    assert int(idx.min()) >= 0 and int(idx.max()) < shape[0] * shape[1]
    check_support(idx, *shape, nnz, name="idx")  # accepted by the loader's validation


def test_support_is_reproducible_and_differs_between_layers():
    a = random_support(64, 64, 100, seed=layer_seed(0, "model.layers.0.q_proj"))
    b = random_support(64, 64, 100, seed=layer_seed(0, "model.layers.0.q_proj"))
    c = random_support(64, 64, 100, seed=layer_seed(0, "model.layers.0.k_proj"))
    d = random_support(64, 64, 100, seed=layer_seed(1, "model.layers.0.q_proj"))
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_supports_seeds_and_fingerprints_are_pinned():
    """Golden values, from torch 2.13's CPU generator. An adapter saved with `save_support=False` holds only each
    layer's fingerprint and is loaded by regenerating its supports from the seed and the layer names: changing any of
    these values (the draw, the seed derivation, the hash) makes every such saved adapter unloadable, and changes which
    support a given `seed` means. Change them only with a way to read the old adapters."""
    seed = layer_seed(0, "model.layers.0.self_attn.q_proj")
    assert seed == 9201505447314264167
    sparse = random_support(64, 48, 100, seed=seed)  # below half density: the kept entries are drawn
    assert sparse[:6].tolist() == [47, 67, 78, 143, 203, 218] and sparse[-3:].tolist() == [2870, 2907, 2914]
    assert support_fingerprint(sparse).tolist() == [-2660016408135476878]
    dense = random_support(7, 9, 50, seed=3)  # above half density: the 13 left-out entries are drawn
    assert dense[:6].tolist() == [0, 2, 3, 5, 6, 7]
    assert support_fingerprint(dense).tolist() == [-3133237623409584014]


@pytest.mark.parametrize("nnz", [5, 15])  # 15 of 20: above half density, the left-out entries are drawn
def test_support_is_uniform(nnz):
    """Each of n positions is chosen with probability nnz / n; over 4000 draws the counts stay within 5 sigma."""
    n, draws = 20, 4000
    counts = torch.zeros(n)
    for seed in range(draws):
        counts[random_support(4, 5, nnz, seed=seed).long()] += 1
    p = nnz / n
    mean, sigma = draws * p, (draws * p * (1 - p)) ** 0.5
    assert (counts - mean).abs().max() < 5 * sigma


def test_the_draw_tops_up_when_too_few_distinct_positions_came(monkeypatch):
    """`_uniform_subset` draws about as many positions as `k` distinct ones need, and more while it has too few:
    rare at real shapes (never at the test shapes), forced here by leaving out the expected count (64 draws only)."""
    monkeypatch.setattr(support, "math", types.SimpleNamespace(log1p=lambda v: 0.0))
    for n, k in [(200, 100), (10_000, 3_000)]:
        subset = support._uniform_subset(n, k, torch.Generator().manual_seed(0))
        assert subset.numel() == k and subset.unique().numel() == k
        assert int(subset.min()) >= 0 and int(subset.max()) < n
        assert abs((subset < n // 2).double().mean().item() - 0.5) < 0.15  # both halves (4 sigma at k = 100; seeded)
    check_support(random_support(100, 100, 3_000, seed=1), 100, 100, 3_000, name="s")


def test_support_is_drawn_on_the_cpu_whatever_the_default_device():
    """A model built under `torch.device("cuda")` (or meta) draws the same support as on the CPU, where the seeded
    generator lives; the layer moves it where it belongs."""
    expected = random_support(64, 48, 100, seed=7)
    with torch.device("meta"):
        drawn = random_support(64, 48, 100, seed=7), random_support(64, 48, 3000, seed=7), random_support(8, 8, 64, 7)
    assert all(t.device.type == "cpu" for t in drawn)
    assert torch.equal(drawn[0], expected) and torch.equal(drawn[1], random_support(64, 48, 3000, seed=7))


def test_check_support_rejects_corruption():
    good = torch.tensor([1, 4, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match="strictly increasing"):
        check_support(torch.tensor([4, 1, 7], dtype=torch.int32), 3, 3, 3, name="s")
    with pytest.raises(ValueError, match="strictly increasing"):
        check_support(torch.tensor([1, 4, 4], dtype=torch.int32), 3, 3, 3, name="s")  # sorted, with a repeat
    with pytest.raises(ValueError, match="outside"):
        check_support(torch.tensor([1, 4, 9], dtype=torch.int32), 3, 3, 3, name="s")
    with pytest.raises(ValueError, match="int32"):
        check_support(good.long(), 3, 3, 3, name="s")
    with pytest.raises(ValueError, match="int32"):
        check_support(good, 3, 3, 4, name="s")


def test_random_support_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`nnz`"):
        random_support(3, 3, 10, seed=0)
    with pytest.raises(ValueError, match="int32"):
        random_support(2**16, 2**16, 10, seed=0)


def test_a_support_at_exactly_half_density_is_pinned():
    """At exactly half density (`sparsity=0.5` on an even layer) the kept entries are drawn (the complement is
    drawn only above half): pinned, like the other golden values, because a `save_support=False` adapter regenerates
    its supports from the seed."""
    support = random_support(4, 6, 12, seed=3)
    assert support.tolist() == HALF_DENSITY_SUPPORT
    assert support_fingerprint(support).tolist() == HALF_DENSITY_FINGERPRINT


HALF_DENSITY_SUPPORT = [1, 4, 6, 8, 9, 11, 14, 16, 18, 19, 21, 23]  # torch 2.13's CPU generator
HALF_DENSITY_FINGERPRINT = [7465442259198090342]


def test_a_support_just_above_half_density_is_pinned():
    """Just above half density (one entry over, odd and even n) the left-out entries are drawn: pinned like the other
    golden values, since a `save_support=False` adapter regenerates its supports from the seed (the other tests pin
    exactly half, where the kept entries are drawn, and 50 of 63, well above)."""
    odd = random_support(7, 9, 32, seed=3)  # n = 63, nnz = 32: 2 * nnz = n + 1
    assert odd.tolist()[:8] == [0, 2, 3, 4, 5, 6, 9, 10]
    assert support_fingerprint(odd).tolist() == [3750715755764892032]
    even = random_support(5, 5, 13, seed=3)  # n = 25, nnz = 13
    assert even.tolist() == [1, 2, 3, 4, 6, 8, 10, 11, 12, 14, 15, 19, 21]
    assert support_fingerprint(even).tolist() == [6222350492143186509]
