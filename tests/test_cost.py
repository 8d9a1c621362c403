"""The cost model that picks the dense or the factored path, and the `compute` setting that can force either."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

import peft_sltrain.layer as layer_module
from peft_sltrain import SLTrainConfig, SLTrainLayer, cost, cpu_kernels
from peft_sltrain.cost import choose_path, dense_cost, factored_cost, sparse_relative_cost

from conftest import perturb_trainable, tiny_llama

ROOT = Path(__file__).resolve().parent.parent

CPU = torch.device("cpu")


@pytest.fixture
def torch_kernels(monkeypatch):
    """The factored path on PyTorch's CSR kernels, as without numba installed."""
    monkeypatch.setattr(cpu_kernels, "AVAILABLE", False)


# numba not installed (its own package hidden), and an empty directory `numba` on the path; then a factored call
NO_NUMBA_BUT_A_DIRECTORY = """
import sys, torch
from importlib.machinery import PathFinder
class OnlyTheDirectory:  # finds `numba` in the given directory alone, as if numba were not installed
    def find_spec(self, name, path=None, target=None):
        return PathFinder.find_spec(name, [sys.argv[1]]) if name == "numba" else None
sys.meta_path.insert(0, OnlyTheDirectory())
from peft_sltrain import cpu_kernels, functional
x, A, B = torch.randn(8, 16), torch.randn(4, 16, requires_grad=True), torch.randn(16, 4)
indices, values = torch.tensor([3, 40, 200], dtype=torch.int32), torch.randn(3)
functional.sltrain_linear(x, A, B, values, indices, scaling=1.0, path="factored").sum().backward()
print(cpu_kernels.AVAILABLE)
"""


def test_a_directory_named_numba_is_not_numba(tmp_path):
    """A numba cache directory named `numba` beside a script is importable as a namespace package: without numba
    installed, the kernels must not count as available (every layer call failed on `numba.config`)."""
    (tmp_path / "numba").mkdir()
    code = NO_NUMBA_BUT_A_DIRECTORY
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stderr[-2000:]
    assert not cpu_kernels.installed("no_such_module_anywhere") and cpu_kernels.installed("numpy")


@pytest.fixture
def numba_kernels():
    if not cpu_kernels.AVAILABLE:
        pytest.skip("numba is not installed")


def pick(n=4096, d=1024, r=256, sparsity=0.03, dtype=torch.float32, weight=False, compute="auto"):
    # a square d x d layer
    return choose_path(compute, n, d, d, r, int(sparsity * d * d), CPU, dtype, weight)


def test_costs_follow_the_flop_counts():
    assert dense_cost(10, 4, 6, 2) == 6 * 10 * 4 * 6 + 8 * 2 * 4 * 6
    assert factored_cost(10, 4, 6, 2, 5, kappa=3.0, has_weight=False) == 2 * 10 * 2 * (18 + 16) + 3 * 6 * 10 * 5
    assert factored_cost(10, 4, 6, 2, 5, 3.0, True) - factored_cost(10, 4, 6, 2, 5, 3.0, False) == 4 * 10 * 4 * 6


def test_auto_prefers_factored_for_small_rank_and_sparsity_and_dense_otherwise(torch_kernels):
    assert pick(r=16, sparsity=0.001) == "factored"
    assert pick(r=512, sparsity=0.1) == "dense"
    # with a frozen W0 the factored path still pays two dense GEMMs (forward, dX) but skips dW = dY^T X: only a
    # cheap low-rank plus sparse part keeps it ahead, and W0 turns the paper's r = d / 4 over to the dense path
    assert pick(d=4096, r=16, sparsity=0.001, weight=True) == "factored"
    assert pick(r=256, sparsity=0.03) == "factored"
    assert pick(r=256, sparsity=0.03, weight=True) == "dense"
    assert pick(d=4096, r=16, sparsity=0.1, weight=True) == "dense"
    assert pick(r=16, sparsity=0.001, dtype=torch.bfloat16) == "dense"  # PyTorch has no CPU sparse kernels for bf16


def test_forced_paths_and_bad_values():
    assert pick(r=512, sparsity=0.1, compute="factored") == "factored"
    assert pick(r=16, sparsity=0.001, compute="dense") == "dense"
    with pytest.raises(ValueError, match="`compute='factored'` needs sparse kernels for torch.float16 on cpu"):
        pick(dtype=torch.float16, compute="factored")  # no kernel set has fp16 on CPU
    with pytest.raises(ValueError, match="`compute` must be one of"):
        SLTrainConfig(compute="fast")
    for bad in ({"n": -5}, {"r": 0}, {"nnz": 10**9}):
        args = {"n": 4096, "r": 8, "nnz": 100} | bad
        with pytest.raises(ValueError, match=r"`choose_path` needs n >= 0, r >= 1 and nnz in \[0, d_in \* d_out\]"):
            choose_path("auto", d_in=512, d_out=512, device=torch.device("cpu"), dtype=torch.float32,
                        has_weight=False, **args)  # fmt: skip
    args = {"n": 4096, "d_in": 512, "d_out": 512, "r": 8, "nnz": 100, "dtype": torch.float32, "has_weight": False}
    assert choose_path("auto", device="cpu", **args) == choose_path("auto", device=torch.device("cpu"), **args)


def test_meta_device_and_torch_export_take_the_dense_path(monkeypatch):
    """On meta only shapes are computed (no kernel runs), even where factored is forced; under `torch.export` the
    layers run in plain ops whatever the path, and no kernel is probed while tracing."""
    args = {"n": 4096, "d_in": 1024, "d_out": 1024, "r": 16, "nnz": 1000, "dtype": torch.float32, "has_weight": False}
    assert choose_path("factored", device=torch.device("meta"), **args) == "dense"
    assert choose_path("auto", device=CPU, **args) == "factored"
    monkeypatch.setattr(cost, "exporting", lambda: True)
    monkeypatch.setattr(cost, "_KERNELS_RUN", {})
    for compute in cost.COMPUTE_CHOICES:
        assert choose_path(compute, device=CPU, **args) == "dense"
    assert cost._KERNELS_RUN == {}


def test_the_kernel_probe_answers_alike_under_a_torch_func_transform(monkeypatch):
    """The probe keeps its first answer: asked first inside `torch.func.grad` (where sparse ops fail), it must still
    find the kernels that run outside."""
    monkeypatch.setattr(cost, "_KERNELS_RUN", {})
    answers = []

    def f(x):
        answers.append(cost._sparse_kernels_run(CPU, torch.float64))
        return x.sum()

    torch.func.grad(f)(torch.ones(2))
    assert answers == [True] and cost._KERNELS_RUN == {(CPU, torch.float64): True}


def test_narrow_layers_pay_relatively_more_for_transposed_copies(torch_kernels):
    # the transposed copies cost N (3 d_in + 2 d_out) numbers, a larger share of a narrow layer's work
    copies = factored_cost(10, 4, 6, 2, 5, 3.0, False, tau=2.0) - factored_cost(10, 4, 6, 2, 5, 3.0, False)
    assert copies == 2.0 * 10 * (3 * 4 + 2 * 6)
    # the tiny LLaMA's projections (d = 128, r = 32, delta = 0.03) are too narrow for the factored path on CPU
    assert choose_path("auto", 4096, 128, 344, 32, round(0.03 * 128 * 344), CPU, torch.float32, False) == "dense"
    assert choose_path("auto", 4096, 344, 128, 32, round(0.03 * 128 * 344), CPU, torch.float32, False) == "dense"
    # 350M's up projection at the paper's r = 256 measured 0.6x the dense path's time on the factored one
    assert choose_path("auto", 4096, 1024, 2736, 256, round(0.03 * 1024 * 2736), CPU, torch.float32, False) == (
        "factored"
    )
    # kappa's short-row term: sparse kernels are least efficient on short rows
    assert sparse_relative_cost(CPU, torch.float32, 4 * 128, 128) > sparse_relative_cost(
        CPU, torch.float32, 300 * 4096, 4096
    )


def test_dtypes_without_sparse_kernels_take_the_dense_path(monkeypatch, torch_kernels):
    """Whether the kernels exist is probed, not assumed: a (device, dtype) pair the cost model knows still goes
    dense when PyTorch cannot run its sparse products (bf16 on CPU here; CUDA's guessed bf16 entry relies on it)."""
    monkeypatch.setitem(cost.SPARSE_RELATIVE_COST, ("cpu", torch.bfloat16), (1.0, 0.0, 0.0))
    assert cost.factored_supported(CPU, torch.float32)
    assert not cost.factored_supported(CPU, torch.bfloat16)
    assert pick(r=16, sparsity=0.001, dtype=torch.bfloat16) == "dense"
    with pytest.raises(ValueError, match=r"PyTorch lacks \(numba's CPU kernels would cover it: `pip install"):
        pick(r=16, sparsity=0.001, dtype=torch.bfloat16, compute="factored")  # numba is "not installed" here


def test_numba_kernels_have_their_own_constants(numba_kernels, monkeypatch):
    """Where numba's kernels run (CPU, fp32/fp64/bf16) the model uses their fitted constants; fp16 goes dense."""
    assert cost.relative_costs(CPU, torch.float32) == cost.NUMBA_RELATIVE_COST[torch.float32]
    assert cost.relative_costs(CPU, torch.bfloat16) == cost.NUMBA_RELATIVE_COST[torch.bfloat16]
    assert cost.factored_supported(CPU, torch.float64) and cost.factored_supported(CPU, torch.bfloat16)
    assert pick(r=16, sparsity=0.001, dtype=torch.float16) == "dense"
    with pytest.raises(ValueError, match="numba's CPU kernels cover only float32, float64 and bfloat16"):
        pick(dtype=torch.float16, compute="factored")
    with pytest.raises(
        ValueError, match="for torch.float32 on meta, which PyTorch lacks \\(numba's kernels run on CPU"
    ):
        cost.check_factored_supported(torch.device("meta"), torch.float32)  # (choose_path goes dense on meta)
    monkeypatch.setattr(cpu_kernels, "AVAILABLE", False)
    assert cost.relative_costs(CPU, torch.float32) == cost.SPARSE_RELATIVE_COST[("cpu", torch.float32)]


def test_numba_kernels_send_llama_layers_factored(numba_kernels):
    """With numba's kernels the factored path measured faster than the dense path at every LLaMA shape, the tiny
    preset's 128 x 344 included (benchmarks/results/layer_cpu.json); the model agrees."""
    for (d_in, d_out), r, sparsity in [((128, 344), 32, 0.03), ((344, 128), 32, 0.03), ((512, 512), 128, 0.03),
                                       ((512, 1376), 128, 0.03), ((1376, 512), 128, 0.03)]:  # fmt: skip
        nnz = round(sparsity * d_in * d_out)
        assert choose_path("auto", 2048, d_in, d_out, r, nnz, CPU, torch.float32, False) == "factored"
    # a dense support (delta = 0.3) or a rank of half the width still goes dense
    assert pick(r=256, sparsity=0.3) == "dense"
    assert pick(r=512, sparsity=0.03) == "dense"


def test_bf16_numba_choices_follow_the_measurements(numba_kernels):
    """CPU bf16 (benchmarks/results/layer_cpu_bf16.json): the factored path measured 0.78x the dense path's time at
    512 x 1376 and 1.52x at 128 x 344; the model sends the former factored and the latter dense."""
    bf16 = torch.bfloat16
    assert choose_path("auto", 2048, 512, 1376, 128, round(0.03 * 512 * 1376), CPU, bf16, False) == "factored"
    assert choose_path("auto", 2048, 128, 344, 32, round(0.03 * 128 * 344), CPU, bf16, False) == "dense"


@pytest.mark.parametrize("from_scratch", [False, True])
def test_models_agree_across_compute_settings(input_ids, from_scratch):
    outputs, grads = {}, {}
    for compute in ("dense", "factored", "auto"):
        model = get_peft_model(
            tiny_llama(), SLTrainConfig(r=4, sparsity=0.05, from_scratch=from_scratch, compute=compute)
        )
        perturb_trainable(model, seed=3)
        assert all(m.compute["default"] == compute for m in model.modules() if isinstance(m, SLTrainLayer))
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        outputs[compute] = loss.detach()
        grads[compute] = [p.grad for p in model.parameters() if p.grad is not None]
    for compute in ("factored", "auto"):
        torch.testing.assert_close(outputs[compute], outputs["dense"], rtol=1e-5, atol=1e-6)
        for g, g_ref in zip(grads[compute], grads["dense"]):
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_models_agree_across_compute_settings(numba_kernels, input_ids):
    """Under CPU bf16 autocast the factored path runs on numba's bf16 kernels: the loss and the gradients of the
    adapters (fp32 parameters) agree with the dense path's within bf16's precision."""
    results = {}
    for compute in ("dense", "factored"):
        model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05, from_scratch=True, compute=compute))
        perturb_trainable(model, seed=3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if "sltrain_" in n}
        assert grads and all(g.dtype == torch.float32 for g in grads.values())
        results[compute] = (loss.detach(), grads)
    (loss_d, grads_d), (loss_f, grads_f) = results["dense"], results["factored"]
    torch.testing.assert_close(loss_f, loss_d, rtol=0.02, atol=0.0)
    for name, g in grads_d.items():
        torch.testing.assert_close(grads_f[name], g, rtol=0.05, atol=0.05 * g.abs().max().item())


def test_the_short_row_term_counts_nonzeros_per_row_of_s(monkeypatch):
    """kappa's short-row term is per row of S (d_out rows): with constants where only that term counts, a tall layer
    (one nonzero per row) goes dense and its transpose (16 per row) factored."""
    monkeypatch.setattr(cpu_kernels, "AVAILABLE", False)
    monkeypatch.setitem(cost.SPARSE_RELATIVE_COST, ("cpu", torch.float32), (0.0, 500.0, 0.0))
    assert cost.sparse_relative_cost(CPU, torch.float32, 1024, 1024) == 500.0
    assert choose_path("auto", 2048, 64, 1024, 1, 1024, CPU, torch.float32, False) == "dense"
    assert choose_path("auto", 2048, 1024, 64, 1, 1024, CPU, torch.float32, False) == "factored"


def test_the_kernel_probe_answers_alike_under_autocast(monkeypatch):
    """Asked first under bf16 autocast (which would turn the probe's fp32 products bf16, which PyTorch's CSR kernels
    lack), the probe still finds the fp32 kernels, and keeps that answer."""
    monkeypatch.setattr(cpu_kernels, "AVAILABLE", False)
    monkeypatch.setattr(cost, "_KERNELS_RUN", {})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cost.factored_supported(CPU, torch.float32)
    assert cost._KERNELS_RUN == {(CPU, torch.float32): True}


def test_layers_price_a_call_by_its_tokens_and_frozen_weight(monkeypatch):
    """The cost model gets the call's tokens (batch x sequence, not its first dimension) and whether W0 is in it:
    the outputs agree on both paths, so only this shows that a layer asks about the right call."""
    seen, real = [], layer_module.choose_path

    def record(*args, **kwargs):
        seen.append((kwargs["n"], kwargs["has_weight"], kwargs["backward"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(layer_module, "choose_path", record)
    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05))
    model(input_ids=torch.zeros(3, 7, dtype=torch.long))
    assert seen and set(seen) == {(3 * 7, True, True)}
    seen.clear()
    with torch.no_grad():  # no backward follows: forward-only costs
        model(input_ids=torch.zeros(2, 5, dtype=torch.long))
    assert seen and set(seen) == {(2 * 5, True, False)}
    seen.clear()
    with torch.no_grad():  # in training mode one may (reentrant checkpointing's first forward): the same path as later
        model.train()(input_ids=torch.zeros(2, 5, dtype=torch.long))
    assert seen and set(seen) == {(2 * 5, True, True)}
    model.eval()
    seen.clear()
    model.requires_grad_(False)  # frozen, as loaded for inference: the same path as trainable (the same bits)
    model(input_ids=torch.zeros(2, 5, dtype=torch.long))
    assert seen and set(seen) == {(2 * 5, True, True)}
    seen.clear()  # from scratch there is no W0 to price
    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05, from_scratch=True))
    model(input_ids=torch.zeros(2, 5, dtype=torch.long))
    assert seen and set(seen) == {(2 * 5, False, True)}


def test_forward_only_costs(numba_kernels):
    """Without a backward, the dense path is one GEMM plus B @ A, the factored one its forward products: with a frozen
    W0 it then loses where it wins a training call (it saves only the backward's dW), from scratch it still wins."""
    assert dense_cost(10, 4, 6, 2, backward=False) == 2 * 10 * 4 * 6 + 2 * 2 * 4 * 6
    assert factored_cost(10, 4, 6, 2, 5, 3.0, False, tau=2.0, backward=False) == (
        2 * 10 * 2 * (6 + 4) + 3.0 * 2 * 10 * 5 + 2.0 * 10 * (4 + 6)
    )
    assert (
        factored_cost(10, 4, 6, 2, 5, 3.0, True, backward=False)
        - factored_cost(10, 4, 6, 2, 5, 3.0, False, backward=False)
        == 2 * 10 * 4 * 6
    )
    wide = (2048, 4096, 4096, 8, round(0.05 * 4096 * 4096), CPU, torch.float32)
    assert choose_path("auto", *wide, has_weight=True) == "factored"
    assert choose_path("auto", *wide, has_weight=True, backward=False) == "dense"
    scratch = (2048, 512, 1376, 128, round(0.03 * 512 * 1376), CPU, torch.float32, False)
    assert choose_path("auto", *scratch) == choose_path("auto", *scratch, backward=False) == "factored"


def test_bf16_numba_model_predicts_the_ratios_it_was_fitted_to(numba_kernels):
    """As cost.py says the fit predicts: factored / dense time 1.47 at 128 x 344 (r 32) and 1.01 at 512 x 512
    (r 128), at 3% and 2048 tokens."""
    bf16 = torch.bfloat16
    for d_in, d_out, r, expected in [(128, 344, 32, 1.47), (512, 512, 128, 1.01)]:
        nnz = round(0.03 * d_in * d_out)
        kappa, tau = sparse_relative_cost(CPU, bf16, nnz, d_out), cost.relative_costs(CPU, bf16)[2]
        ratio = factored_cost(2048, d_in, d_out, r, nnz, kappa, False, tau) / dense_cost(2048, d_in, d_out, r)
        assert ratio == pytest.approx(expected, abs=0.01)
