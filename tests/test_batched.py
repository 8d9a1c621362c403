"""`compute="batched"`: like-shaped layers' weights rebuilt in one batched GEMM per pass, against the dense path."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

from peft_sltrain import SLTrainConfig, SLTrainLayer
from peft_sltrain.batched import BatchedRebuilds

from conftest import perturb_trainable, tiny_llama


def pair(blocks: int = 2):
    """Two copies of one from-scratch tiny LLaMA in fp64, on the dense path and batched, with equal weights."""
    settings = dict(r=4, sparsity=0.1, alpha=8, from_scratch=True)
    dense = get_peft_model(tiny_llama(num_hidden_layers=blocks), SLTrainConfig(compute="dense", **settings)).double()
    perturb_trainable(dense)
    batched = copy.deepcopy(dense)
    batched.set_compute("batched")
    return dense.train(), batched.train()


def layers(model):
    return [m for m in model.modules() if isinstance(m, SLTrainLayer)]


def groups(model) -> set:
    """The groups whose weights the layers took in the latest pass."""
    return {id(m._sltrain_slot["default"][0]) for m in layers(model) if "_sltrain_slot" in m.__dict__}


def trainable_grads(model) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same_grads(a, b) -> None:
    ga, gb = trainable_grads(a), trainable_grads(b)
    assert ga.keys() == gb.keys()
    for name in ga:
        assert (ga[name] is None) == (gb[name] is None), name
        if ga[name] is not None:
            torch.testing.assert_close(gb[name], ga[name], rtol=1e-10, atol=1e-12, msg=name)


def loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def test_batched_matches_the_dense_path_in_one_group_per_shape(input_ids):
    dense, batched = pair()
    l_dense, l_batched = loss(dense, input_ids), loss(batched, input_ids)
    torch.testing.assert_close(l_batched, l_dense, rtol=1e-12, atol=0)
    l_dense.backward()
    l_batched.backward()
    assert_same_grads(dense, batched)
    shapes = {(m.in_features, m.out_features) for m in layers(batched)}  # q/o, k/v, gate/up, down
    assert len(shapes) == 4 and len(groups(batched)) == 4
    assert not any("_sltrain_slot" in m.__dict__ for m in layers(dense))


def test_batched_passes_accumulate_as_the_dense_path(input_ids):
    """Gradient accumulation (a backward per pass) and two passes into one backward: each pass rebuilds."""
    dense, batched = pair()
    for model in (dense, batched):
        loss(model, input_ids).backward()
        loss(model, input_ids[:1]).backward()
        (loss(model, input_ids[1:]) + 2 * loss(model, input_ids)).backward()
    assert_same_grads(dense, batched)


def test_batched_training_follows_the_dense_path(input_ids):
    dense, batched = pair()
    curves = []
    for model in (dense, batched):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        curve = []
        for _ in range(3):
            value = loss(model, input_ids)
            value.backward()
            optimizer.step()
            optimizer.zero_grad()
            curve.append(value.item())
        curves.append(curve)
    assert curves[0] == pytest.approx(curves[1], rel=1e-10) and curves[0][-1] < curves[0][0]


def test_a_layer_no_pass_calls_gets_no_gradient(input_ids):
    """A member of a group that the forward skips (here the last MLP) is rebuilt but gets no gradient, as on the
    dense path, and its peers' gradients are unchanged."""
    dense, batched = pair()
    for model in (dense, batched):
        mlp = model.base_model.model.model.layers[-1].mlp
        mlp.forward = lambda x: x  # the block's MLP is skipped
        loss(model, input_ids).backward()
        assert all(p.grad is None for n, p in mlp.named_parameters() if "sltrain" in n)
    assert_same_grads(dense, batched)


@pytest.mark.parametrize("reentrant", [False, True])
def test_batched_under_activation_checkpointing(input_ids, reentrant):
    """Non-reentrant checkpointing recomputes a layer from the weights its forward took; reentrant checkpointing runs
    its first forward without grad, where layers take the dense path."""
    dense, batched = pair()
    loss(dense, input_ids).backward()
    batched.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    batched.enable_input_require_grads()
    loss(batched, input_ids).backward()
    assert_same_grads(dense, batched)


def test_batched_applies_only_in_a_pass_with_grad(input_ids):
    """Without grad, and for a layer called outside the model's forward, the layers take the dense path."""
    dense, batched = pair()
    with torch.no_grad():
        torch.testing.assert_close(loss(batched, input_ids), loss(dense, input_ids), rtol=1e-12, atol=0)
    assert not groups(batched)
    layer = layers(batched)[0]
    x = torch.randn(3, layer.in_features, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layers(dense)[0](x), rtol=1e-12, atol=0)
    assert not groups(batched)


def test_fine_tuning_layers_take_the_dense_path(input_ids):
    """With a frozen `W0` (fine-tuning) there is no batched rebuild: `W0 + delta` is one fused map per layer."""
    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.1, compute="batched")).double().train()
    reference = copy.deepcopy(model)
    reference.set_compute("dense")
    perturb_trainable(model)
    perturb_trainable(reference)
    loss(model, input_ids).backward()
    loss(reference, input_ids).backward()
    assert not groups(model)
    assert_same_grads(reference, model)


def test_a_deep_copy_rebuilds_its_own_layers(input_ids):
    _, batched = pair()
    twin = copy.deepcopy(batched)
    rebuilds = {id(m._sltrain_rebuilds) for m in layers(twin)}
    assert rebuilds == {id(twin.base_model._sltrain_rebuilds)} != {id(batched.base_model._sltrain_rebuilds)}
    loss(twin, input_ids).backward()
    assert len(groups(twin)) == 4 and not groups(batched)
    assert all(p.grad is None for p in batched.parameters())


def test_batched_dispatches_fewer_ops_than_the_dense_path(input_ids):
    """What it is for: under bf16 autocast a training pass dispatches fewer ops (on a GPU, fewer kernel launches),
    the more so the more blocks share a group (here 4: 0.81x the dense path's, 2 blocks 0.90x)."""

    class Count(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.count += 1
            return func(*args, **(kwargs or {}))

    counts = {}
    for name, model in zip(("dense", "batched"), pair(blocks=4)):
        model.float()
        with Count():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                value = loss(model, input_ids)
            value.backward()
        counts[name], Count.count = Count.count, 0
    assert counts["batched"] < 0.85 * counts["dense"], counts


def test_merge_and_unload_leaves_no_hook(input_ids):
    _, batched = pair()
    plain = batched.merge_and_unload()
    hooks = [*plain._forward_pre_hooks.values(), *plain._forward_hooks.values()]
    assert not any(isinstance(getattr(h, "__self__", None), BatchedRebuilds) for h in hooks)
    assert not any(isinstance(m, SLTrainLayer) for m in plain.modules())


def test_a_layer_whose_factors_are_not_whole_is_left_out(input_ids):
    """Under FSDP a layer that is not unsharded holds empty views of its factors: it joins no group (and the others
    still do)."""
    _, batched = pair()
    first, *others = layers(batched)
    with torch.no_grad():
        first.sltrain_A["default"].data = torch.empty(0, dtype=torch.float64)  # as FSDP frees a sharded parameter
    rebuilds = batched.base_model._sltrain_rebuilds
    rebuilds.begin_pass()
    try:
        peer = next(m for m in others if (m.in_features, m.out_features) == (first.in_features, first.out_features))
        x = torch.randn(3, peer.in_features, dtype=torch.float64)
        torch.testing.assert_close(peer(x), x @ peer.get_delta_weight("default").T, rtol=1e-12, atol=1e-14)
    finally:
        rebuilds.end_pass()
    assert "_sltrain_slot" in peer.__dict__ and "_sltrain_slot" not in first.__dict__


def test_a_pass_without_backward_is_freed_by_the_next(input_ids):
    """A forward with grad whose loss is dropped (evaluation with grad on) leaves its rebuilt weights to the layers
    until the next pass, and no reference cycle: they are freed without Python's cycle collector."""
    import gc
    import weakref

    _, batched = pair()
    first = layers(batched)[0]
    gc.disable()
    try:
        loss(batched, input_ids)  # dropped at once
        kept = weakref.ref(first._sltrain_slot["default"][0].weights[0])
        assert kept() is not None  # held by its group, which the layer holds
        loss(batched, input_ids)
        assert kept() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("compute", ["auto", "batched"])
def test_a_compiled_model_compiles_once_for_all_passes(input_ids, compute):
    """The hooks that count passes do nothing under `torch.compile` (a compiled model takes the dense path): a
    counter traced there would be a guard, and every pass a recompile."""
    from torch._dynamo.utils import counters

    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.1, from_scratch=True, compute=compute))
    model.train().compile(backend="eager")  # Dynamo alone: no C++ compiler needed
    torch._dynamo.reset()
    counters.clear()
    for _ in range(3):
        loss(model, input_ids).backward()
    assert counters["stats"]["unique_graphs"] == 1


def test_a_pickled_model_rebuilds_its_own_layers(input_ids):
    """`torch.save(model)` pickles the whole model (the library itself never does): the pass counter goes with it,
    tied to the loaded model."""
    import io

    _, batched = pair()
    buffer = io.BytesIO()
    torch.save(batched, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.base_model._sltrain_rebuilds._model() is loaded.base_model
    loss(loaded, input_ids).backward()
    loss(batched, input_ids).backward()
    assert len(groups(loaded)) == 4
    assert_same_grads(batched, loaded)


def test_a_copy_of_the_inner_model_alone_takes_the_dense_path(input_ids):
    """A deep copy of the wrapped Transformers model alone (an EMA copy, say) has no tuner of its own: its layers take
    the dense path, and the original's layers are left alone."""
    dense, batched = pair()
    inner = copy.deepcopy(batched.base_model.model)
    loss(inner, input_ids).backward()
    loss(dense.base_model.model, input_ids).backward()
    assert not groups(inner) and not groups(batched)
    assert_same_grads(dense.base_model.model, inner)
