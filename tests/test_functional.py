"""`sltrain_linear` against a plain dense PyTorch reference: outputs, gradients, memory contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from peft_sltrain import cpu_kernels, functional
from peft_sltrain.functional import dense_weight, sltrain_linear, sparse_csr_transposed, token_chunk
from peft_sltrain.support import random_support


def make_inputs(
    d_in=12, d_out=10, r=3, nnz=17, dtype=torch.float64, with_weight=True, with_bias=True, seed=0, batch=(2, 5)
):  # fmt: skip
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()

    return dict(
        x=rand(*batch, d_in),
        A=rand(r, d_in),
        B=rand(d_out, r),
        values=rand(nnz),
        indices=random_support(d_out, d_in, nnz, seed=seed),
        weight=rand(d_out, d_in) if with_weight else None,
        bias=rand(d_out) if with_bias else None,
    )


NAMES = ["x", "A", "B", "values", "weight", "bias"]  # the differentiable inputs

# On CPU the factored path runs its sparse products on numba's kernels where numba is installed (it is in the dev
# extras, so CI runs them) and on PyTorch's CSR kernels otherwise: both are tested.
NEEDS_NUMBA = pytest.mark.skipif(not cpu_kernels.AVAILABLE, reason="numba is not installed")
FACTORED = [pytest.param("factored-numba", marks=NEEDS_NUMBA), "factored-torch"]
IMPLEMENTATIONS = ["dense", *FACTORED]


@pytest.fixture
def path(request, monkeypatch):
    """The `path` argument for an implementation name, with the CPU kernel set it names selected."""
    implementation = request.param
    monkeypatch.setattr(cpu_kernels, "AVAILABLE", cpu_kernels.AVAILABLE and implementation != "factored-torch")
    return implementation.split("-")[0]


def clone_inputs(inputs: dict) -> dict:
    """An independent copy of `make_inputs`' result, with the same requires_grad flags."""
    return {
        k: (v.detach().clone().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v) for k, v in inputs.items()
    }


def reference(x, A, B, values, indices, weight, bias, scaling):
    """The plain dense formulation: build W with differentiable ops and call F.linear."""
    S = torch.zeros(B.shape[0] * A.shape[1], dtype=x.dtype).index_put((indices.long(),), values)
    W = scaling * B @ A + S.view(B.shape[0], A.shape[1])
    if weight is not None:
        W = W + weight
    return F.linear(x, W, bias)


def grads(out, tensors):
    out.backward(
        torch.ones_like(out) + torch.arange(out.numel(), dtype=out.dtype, device=out.device).view_as(out) / out.numel()
    )
    return [None if t is None else t.grad for t in tensors]


@pytest.mark.parametrize("path", IMPLEMENTATIONS, indirect=True)
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_float64(with_weight, with_bias, path):
    t = make_inputs(with_weight=with_weight, with_bias=with_bias)

    def fn(x, A, B, values, weight, bias):
        return sltrain_linear(x, A, B, values, t["indices"], scaling=0.7, weight=weight, bias=bias, path=path)

    assert torch.autograd.gradcheck(fn, (t["x"], t["A"], t["B"], t["values"], t["weight"], t["bias"]))


@pytest.mark.parametrize("path", IMPLEMENTATIONS, indirect=True)
@pytest.mark.parametrize("with_weight", [True, False])
def test_matches_dense_reference_fp32(with_weight, path):
    ours = make_inputs(dtype=torch.float32, with_weight=with_weight, d_in=48, d_out=40, r=8, nnz=60)
    ref = {
        k: (v.detach().clone().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v) for k, v in ours.items()
    }

    y = sltrain_linear(**ours, scaling=0.25, path=path)
    y_ref = reference(**ref, scaling=0.25)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads(y, [ours[n] for n in NAMES]), grads(y_ref, [ref[n] for n in NAMES])):
        if g_ref is not None:
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


# bf16 on CPU: PyTorch has no sparse kernels for it, numba's compute it in fp32
BF16_IMPLEMENTATIONS = ["dense", pytest.param("factored-numba", marks=NEEDS_NUMBA)]


@pytest.mark.parametrize("path", BF16_IMPLEMENTATIONS, indirect=True)
@pytest.mark.parametrize("with_weight", [True, False])
def test_bf16_within_tolerance_of_fp32(path, with_weight):
    """bf16 has an 8-bit mantissa: outputs and grads agree with fp32 to about 1% of their scale. 300 tokens: several
    of the kernels' token blocks, split over threads, and a partial one."""
    t32 = make_inputs(dtype=torch.float32, d_in=64, d_out=48, r=8, nnz=150, with_weight=with_weight, batch=(3, 100))
    t16 = {
        k: (v.detach().to(torch.bfloat16).requires_grad_() if torch.is_tensor(v) and v.is_floating_point() else v)
        for k, v in t32.items()
    }
    y32 = reference(**t32, scaling=0.5)
    y16 = sltrain_linear(**t16, scaling=0.5, path=path)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=0.02, atol=0.02 * y32.abs().max().item())
    for g16, g32 in zip(grads(y16, [t16[n] for n in NAMES]), grads(y32, [t32[n] for n in NAMES])):
        if g32 is None:  # no frozen weight
            assert g16 is None
            continue
        assert g16.dtype == torch.bfloat16
        torch.testing.assert_close(g16.float(), g32, rtol=0.02, atol=0.02 * g32.abs().max().item())


def test_saves_no_dense_weight_for_backward():
    """From scratch, nothing of shape (d_out, d_in) is kept between forward and backward."""
    t = make_inputs(dtype=torch.float32, with_weight=False, d_in=24, d_out=20, r=4, nnz=30)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: (saved.append(x), x)[1], lambda x: x):
        sltrain_linear(**t, scaling=1.0)
    assert saved, "the function should save its inputs"
    assert all(tuple(s.shape) != (20, 24) for s in saved)


@pytest.mark.parametrize(
    "path, autocast",  # under bf16 autocast: BF16_IMPLEMENTATIONS (PyTorch's CSR kernels have no bf16)
    [*((p, False) for p in ("dense", "factored-torch")), ("dense", True),
     *(pytest.param("factored-numba", a, marks=NEEDS_NUMBA) for a in (False, True))],
    indirect=["path"],
)  # fmt: skip
def test_fine_tuning_saves_only_the_frozen_weight_itself(path, autocast):
    """Of shape (d_out, d_in) only W0 itself is saved, also under autocast, where `nn.Linear` saves W0's bf16 copy: the
    map casts W0 again in backward instead."""
    t = make_inputs(dtype=torch.float32, d_in=24, d_out=20, r=4, nnz=30)
    t["weight"].requires_grad_(False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: (saved.append(x), x)[1], lambda x: x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = sltrain_linear(**t, scaling=1.0, path=path)
    dense = [s for s in saved if tuple(s.shape) == (20, 24)]
    assert len(dense) == 1 and dense[0].data_ptr() == t["weight"].data_ptr()  # a reference, not a copy
    ref = clone_inputs(t)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y_ref = reference(**ref, scaling=1.0)
    assert y.dtype == y_ref.dtype
    for g, g_ref in zip(grads(y.float(), [t[n] for n in ("x", "A", "B", "values")]),
                        grads(y_ref.float(), [ref[n] for n in ("x", "A", "B", "values")])):  # fmt: skip
        assert g.dtype == g_ref.dtype and ((g - g_ref).norm() / g_ref.norm()).item() < (0.02 if autocast else 1e-6)


def test_inference_tensors_are_cast_without_a_version():
    """Parameters made under `torch.inference_mode()` (an adapter loaded there) have no version counter: the dense
    path, which casts them for a bf16 input (fp32 adapter), must not read one."""
    with torch.inference_mode():
        t = make_inputs(dtype=torch.float32)
    with torch.no_grad():
        expected = reference(**t, scaling=0.5)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = sltrain_linear(**t, scaling=0.5, path="dense")
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), expected, rtol=0.05, atol=0.05)


def test_direct_calls_check_what_layers_guarantee():
    """`sltrain_linear` is public: shapes of `weight` and `bias`, the support's device and the factored path's dtype
    are checked up front, with the value, rather than failing in torch (some only in backward)."""
    t = make_inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"`bias` must be \(d_out,\) = \(10,\), got shape \(1, 10\)"):
        sltrain_linear(**(t | {"bias": t["bias"].detach()[None]}), scaling=0.5)
    with pytest.raises(ValueError, match=r"`weight` must be \(d_out, d_in\) = \(10, 12\), got shape \(12, 10\)"):
        sltrain_linear(**(t | {"weight": t["weight"].detach().t()}), scaling=0.5)
    with pytest.raises(ValueError, match="`indices` must be on the values' device cpu, got meta"):
        sltrain_linear(**(t | {"indices": t["indices"].to("meta")}), scaling=0.5)
    with pytest.raises(ValueError, match=r"`path='factored'` needs sparse kernels for torch.float16 .*path='dense'"):
        sltrain_linear(**make_inputs(dtype=torch.float16), scaling=0.5, path="factored")


class _DenseMatrices(TorchDispatchMode):
    """Counts the matrix products that produce a tensor of one given shape."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and tuple(out.shape) == self.shape:
            self.count += 1
        return out


@pytest.mark.parametrize("needs", ["x", "params", "both"])
def test_dense_path_backward_honours_needs_input_grad(needs):
    """Backward makes one dense (d_out, d_in) product per gradient family it needs: the rebuilt W for dx, the weight
    gradient dW for the factors, and nothing for what is not needed."""
    t = make_inputs(dtype=torch.float32, with_weight=False, with_bias=False, d_in=12, d_out=11)
    if needs == "params":
        t["x"].requires_grad_(False)
    if needs == "x":
        for name in ("A", "B", "values"):
            t[name].requires_grad_(False)
    y = sltrain_linear(**t, scaling=1.0)
    with _DenseMatrices((11, 12)) as mode:
        y.sum().backward()
    assert mode.count == {"x": 1, "params": 1, "both": 2}[needs]
    assert (t["x"].grad is not None) == (needs != "params")
    assert (t["A"].grad is not None) == (needs != "x")


def test_dense_weight_places_values_at_indices():
    A, B = torch.zeros(2, 4), torch.zeros(3, 2)
    W = dense_weight(A, B, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 5, 11], dtype=torch.int32), 1.0)
    expected = torch.zeros(3, 4)
    expected[0, 0], expected[1, 1], expected[2, 3] = 1.0, 2.0, 3.0
    assert torch.equal(W, expected)


@pytest.mark.parametrize("path", FACTORED, indirect=True)
@pytest.mark.parametrize("with_weight", [True, False])
def test_factored_path_never_forms_a_dense_matrix(with_weight, path):
    """No op of forward or backward allocates a dense (d_out, d_in) tensor (sparse CSR forms of S and views of the
    frozen W0 are fine). numba's kernels allocate outside PyTorch: only (d, TOKEN_BLOCK) blocks, by construction."""
    t = make_inputs(dtype=torch.float32, with_weight=with_weight, d_in=12, d_out=11)
    if with_weight:
        t["weight"].requires_grad_(False)

    class AnyDense(TorchDispatchMode):
        seen = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (tuple, list)) else [out]
            strided = [a for a in args if isinstance(a, torch.Tensor) and a.layout == torch.strided]
            inputs = {a.untyped_storage().data_ptr() for a in strided}
            dense = [
                o
                for o in outs
                if isinstance(o, torch.Tensor)
                and o.layout == torch.strided
                and o.untyped_storage().data_ptr() not in inputs  # a view of an input allocates nothing
            ]
            self.seen += sum(tuple(o.shape) in ((11, 12), (12, 11)) for o in dense)
            return out

    with AnyDense() as mode:
        y = sltrain_linear(**t, scaling=1.0, path=path)
        y.square().sum().backward()
    assert mode.seen == 0
    assert all(t[n].grad is not None for n in ("x", "A", "B", "values", "bias"))


@pytest.mark.parametrize("path", FACTORED, indirect=True)
@pytest.mark.parametrize("with_weight", [True, False])
def test_paths_agree_with_each_other(with_weight, path):
    dense = make_inputs(dtype=torch.float32, with_weight=with_weight, d_in=64, d_out=48, r=8, nnz=150)
    fact = clone_inputs(dense)
    y_dense = sltrain_linear(**dense, scaling=0.5, path="dense")
    y_fact = sltrain_linear(**fact, scaling=0.5, path=path)
    torch.testing.assert_close(y_fact, y_dense, rtol=1e-5, atol=1e-5)
    for g_f, g_d in zip(grads(y_fact, [fact[n] for n in NAMES]), grads(y_dense, [dense[n] for n in NAMES])):
        torch.testing.assert_close(g_f, g_d, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", FACTORED, indirect=True)
def test_factored_saves_nothing_dense(path):
    t = make_inputs(dtype=torch.float32, with_weight=False, d_in=24, d_out=20, r=4, nnz=30)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: (saved.append(x), x)[1], lambda x: x):
        sltrain_linear(**t, scaling=1.0, path=path)
    assert {s.data_ptr() for s in saved} <= {t[n].data_ptr() for n in ("x", "A", "B", "values", "indices")}


@pytest.mark.parametrize("path", FACTORED, indirect=True)
@pytest.mark.parametrize("loss", ["square", "linear"])
def test_factored_path_refuses_double_backward(path, loss):
    """Its sparse kernels are not differentiable: asking for a graph of the first derivatives is refused, also for a
    loss linear in y, where the incoming gradient carries no graph and nothing would have signalled the loss."""
    t = make_inputs(with_weight=False)
    y = sltrain_linear(**t, scaling=1.0, path=path)
    out = y.square().sum() if loss == "square" else y.sum()
    with pytest.raises(RuntimeError, match="factored SLTrain path has no second derivative.*path='dense'"):
        torch.autograd.grad(out, t["x"], create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(out, t["A"], create_graph=True)


@pytest.mark.parametrize("path", IMPLEMENTATIONS, indirect=True)
def test_batched_gradients_match_the_reference(path):
    """Vectorized Jacobians (`is_grads_batched=True`, `jacobian(vectorize=True)`) hand backward one functorch-batched
    gradient: the sparse kernels cannot read it, so the factored path computes it as the dense path does, from the
    same saved tensors."""
    t, ref = make_inputs(), clone_inputs(make_inputs())
    inputs = [t[name] for name in NAMES]
    y = sltrain_linear(**t, scaling=0.5, path=path)
    expected = reference(**ref, scaling=0.5)
    batch = torch.randn(3, *y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(y, inputs, batch, is_grads_batched=True)
    want = torch.autograd.grad(expected, [ref[name] for name in NAMES], batch, is_grads_batched=True)
    for name, g, w in zip(NAMES, got, want, strict=True):
        torch.testing.assert_close(g, w, msg=name)
    rest = {k: v.detach() if torch.is_tensor(v) else v for k, v in ref.items() if k != "x"}
    jacobian = torch.autograd.functional.jacobian(
        lambda x: sltrain_linear(x, **rest, scaling=0.5, path=path), t["x"].detach(), vectorize=True
    )  # (2, 5, 10, 2, 5, 12)
    W = reference(torch.eye(12, dtype=torch.float64), **(rest | {"bias": None}), scaling=0.5).t()  # (d_out, d_in)
    torch.testing.assert_close(jacobian, torch.einsum("ac,bd,oi->abocdi", torch.eye(2), torch.eye(5), W).double())


@pytest.mark.parametrize("path", IMPLEMENTATIONS, indirect=True)
def test_torch_func_and_forward_mode_match_the_reference(path, monkeypatch):
    """Under `torch.func` transforms and with forward-mode tangents (which neither autograd function supports) the
    map runs in plain differentiable ops: gradients, per-row gradients and Jacobian-vector products are the
    reference's. An open dual level without tangents changes nothing."""
    t = {k: v.detach() if torch.is_tensor(v) else v for k, v in make_inputs().items()}
    params = {k: t[k] for k in ("A", "B", "values", "weight", "bias")}

    def loss(params, x):
        return sltrain_linear(x, indices=t["indices"], **params, scaling=0.5, path=path).square().sum()

    def reference_loss(params, x):
        return reference(x, indices=t["indices"], **params, scaling=0.5).square().sum()

    for name, g in torch.func.grad(loss)(params, t["x"]).items():
        torch.testing.assert_close(g, torch.func.grad(reference_loss)(params, t["x"])[name], msg=name)
    per_row = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, t["x"])  # one gradient per row
    for name, g in per_row.items():
        want = torch.stack([torch.func.grad(reference_loss)(params, x)[name] for x in t["x"]])
        torch.testing.assert_close(g, want, msg=name)
    tangents = {k: torch.ones_like(v) for k, v in params.items()}
    _, jvp = torch.func.jvp(lambda p: loss(p, t["x"]), (params,), (tangents,))
    torch.testing.assert_close(jvp, torch.func.jvp(lambda p: reference_loss(p, t["x"]), (params,), (tangents,))[1])
    with torch.autograd.forward_ad.dual_level():  # forward-mode AD on plain tensors, through the public function
        dual = torch.autograd.forward_ad.make_dual(t["x"], torch.ones_like(t["x"]))
        y = sltrain_linear(**(t | {"x": dual}), scaling=0.5, path=path)
        want = reference(**(t | {"x": torch.ones_like(t["x"]), "bias": None}), scaling=0.5)  # d/dx along ones: 1 W^T
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(y).tangent, want)
        plain_calls = []
        monkeypatch.setattr(functional, "_plain_sltrain_linear", lambda *args: plain_calls.append(args))
        torch.testing.assert_close(sltrain_linear(**t, scaling=0.5, path=path), reference(**t, scaling=0.5))
        assert not plain_calls  # no tangent: the path's own autograd function


@pytest.mark.parametrize("path", BF16_IMPLEMENTATIONS, indirect=True)
def test_torch_func_under_autocast_computes_as_backward_does(path):
    """Under bf16 autocast the plain ops cast the fp32 factors to the compute dtype, as the autograd functions do:
    `torch.func.grad` gives the fp32 gradients that a backward gives, within bf16 rounding."""
    t = {k: v.detach() if torch.is_tensor(v) else v for k, v in make_inputs(dtype=torch.float32).items()}
    params = {k: t[k] for k in ("A", "B", "values", "weight", "bias")}

    def loss(params, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = sltrain_linear(x, indices=t["indices"], **params, scaling=0.5, path=path)
        assert y.dtype == torch.bfloat16
        return y.float().square().sum()

    got = torch.func.grad(loss)(params, t["x"])
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    loss(leaves, t["x"]).backward()
    for name, g in got.items():
        assert g.dtype == torch.float32
        assert ((g - leaves[name].grad).norm() / leaves[name].grad.norm()).item() < 1e-2, name


@pytest.mark.parametrize("with_weight", [True, False])
def test_dense_path_double_backward_under_autocast(with_weight):
    """Gradient penalties (`create_graph=True`) under bf16 autocast: the dense path casts its fp32 inputs itself and
    casts them again, recorded, in a double backward, so the second-order terms reach them (without that, the
    penalty's gradients were 40-50% off). Against plain autograd on the dense weight, to bf16's rounding."""

    def penalty_grads(fn, inputs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(inputs)
        (gx,) = torch.autograd.grad(y.float().pow(2).mean(), inputs["x"], create_graph=True)
        return torch.autograd.grad(
            gx.pow(2).sum(), [inputs[n] for n in ("A", "B", "values", "weight") if inputs[n] is not None]
        )

    t = make_inputs(dtype=torch.float32, with_weight=with_weight, d_in=16, d_out=16, r=4, nnz=20, batch=(8,))
    ref = penalty_grads(lambda i: reference(**i, scaling=0.5), clone_inputs(t))
    ours = penalty_grads(lambda i: sltrain_linear(**i, scaling=0.5, path="dense"), t)
    for o, r in zip(ours, ref, strict=True):
        assert o.dtype == torch.float32 and ((o - r).norm() / r.norm()).item() < 0.03


def test_dense_path_keeps_only_the_inputs_it_cast_and_checks_them_in_a_double_backward():
    """For a double backward the map keeps its cast inputs (parameters, in a layer) and nothing else: a caller's own
    bf16 copies are freed with the graph's saved tensors. One modified in place before a double backward is refused,
    as autograd refuses a modified saved tensor, instead of differentiating the new values."""
    t = make_inputs(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sltrain_linear(**t, scaling=0.5, path="dense")
    kept = y.grad_fn.originals  # (W0 is saved uncast, and autograd checks it)
    assert [o[0] is t[n] for n, o in zip(("A", "B", "values"), kept, strict=True)] == [True] * 3
    bf16 = {k: v.detach().to(torch.bfloat16).requires_grad_() if v.is_floating_point() else v for k, v in t.items()}
    assert sltrain_linear(**bf16, scaling=0.5, path="dense").grad_fn.originals == (None,) * 3
    (gx,) = torch.autograd.grad(y.float().square().sum(), t["x"], create_graph=True)  # before any change: fine
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sltrain_linear(**t, scaling=0.5, path="dense")
    with torch.no_grad():
        t["A"].mul_(2)
    with pytest.raises(RuntimeError, match="modified in place between its forward and a double backward"):
        torch.autograd.grad(y.float().square().sum(), t["x"], create_graph=True)


@pytest.mark.parametrize("path", IMPLEMENTATIONS, indirect=True)
@pytest.mark.parametrize("batch", [(7,), (2, 5)])
def test_output_may_be_modified_in_place(path, batch):
    """As with F.linear, `y.relu_()` works and its gradients are right (a view of an internal result would refuse)."""
    ours = make_inputs(batch=batch)
    ref = clone_inputs(ours)
    y = sltrain_linear(**ours, scaling=0.5, path=path).relu_()
    y_ref = reference(**ref, scaling=0.5).relu()
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads(y, [ours[n] for n in NAMES]), grads(y_ref, [ref[n] for n in NAMES])):
        torch.testing.assert_close(g, g_ref)


def test_torch_kernels_refuse_what_they_cannot_compute(monkeypatch):
    """PyTorch's CSR kernels check neither the support's order nor their dtypes: the factored path does, on CPU."""
    monkeypatch.setattr(cpu_kernels, "AVAILABLE", False)
    t = make_inputs(dtype=torch.float32)
    shuffled = t["indices"].flip(0).contiguous()
    with pytest.raises(ValueError, match=r"`indices` must be strictly increasing flat indices in \[0, 120\)"):
        sltrain_linear(**(t | {"indices": shuffled}), scaling=1.0, path="factored")
    t16 = make_inputs(dtype=torch.float16)
    with pytest.raises(ValueError, match=r"kernels for torch.float16 on cpu.*cover only float32, float64 and bf"):
        sltrain_linear(**t16, scaling=1.0, path="factored")
    bf16 = make_inputs(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"kernels for torch.bfloat16 on cpu.*pip install 'peft-sltrain\[cpu\]'"):
        sltrain_linear(**bf16, scaling=1.0, path="factored")
    assert sltrain_linear(**(t | {"indices": shuffled}), scaling=1.0, path="dense").shape == (2, 5, 10)


THREADS = """
import torch
torch.set_num_threads(1)
from peft_sltrain.functional import sltrain_linear
A, B = torch.randn(4, 32), torch.randn(32, 4)
indices = torch.arange(0, 1024, 7, dtype=torch.int32)
y = sltrain_linear(torch.randn(300, 32), A, B, torch.randn(indices.numel()), indices, scaling=1.0, path="factored")
print(torch.get_num_threads())
"""


@NEEDS_NUMBA
def test_kernels_leave_torch_thread_count_alone():
    """numba's OpenMP pool resets OpenMP's thread count when it starts; torch's `set_num_threads` must still hold."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", THREADS], capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == "1"


@pytest.mark.parametrize("path", IMPLEMENTATIONS, indirect=True)
def test_int64_indices_give_the_same_result(path):
    """The layers keep int32 supports; a direct caller's int64 ones work on every path (converted for the kernels),
    and integers out of range or not integers at all are refused before any kernel runs."""
    t = make_inputs(dtype=torch.float32, with_weight=False)
    y32 = sltrain_linear(**t, scaling=0.5, path=path)
    y64 = sltrain_linear(**(t | {"indices": t["indices"].long()}), scaling=0.5, path=path)
    assert torch.equal(y64, y32)
    if path == "factored":
        wrapped = t["indices"].long().clone()
        wrapped[-1] += 2**32  # would wrap to the original index as int32
        with pytest.raises(ValueError, match=r"`indices` must lie in \[0, 120\)"):
            sltrain_linear(**(t | {"indices": wrapped}), scaling=0.5, path=path)
        with pytest.raises(ValueError, match="`indices` must be an integer tensor, got torch.float32"):
            sltrain_linear(**(t | {"indices": t["indices"].float()}), scaling=0.5, path=path)


@pytest.mark.parametrize("path", IMPLEMENTATIONS, indirect=True)
@pytest.mark.parametrize("batch", [(0,), (2, 0)])
def test_no_tokens(path, batch):
    """An empty batch gives an empty output, an empty input gradient and zero parameter gradients, as F.linear."""
    t = make_inputs(dtype=torch.float32, batch=batch)
    y = sltrain_linear(**t, scaling=0.5, path=path)
    assert y.shape == (*batch, 10)
    y.sum().backward()
    assert t["x"].grad.shape == t["x"].shape
    for name in ("A", "B", "values", "weight", "bias"):
        assert not t[name].grad.any(), name


@pytest.mark.parametrize("path", IMPLEMENTATIONS, indirect=True)
def test_wrong_input_width(path):
    t = make_inputs()
    with pytest.raises(
        ValueError, match=r"`x` must have d_in = 12 features in its last dimension, got shape \(2, 5, 11\)"
    ):
        sltrain_linear(**(t | {"x": t["x"][..., :11]}), scaling=1.0, path=path)


def test_unknown_path():
    with pytest.raises(ValueError, match="`path` must be one of"):
        sltrain_linear(**make_inputs(), scaling=1.0, path="sparse")


def test_token_chunk():
    assert token_chunk(512, 512) == functional.CHUNK_NUMBERS["cpu"] // 1024 == 512
    assert token_chunk(512, 512, "cuda") == functional.CHUNK_NUMBERS["cuda"] // 1024 == 16384
    assert token_chunk(512, 512, "mps") == 512  # device types without their own number take CPU's
    assert token_chunk(8192, 8192) == 64  # never below 64 rows


@pytest.mark.parametrize("batch", [(3, 50), (65,), (129,), (128,)])
def test_factored_path_over_many_token_chunks(monkeypatch, batch):
    """150 rows of x are 3 chunks of the torch-kernel factored path (64 rows each here), 65 and 129 leave one row for
    the last: float64 results equal the dense path's."""
    monkeypatch.setattr(cpu_kernels, "AVAILABLE", False)
    monkeypatch.setitem(functional.CHUNK_NUMBERS, "cpu", 1)
    assert token_chunk(12, 10) == 64
    dense = make_inputs(d_in=12, d_out=10, r=3, nnz=17)
    dense["x"] = torch.randn(*batch, 12, dtype=torch.float64, requires_grad=True)
    fact = clone_inputs(dense)
    y_d = sltrain_linear(**dense, scaling=0.3, path="dense")
    y_f = sltrain_linear(**fact, scaling=0.3, path="factored")
    torch.testing.assert_close(y_f, y_d, rtol=1e-12, atol=1e-12)
    for g_f, g_d in zip(grads(y_f, [fact[n] for n in NAMES]), grads(y_d, [dense[n] for n in NAMES])):
        torch.testing.assert_close(g_f, g_d, rtol=1e-12, atol=1e-12)


def test_sparse_csr_transposed_is_a_valid_csr_tensor():
    """At a real size (ties in the column sort) each row of `S^T` lists its columns in order, as CSR requires: the
    layout is built without PyTorch's invariant check, so this checks it."""
    d_out, d_in = 512, 1376
    indices = random_support(d_out, d_in, round(0.03 * d_out * d_in), seed=0)
    values = torch.randn(indices.numel(), dtype=torch.float64)
    St = sparse_csr_transposed(values, indices, d_out, d_in)
    torch.sparse_csr_tensor(St.crow_indices(), St.col_indices(), St.values(), St.shape, check_invariants=True)
    S = torch.zeros(d_out * d_in, dtype=torch.float64).index_put((indices.long(),), values).view(d_out, d_in)
    torch.testing.assert_close(St.to_dense(), S.t(), rtol=0, atol=0)


def test_factored_path_under_autocast_is_checked_for_the_compute_dtype(monkeypatch):
    """fp32 inputs under bf16 autocast compute in bf16, which PyTorch's CSR kernels lack: refused for bf16 up front
    (checking fp32 would let the call fail later with a message naming fp32)."""
    monkeypatch.setattr(cpu_kernels, "AVAILABLE", False)
    t = make_inputs(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match=r"kernels for torch.bfloat16 on cpu.*pip install 'peft-sltrain\[cpu\]'"):
            sltrain_linear(**t, scaling=0.5, path="factored")


def test_sparse_csr_transposed_is_s_transposed():
    t = make_inputs(dtype=torch.float64, with_weight=False, d_in=9, d_out=7, r=2, nnz=20)
    St = sparse_csr_transposed(t["values"].detach(), t["indices"], 7, 9)
    assert St.col_indices().dtype == St.crow_indices().dtype == torch.int32
    S = torch.zeros(7 * 9, dtype=torch.float64)
    S[t["indices"].long()] = t["values"].detach()
    torch.testing.assert_close(St.to_dense(), S.view(7, 9).t(), rtol=0, atol=0)


@pytest.mark.parametrize("path", BF16_IMPLEMENTATIONS, indirect=True)
def test_under_autocast_it_computes_as_f_linear_would(path):
    """Under CPU bf16 autocast, fp32 tensors are computed in bf16 (as `F.linear` would), the same bits as on bf16
    copies without autocast, with fp32 gradients for the fp32 tensors; fp64 stays fp64, as autocast leaves it."""
    t = make_inputs(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sltrain_linear(**t, scaling=0.5, path=path)
    bf16 = {k: v.detach().to(torch.bfloat16) if v.is_floating_point() else v for k, v in t.items()}
    y_bf16 = sltrain_linear(**{k: v.requires_grad_() if v.is_floating_point() else v for k, v in bf16.items()},
                            scaling=0.5, path=path)  # fmt: skip
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_bf16)
    y.float().sum().backward()
    y_bf16.float().sum().backward()
    for n in NAMES:  # the gradients of the bf16 copies, cast to fp32
        assert t[n].grad.dtype == torch.float32 and torch.equal(t[n].grad, bf16[n].grad.float()), n
    t64 = make_inputs(dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y64 = sltrain_linear(**t64, scaling=0.5, path=path)
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64, reference(**clone_inputs(t64), scaling=0.5))


def test_dense_path_under_autocast_puts_no_cast_nodes_in_the_graph():
    """The dense path casts the fp32 tensors itself: the autograd graph goes from its node straight to the parameters
    (on a GPU, each node costs CPU time per layer call, and 60M steps on 32k tokens are bound by it)."""
    t = make_inputs(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sltrain_linear(**t, scaling=0.5, path="dense")
    inputs = [fn for fn, _ in y.grad_fn.next_functions if fn is not None]
    assert sorted(type(fn).__name__ for fn in inputs) == ["AccumulateGrad"] * 5 + ["ToCopyBackward0"]  # x's cast
    assert {id(fn.variable) for fn in inputs if hasattr(fn, "variable")} == {id(t[n]) for n in NAMES if n != "x"}


def test_dense_weight_under_autocast_keeps_the_tensors_dtype():
    t = make_inputs(dtype=torch.float32)
    args = [t["A"], t["B"], t["values"], t["indices"], 0.5, t["weight"]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        W = dense_weight(*args)
    assert W.dtype == torch.float32 and torch.equal(W, dense_weight(*args))


@pytest.mark.parametrize("path", IMPLEMENTATIONS, indirect=True)
@pytest.mark.parametrize("name", ["A", "values", "weight", "bias"])
def test_tensors_of_another_dtype_are_refused(path, name):
    t = make_inputs(dtype=torch.float32)
    t[name] = t[name].detach().double()
    with pytest.raises(ValueError, match=rf"`{name}` must have x's dtype torch.float32, got torch.float64"):
        sltrain_linear(**t, scaling=1.0, path=path)


@pytest.mark.parametrize("path", IMPLEMENTATIONS, indirect=True)
def test_inconsistent_shapes_and_complex_inputs_are_refused(path):
    """A value missing for a support entry would make PyTorch's CSR kernels read past `values` (a wrong result, no
    error); complex inputs would get unconjugated, wrong gradients from the dense path."""
    t = make_inputs(dtype=torch.float32)
    for bad in ({"values": t["values"][:-1]}, {"indices": t["indices"].view(1, -1)}):
        with pytest.raises(ValueError, match=r"`values` and `indices` must be 1-D and of one length"):
            sltrain_linear(**(t | bad), scaling=1.0, path=path)
    with pytest.raises(
        ValueError, match=r"`A` \(r, d_in\) and `B` \(d_out, r\) must share r, got shapes \(3, 12\) and \(10, 2\)"
    ):
        sltrain_linear(**(t | {"B": t["B"][:, :2]}), scaling=1.0, path=path)
    empty = {"x": t["x"][..., :0], "A": t["A"][:, :0], "values": t["values"][:0], "indices": t["indices"][:0]}
    with pytest.raises(ValueError, match=r"r, d_in and d_out of at least 1, got shapes \(3, 0\) and \(10, 3\)"):
        sltrain_linear(**(t | empty), scaling=1.0, path=path)
    c = {
        k: v.detach().to(torch.complex64) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in t.items()
    }
    with pytest.raises(ValueError, match=r"`x` must be a real floating-point tensor, got torch.complex64"):
        sltrain_linear(**c, scaling=1.0, path=path)


def test_dense_path_takes_any_integer_support():
    """The factored path converts an int16 support to int32; the dense path does too, instead of failing in
    `index_add_`."""
    t = make_inputs()
    expected = sltrain_linear(**t, scaling=0.5, path="dense")
    assert torch.equal(sltrain_linear(**(t | {"indices": t["indices"].to(torch.int16)}), scaling=0.5), expected)


def test_meta_tensors_give_shapes():
    """Shape inference on the meta device (where asking whether autocast is on raises)."""
    t = {k: v.detach().to("meta") if torch.is_tensor(v) else v for k, v in make_inputs().items()}
    assert sltrain_linear(**t, scaling=0.5, path="dense").shape == (2, 5, 10)
    assert dense_weight(t["A"], t["B"], t["values"], t["indices"], 0.5).shape == (10, 12)


def test_torch_kernels_refuse_a_repeated_index(monkeypatch):
    """A support with a duplicate is sorted but not strictly increasing: refused as a shuffled one is."""
    monkeypatch.setattr(cpu_kernels, "AVAILABLE", False)
    t = make_inputs(dtype=torch.float32)
    repeated = t["indices"].clone()
    repeated[1] = repeated[0]
    with pytest.raises(ValueError, match=r"`indices` must be strictly increasing flat indices in \[0, 120\)"):
        sltrain_linear(**(t | {"indices": repeated}), scaling=1.0, path="factored")


def test_a_call_under_fake_tensor_mode_leaves_later_eager_calls_right():
    """The dense path keeps one unset 0-d input per device and dtype for its scaled GEMMs: a first call traced with
    fake tensors (a memory or shape estimate, no torch.compile) must not leave a fake one there for eager calls."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from peft_sltrain import functional

    functional._UNUSED_INPUTS.clear()
    ours = make_inputs(batch=(3,), with_weight=False)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = sltrain_linear(**ours, scaling=0.5, path="dense")  # real inputs, fake results
        assert tuple(fake.shape) == (3, 10) and type(fake) is not torch.Tensor
    assert all(type(t) is torch.Tensor for t in functional._UNUSED_INPUTS.values())
    torch.testing.assert_close(sltrain_linear(**ours, scaling=0.5, path="dense"), reference(**ours, scaling=0.5))


def _backward_peak_bytes(y: torch.Tensor, grad: torch.Tensor) -> int:
    """Most tensor memory allocated at once during `y.backward(grad)`, above what existed before (the profiler's
    allocation and free events, summed in order, as benchmarks/layer_bench.py measures it)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y.backward(grad)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return peak


@NEEDS_NUMBA
@pytest.mark.parametrize("nnz", [2000, 18000])  # the second: a dS copy (4 bytes a nonzero) over the margin
def test_factored_backward_peaks_no_higher_than_the_dense_path(nnz):
    """Where an (N, r) intermediate is no larger than W (N r <= d_out d_in), the factored backward on numba's kernels
    holds no more tensor memory at once than the dense path's, which holds one transient (d_out, d_in) matrix: `dY B`
    is freed before `X A^T` is made, and dS is added into its gradient without its own copy staying alive."""
    peaks = {}
    for path in ("dense", "factored"):
        t = make_inputs(dtype=torch.float32, with_weight=False, with_bias=False, d_in=256, d_out=256, r=64, nnz=nnz,
                        batch=(768,))  # fmt: skip
        y = sltrain_linear(**t, scaling=0.5, path=path)
        peaks[path] = _backward_peak_bytes(y, torch.ones_like(y))
    assert peaks["factored"] <= peaks["dense"], peaks
