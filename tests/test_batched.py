"""`compute="batched"`: like-shaped layers' weights rebuilt in one batched GEMM per pass, against the dense path."""

from __future__ import annotations

import copy
import gc
import io
import threading
import weakref

import pytest
import torch
import torch.utils.checkpoint as checkpoint
from peft import get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import peft_sltrain.batched as batched_module
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
    """The groups rebuilt for the layers in their model's latest pass."""
    return {id(group) for m in layers(model) for group, _ in m.__dict__.get("_sltrain_slot", {}).values()
            if group.generation == m._sltrain_rebuilds.generation}  # fmt: skip


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


def test_a_layer_no_pass_calls_gets_no_gradient(input_ids, monkeypatch):
    """A member of a group that the forward skips (here the last MLP) is rebuilt but gets no gradient, as on the
    dense path, and its peers' gradients are unchanged; its group's forward weights go at the pass's end."""
    made = watch_rebuilds(monkeypatch)
    dense, batched = pair()
    for model in (dense, batched):
        mlp = model.base_model.model.model.layers[-1].mlp
        mlp.forward = lambda x: x  # the block's MLP is skipped
        gc.disable()
        try:
            value = loss(model, input_ids)
            assert all(ref() is None for ref in made)
        finally:
            gc.enable()
        value.backward()
        assert all(p.grad is None for n, p in mlp.named_parameters() if "sltrain" in n)
    assert_same_grads(dense, batched)
    assert len(made) == 4 + 4  # forward's and backward's rebuilds (the latter then hold the stacked dW)


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
    the more so the more blocks share a group (here 4: 0.79x the dense path's, 2 blocks 0.93x)."""

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


def test_a_factor_set_as_a_plain_tensor_is_read_as_the_layer_reads_it(input_ids):
    """The groups read the factors from the ParameterDicts' `_parameters` (fast); a factor set as a plain tensor
    attribute instead (as FSDP1 leaves its views) is read as the layer's own `[name]` reads it, and the model still
    computes what the dense path does."""
    dense, batched = pair(blocks=1)
    for model in (dense, batched):
        for m in layers(model):
            values = m.sltrain_values
            plain = values._parameters.pop("default").detach().clone().requires_grad_()
            object.__setattr__(values, "default", plain)  # (nn.Module's setattr would refuse a non-Parameter)
            assert values["default"] is plain and "default" not in values._parameters
            assert batched_module._factors(m, "default")[2] is plain
    torch.testing.assert_close(loss(batched, input_ids), loss(dense, input_ids), rtol=1e-12, atol=1e-14)
    assert groups(batched)


def test_a_layer_without_the_adapter_joins_no_group(input_ids):
    """Grouping skips a layer that has no entry for the adapter (not reachable through PEFT's API for a from-scratch
    adapter today: made by hand here) before reading its tensors; it computes with its base layer."""
    dense, batched = pair(blocks=1)
    for model in (dense, batched):
        layer = layers(model)[0]
        for entries in (layer.sltrain_A, layer.sltrain_B, layer.sltrain_values, layer.sltrain_indices):
            del entries["default"]
        for setting in (layer.r, layer.alpha, layer.scaling, layer.sparsity, layer.from_scratch, layer.compute):
            del setting["default"]
        torch.manual_seed(0)
        layer.get_base_layer().weight = nn.Parameter(torch.randn(layer.out_features, layer.in_features).double())
    torch.testing.assert_close(loss(batched, input_ids), loss(dense, input_ids), rtol=1e-12, atol=1e-14)
    assert groups(batched) and "_sltrain_slot" not in layers(batched)[0].__dict__


def test_layers_whose_supports_are_on_another_device_are_grouped_apart():
    """A group stacks its members' supports: a layer whose support is on another device (here meta, standing in for
    a second device) joins no group of its like-shaped peers."""
    _, batched = pair(blocks=2)
    first, *others = layers(batched)
    peers = [m for m in others if (m.in_features, m.out_features) == (first.in_features, first.out_features)]
    first.sltrain_indices["default"] = first.sltrain_indices["default"].to("meta")
    rebuilds = batched.base_model._sltrain_rebuilds
    rebuilds.begin_pass()
    try:
        rebuilds.make_groups(peers[0], "default", torch.float64)
        slots = {m: m.__dict__["_sltrain_slot"][("default", torch.float64)][0] for m in (first, *peers)}
    finally:
        rebuilds.end_pass()
    assert len({id(slots[m]) for m in peers}) == 1 and slots[first] is not slots[peers[0]]


def test_a_pass_keeps_no_weights_once_it_ends(input_ids):
    """The rebuilt weights go with the autograd graph (through the group's node, here watched): freed when a loss
    that never runs backward (evaluation with grad on) is dropped, and after backward; without Python's cycle
    collector."""
    _, batched = pair()
    taken = []

    def take(layer, args, output):
        group, i = next(iter(layer._sltrain_slot.values()))
        taken.append(weakref.ref(group.weights[i].grad_fn))

    layers(batched)[0].register_forward_hook(take)
    gc.disable()
    try:
        value = loss(batched, input_ids)
        assert taken[-1]() is not None  # autograd keeps it for backward
        del value
        assert taken[-1]() is None
        value = loss(batched, input_ids)
        value.backward()
        del value
        assert taken[-1]() is None
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


# From review BA: cases found by reading and mutating the code (each failed, or let a mutant through, before)


def count_rebuilds(monkeypatch) -> list:
    calls = []
    rebuild = batched_module._BatchedRebuild.apply
    monkeypatch.setattr(batched_module._BatchedRebuild, "apply", lambda *a: calls.append(1) or rebuild(*a))
    return calls


def test_partial_reentrant_checkpoint_takes_the_dense_path_in_its_recompute(input_ids):
    """Block 1's MLP checkpointed (reentrant), block 0's not: the group is built by block 0's layers in this pass,
    and block 1's recompute must not take weights its (no-grad) forward did not take."""
    dense, batched = pair()
    for model in (dense, batched):
        mlp = model.base_model.model.model.layers[1].mlp
        forward = mlp.forward
        mlp.forward = lambda x, _f=forward: checkpoint.checkpoint(_f, x, use_reentrant=True)
        loss(model, input_ids).backward()
    assert_same_grads(dense, batched)


def test_a_forward_that_raises_ends_its_pass(input_ids):
    dense, batched = pair()
    bad = torch.full_like(input_ids, 10_000)  # out of the vocabulary: the embedding raises
    try:
        batched(input_ids=bad, labels=input_ids)
    except IndexError:
        pass
    assert batched.base_model._sltrain_rebuilds.depth == 0
    layer = layers(batched)[0]
    x = torch.randn(3, layer.in_features, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()  # outside a pass: the dense path
    assert not groups(batched)


def test_supports_changed_in_place_between_passes(input_ids):
    """The group's flat positions are cached per support; a support rewritten in place (a state dict loaded) must
    be read again."""
    dense, batched = pair()
    loss(batched, input_ids).backward()
    batched.zero_grad()
    with torch.no_grad():
        for a, b in zip(layers(dense), layers(batched)):
            support = torch.randperm(a.in_features * a.out_features)[: a.sltrain_indices["default"].numel()].sort()[0]
            a.sltrain_indices["default"].copy_(support)
            b.sltrain_indices["default"].copy_(support)
    loss(dense, input_ids).backward()
    loss(batched, input_ids).backward()
    assert_same_grads(dense, batched)


def test_torch_func_grad_falls_back(input_ids):
    dense, batched = pair()
    result = []
    for model in (dense, batched):
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

        def f(params, model=model):
            return torch.func.functional_call(model, params, (), {"input_ids": input_ids, "labels": input_ids}).loss

        result.append(torch.func.grad(f)(params))
    for name, g in result[0].items():
        torch.testing.assert_close(result[1][name], g, rtol=1e-10, atol=1e-12)


def test_functional_call_with_plain_tensors_is_not_taken_for_sharding(input_ids):
    """`torch.func.functional_call` outside a transform swaps plain tensors in for the parameters (here views of one
    flat vector, as a hypernetwork's): not FSDP1's views, so batched still batches, as the dense path computes."""
    dense, batched = pair()
    results = []
    for model in (dense, batched):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        flat = torch.cat([p.detach().reshape(-1) for _, p in named]).requires_grad_(True)
        params, start = {}, 0
        for n, p in named:
            params[n] = flat[start : start + p.numel()].view_as(p)
            start += p.numel()
        value = torch.func.functional_call(model, params, (), {"input_ids": input_ids, "labels": input_ids}).loss
        value.backward()
        results.append(flat.grad)
    assert len(groups(batched)) == 4
    torch.testing.assert_close(results[1], results[0], rtol=1e-10, atol=1e-12)


def test_torch_compile_falls_back(input_ids, monkeypatch):
    calls = count_rebuilds(monkeypatch)
    dense, batched = pair()
    compiled = torch.compile(batched, backend="aot_eager")
    compiled(input_ids=input_ids, labels=input_ids).loss.backward()
    loss(dense, input_ids).backward()
    assert not calls
    assert_same_grads(dense, batched)


def test_one_rebuild_per_group_per_pass_even_with_a_layer_left_out(input_ids, monkeypatch):
    calls = count_rebuilds(monkeypatch)
    _, batched = pair()
    first = layers(batched)[0]
    with torch.no_grad():
        first.sltrain_A["default"].data = torch.empty(0, dtype=torch.float64)
    rebuilds = batched.base_model._sltrain_rebuilds
    rebuilds.begin_pass()
    try:
        for layer in layers(batched)[1:]:
            layer(torch.randn(2, layer.in_features, dtype=torch.float64))
        try:
            first(torch.randn(2, first.in_features, dtype=torch.float64))  # not whole: dense (which then fails)
        except Exception:
            pass
    finally:
        rebuilds.end_pass()
    assert len(calls) == 4


def checkpointed(*models, reentrant: bool):
    for model in models:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()


def test_two_forwards_one_backward_under_non_reentrant_checkpointing(input_ids):
    dense, batched = pair()
    checkpointed(dense, batched, reentrant=False)
    for model in (dense, batched):
        (loss(model, input_ids) + loss(model, input_ids[:1])).backward()
    assert_same_grads(dense, batched)


def test_retain_graph_under_non_reentrant_checkpointing(input_ids):
    dense, batched = pair()
    checkpointed(dense, batched, reentrant=False)
    for model in (dense, batched):
        value = loss(model, input_ids)
        value.backward(retain_graph=True)
        value.backward()
    assert_same_grads(dense, batched)


def test_reentrant_recompute_takes_no_weights_of_an_older_pass(input_ids):
    dense, batched = pair()
    checkpointed(dense, batched, reentrant=True)
    for model in (dense, batched):
        loss(model.eval(), input_ids)  # evaluation with grad on: groups built, no backward
        with torch.no_grad():  # an optimizer step
            for p in model.parameters():
                if p.requires_grad:
                    p.mul_(1.5)
        loss(model.train(), input_ids).backward()
    assert_same_grads(dense, batched)


def test_two_compute_dtypes_in_one_pass_under_non_reentrant_checkpointing():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.ModuleList(nn.Linear(16, 16, bias=False) for _ in range(4))

        def forward(self, x):
            for layer in self.l:
                x = checkpoint.checkpoint(lambda h, _l=layer: _l(h).float(), x, use_reentrant=False)
            return x.pow(2).mean()

    grads = []
    for compute in ("dense", "batched"):
        torch.manual_seed(0)
        model = get_peft_model(
            Net(),
            SLTrainConfig(r=2, sparsity=0.2, from_scratch=True, compute=compute, target_modules=["0", "1", "2", "3"]),
        )
        perturb_trainable(model, scale=0.3)
        model.base_model.model.l[1].double()  # one layer computes in fp64, the others in fp32
        model(torch.randn(3, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6)


def test_double_backward_is_refused_not_wrong(input_ids):
    _, batched = pair()
    params = [p for p in batched.parameters() if p.requires_grad]
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(loss(batched, input_ids), params, create_graph=True)


def test_a_copy_of_the_inner_model_leaves_the_original_alone(input_ids):
    dense, batched = pair()
    twin = copy.deepcopy(batched.get_base_model())
    twin(input_ids=input_ids, labels=input_ids).loss.backward()
    for model in (dense, batched):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.mul_(1.5)
        loss(model, input_ids).backward()
    assert_same_grads(dense, batched)


def test_a_model_after_a_step_is_freed_without_the_cycle_collector(input_ids):
    _, batched = pair()
    loss(batched, input_ids).backward()
    kept = weakref.ref(layers(batched)[0].sltrain_A["default"])
    gc.disable()
    try:
        del batched
        assert kept() is None
    finally:
        gc.enable()


def test_merge_and_unload_frees_the_sltrain_layers(input_ids):
    _, batched = pair()
    loss(batched, input_ids).backward()
    kept = weakref.ref(layers(batched)[0])
    batched.merge_and_unload()
    gc.collect()
    assert kept() is None


def test_deepcopy_and_pickle_after_a_forward_without_backward(input_ids):
    _, batched = pair()
    loss(batched, input_ids)
    copy.deepcopy(batched)
    torch.save(batched, io.BytesIO())


# From review BC: cases found in the redesign (each failed before it, or let a mutant through)


def test_the_decoder_alone_under_non_reentrant_checkpointing_after_a_batched_step(input_ids):
    """N1. The decoder called on its own (no pass hooks: a layer outside a pass takes its fallback), after a step
    through the PeftModel: the recompute must save what that forward saved."""
    dense, batched = pair()
    checkpointed(dense, batched, reentrant=False)
    for model in (dense, batched):
        loss(model, input_ids).backward()
        hidden = model.base_model.model.model(input_ids=input_ids).last_hidden_state
        hidden.pow(2).mean().backward()
    assert_same_grads(dense, batched)


@pytest.mark.parametrize("retain", [False, True])
def test_a_layer_skipped_by_a_later_pass_before_backward_under_non_reentrant_checkpointing(input_ids, retain):
    """N2. The last MLP runs in pass 1 and is skipped in pass 2 (LayerDrop, MoE routing), before pass 1's backward."""
    dense, batched = pair()
    checkpointed(dense, batched, reentrant=False)
    for model in (dense, batched):
        mlp = model.base_model.model.model.layers[-1].mlp
        forward, skip = mlp.forward, [False]
        mlp.forward = lambda x, skip=skip, forward=forward: x if skip[0] else forward(x)
        first = loss(model, input_ids)
        if retain:
            first.backward(retain_graph=True)
        skip[0] = True
        second = loss(model, input_ids[:1])
        skip[0] = False
        if retain:
            second.backward()
            first.backward()
        else:
            (first + second).backward()
    assert_same_grads(dense, batched)


def interrupt_a_forward(model, input_ids) -> None:
    """A KeyboardInterrupt raised in the model's next forward, at its second block, which leaves the pass open."""
    armed = [True]

    def interrupt(module, args):
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt

    model.base_model.model.model.layers[1].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        loss(model, input_ids)


def test_a_keyboard_interrupt_in_a_forward_ends_its_pass(input_ids):
    """N3. `always_call` forward hooks run on `Exception` only: a KeyboardInterrupt left the pass open, and later
    passes took its weights (stale after a step: wrong loss, then a backward through freed buffers)."""
    dense, batched = pair()
    values = []
    for model in (dense, batched):
        interrupt_a_forward(model, input_ids)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for _ in range(2):
            loss(model, input_ids).backward()
            optimizer.step()
            optimizer.zero_grad()
        values.append(loss(model, input_ids))
        values[-1].backward()
    torch.testing.assert_close(values[1], values[0], rtol=1e-10, atol=0)
    assert_same_grads(dense, batched)


def test_a_layer_pickles_without_its_model(input_ids):
    """N4. Pickling one layer (or one block) must not pickle the whole model through its pass counter."""
    _, batched = pair(blocks=4)
    model, layer = io.BytesIO(), io.BytesIO()
    torch.save(batched, model)
    torch.save(layers(batched)[0], layer)
    assert layer.tell() < model.tell() / 10


def test_merge_and_unload_frees_the_supports(input_ids):
    """N5. The index cache holds the supports (review BA's R2): it must let the replaced layers' go."""
    _, batched = pair()
    loss(batched, input_ids).backward()
    support = weakref.ref(layers(batched)[0].sltrain_indices["default"])
    batched.merge_and_unload()
    gc.collect()
    assert support() is None


# kill mutants that survive test_batched.py


def test_a_copy_made_after_a_step_rebuilds_in_its_first_pass(input_ids, monkeypatch):
    """A deep copy and a pickled copy made after a batched step rebuild at their first pass, under non-reentrant
    checkpointing (kills `_Group.__reduce__` removed: a CheckpointError at ec78bda; and `__reduce__` keeping the
    generation: the copy's first pass all on the fallback)."""
    dense, batched = pair()
    loss(dense, input_ids).backward()
    loss(batched, input_ids).backward()
    buffer = io.BytesIO()
    torch.save(batched, buffer)
    buffer.seek(0)
    twins = [copy.deepcopy(dense), copy.deepcopy(batched), torch.load(buffer, weights_only=False)]
    checkpointed(*twins, reentrant=False)
    calls = count_rebuilds(monkeypatch)
    for twin in twins:
        twin.zero_grad()
        loss(twin, input_ids).backward()
    assert len(calls) == 8  # 4 groups in each batched copy's first pass
    assert_same_grads(twins[0], twins[1])
    assert_same_grads(twins[0], twins[2])


def test_the_next_pass_frees_a_pass_groups(input_ids):
    """Nothing but the layers' slots keeps a pass's groups, and the next pass's slots replace them (kills `end_pass`
    not emptying `current`: every group of every pass kept, and walked at each pass's end)."""
    _, batched = pair()
    loss(batched, input_ids).backward()
    first = weakref.ref(next(iter(layers(batched)[0]._sltrain_slot.values()))[0])
    gc.disable()
    try:
        loss(batched, input_ids).backward()
        assert first() is None
        assert batched.base_model._sltrain_rebuilds.current == []
    finally:
        gc.enable()


def test_supports_replaced_by_new_tensors_at_the_same_address(input_ids):
    """Review BA's R2 made deterministic: each support replaced by a new tensor that CPython puts at the freed old
    one's address, with the same version (kills an index cache that compares ids)."""
    dense, batched = pair()
    loss(batched, input_ids).backward()
    batched.zero_grad()
    reused = 0
    generator = torch.Generator().manual_seed(1)
    for a, b in zip(layers(dense), layers(batched)):
        old = b.sltrain_indices["default"]
        n, dtype, address, version = old.numel(), old.dtype, id(old), old._version
        draw = torch.randperm(a.in_features * a.out_features, generator=generator)[:n].sort()[0].to(dtype)
        b.sltrain_indices["default"] = draw  # (the old one freed here, unless the cache holds it)
        del old
        new = torch.empty(n, dtype=dtype)
        for _ in range(version):
            new.copy_(draw)
        reused += id(new) == address
        b.sltrain_indices["default"] = new
        a.sltrain_indices["default"] = draw.clone()
        assert new._version == version
    loss(dense, input_ids).backward()
    loss(batched, input_ids).backward()
    assert_same_grads(dense, batched)


def test_a_layer_skipped_by_a_pass_then_called_alone_under_non_reentrant_checkpointing(input_ids):
    """A layer whose slot is from a pass that skipped it, called on its own (its fallback) in a checkpoint: its
    recompute must save what that fallback saved (every fallback with grad and every recompute build the layer's
    own weight)."""
    dense, batched = pair()
    for model in (dense, batched):
        mlp = model.base_model.model.model.layers[-1].mlp
        forward = mlp.forward
        mlp.forward = lambda x: x
        loss(model, input_ids).backward()  # the MLP is skipped: a slot, not used
        mlp.forward = forward
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(2, 5, mlp.gate_proj.in_features, dtype=torch.float64, generator=generator)
        torch.utils.checkpoint.checkpoint(mlp, x.requires_grad_(), use_reentrant=False).pow(2).sum().backward()
    assert_same_grads(dense, batched)


def test_two_model_calls_in_one_outer_pass_share_one_rebuild(input_ids, monkeypatch):
    """Two model calls inside one outer pass (here opened by hand) share one rebuild: the first takes its weights,
    the second (after every member took its own) builds each layer's own, and its recompute saves what it saved (at
    ec78bda a fallback in such a pass crashed in its recompute)."""
    calls = count_rebuilds(monkeypatch)
    dense, batched = pair()
    checkpointed(dense, batched, reentrant=False)
    for model in (dense, batched):
        rebuilds = model.base_model._sltrain_rebuilds
        rebuilds.begin_pass()
        try:
            value = loss(model, input_ids) + loss(model, input_ids[:1])
        finally:
            rebuilds.end_pass()
        value.backward()
    assert len(calls) == 4
    assert_same_grads(dense, batched)


# no copy of the weights from the forward to the backward


def watch_rebuilds(monkeypatch) -> list:
    """Weak references to the (L, d_out, d_in) weights of every batched rebuild, forward's and backward's, and to
    every stacked `dW` of a backward that is a buffer of its own (not the backward's rebuilt weights, written over),
    in the order made."""
    made = []
    rebuild, grad_slot = batched_module._rebuild, batched_module._BatchedRebuild.grad_slot

    def watched(*args):
        weights = rebuild(*args)
        made.append(weakref.ref(weights))
        return weights

    def watched_slot(node, *args):
        slot = grad_slot(node, *args)
        stacked = node.backwards[torch._C._current_graph_task_id()].grads
        if not any(ref() is stacked for ref in made):
            made.append(weakref.ref(stacked))
        return slot

    monkeypatch.setattr(batched_module, "_rebuild", watched)
    monkeypatch.setattr(batched_module._BatchedRebuild, "grad_slot", watched_slot)
    return made


def test_no_weights_live_from_the_forward_to_the_backward(input_ids, monkeypatch):
    """What the batched mode's memory rests on: a group's forward weights are freed at its last member's call, its
    backward's (rebuilt once, each then written over with its `dW`) at its own backward, though the graph lives on
    (here `value`; a training loop's loss lives through the optimizer's step); without Python's cycle collector."""
    made = watch_rebuilds(monkeypatch)
    dense, batched = pair()
    alive_at_the_head = []
    head = batched.base_model.model.lm_head  # (the logits and the loss come after all layers, in the same pass)
    head.register_forward_pre_hook(lambda *_: alive_at_the_head.append(sum(ref() is not None for ref in made)))
    gc.disable()
    try:
        value = loss(batched, input_ids)
        assert alive_at_the_head == [0]
        assert len(made) == 4 and all(ref() is None for ref in made)
        value.backward()
        assert len(made) == 8 and all(ref() is None for ref in made)  # 4 more rebuilds, then the stacked `dW`
    finally:
        gc.enable()
    loss(dense, input_ids).backward()
    assert_same_grads(dense, batched)


def test_factors_changed_in_place_before_backward_are_refused(input_ids):
    """The backward rebuilds the weights from the factors themselves: an in-place change between forward and
    backward (an optimizer step too early) must raise, as autograd does for a saved tensor, not give wrong grads."""
    _, batched = pair()
    value = loss(batched, input_ids)
    with torch.no_grad():
        layers(batched)[-1].sltrain_B["default"].add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place between the forward and the backward"):
        value.backward()


@pytest.mark.parametrize("factor", ["sltrain_A", "sltrain_B", "sltrain_values"])
def test_factors_changed_in_place_before_backward_of_a_layer_called_alone_are_refused(factor):
    """Called outside a pass of its model, a layer builds its own weight under saved-tensor hooks, with which autograd
    no longer compares a saved tensor's version: the hooks do (fp32, where the factors are saved uncast)."""
    _, batched = pair()
    layer = layers(batched)[-1]
    x = torch.randn(3, layer.in_features, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        getattr(layer, factor)["default"].add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place between the forward and the backward"):
        y.sum().backward()


def test_a_layer_called_twice_in_one_pass(input_ids):
    """A layer used three times in one pass: again while its group's weights are alive (both `dW` summed, then
    copied into its slot of the group's stacked `dW`), and once more after every member took its own (its own
    weight)."""
    dense, batched = pair()
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(3, m.in_features, dtype=torch.float64, generator=generator) for m in layers(dense)]
    first = [torch.randn(3, inputs[0].shape[1], dtype=torch.float64, generator=generator) for _ in range(2)]
    for model in (dense, batched):
        rebuilds = model.base_model._sltrain_rebuilds
        rebuilds.begin_pass()
        try:
            calls = [(m, x) for m, x in zip(layers(model), inputs)]
            calls.insert(1, (layers(model)[0], first[0]))
            calls.append((layers(model)[0], first[1]))
            total = sum(m(x).pow(2).sum() for m, x in calls)
        finally:
            rebuilds.end_pass()
        total.backward()
    assert_same_grads(dense, batched)


def test_a_backward_to_the_inputs_alone_then_the_full_backward(input_ids):
    """`autograd.grad` for the inputs runs the layers' backwards but not their groups': the full backward after it
    starts a stacked `dW` of its own."""
    dense, batched = pair()
    grads = []
    for model in (dense, batched):
        embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_()
        value = model(inputs_embeds=embeds, labels=input_ids).loss
        grads.append(torch.autograd.grad(value, embeds, retain_graph=True)[0])
        value.backward()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)
    assert_same_grads(dense, batched)


def test_a_layer_called_alone_has_a_second_derivative():
    """Its own weight's product is differentiable twice, as the dense path is (only the batched rebuild is not)."""
    dense, batched = pair()
    second = []
    for model in (dense, batched):
        layer = layers(model)[0]
        x = torch.randn(3, layer.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        x.requires_grad_()
        (dx,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
        second.append(torch.autograd.grad(dx.pow(2).sum(), layer.sltrain_A["default"])[0])
    torch.testing.assert_close(second[1], second[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("one_layer_per_group", [False, True])
def test_groups_hold_at_most_chunk_bytes_of_weights(input_ids, monkeypatch, one_layer_per_group):
    """A kind of layer is split into groups of at most `CHUNK_BYTES` of weights, each rebuilt at its first member's
    call in forward and in backward: with one layer per group, one rebuilt weight lives at a time (with one group per
    kind, up to one per kind: 4), and the gradients are the dense path's."""
    if one_layer_per_group:
        monkeypatch.setattr(batched_module, "CHUNK_BYTES", 1)
    alive, most = [], [0]
    rebuild = batched_module._rebuild

    def watched(*args):
        weights = rebuild(*args)
        alive.append(weakref.ref(weights))
        most[0] = max(most[0], sum(ref() is not None for ref in alive))
        return weights

    monkeypatch.setattr(batched_module, "_rebuild", watched)
    dense, batched = pair()
    gc.disable()
    try:
        loss(batched, input_ids).backward()
    finally:
        gc.enable()
    loss(dense, input_ids).backward()
    assert_same_grads(dense, batched)
    assert len(alive) == (2 * 14 if one_layer_per_group else 2 * 4)  # 14 layers; a rebuild in forward and backward
    assert most[0] == (1 if one_layer_per_group else 4)


# review CA


def test_members_write_their_gradients_into_the_stacked_buffer(input_ids, monkeypatch):
    """In a pass that calls each layer once, every `dW_i` the group's node receives already lies in its slot of the
    stacked buffer: nothing is copied (kills a `grad_slot` that hands out no slots: an extra copy of dW each step)."""
    copies = []
    copy_ = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, *a, **k: copies.append(self.shape) or copy_(self, *a, **k))
    dense, batched = pair()
    loss(batched, input_ids).backward()
    weights = {(m.out_features, m.in_features) for m in layers(batched)}
    assert not [shape for shape in copies if tuple(shape) in weights]
    loss(dense, input_ids).backward()
    assert_same_grads(dense, batched)


def tanh_pair(blocks: int = 4, width: int = 16, per_row: bool = False):
    """Two copies of a from-scratch stack of `blocks` tanh(Linear) layers of one shape (one group), fp64: dense and
    batched, with equal weights. The model maps x to the mean of its output's squares (`per_row`: each row's sum)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(blocks))

        def forward(self, x):
            for layer in self.l:
                x = torch.tanh(layer(x))
            return x.pow(2).sum(-1) if per_row else x.pow(2).mean()

    config = SLTrainConfig(r=2, sparsity=0.2, from_scratch=True, target_modules=[str(i) for i in range(blocks)])
    dense = get_peft_model(Net(), config).double()
    dense.set_compute("dense")
    perturb_trainable(dense)
    batched = copy.deepcopy(dense)
    batched.set_compute("batched")
    return dense, batched


def test_a_penalty_on_the_input_gradient():
    """F1. `autograd.grad(loss, x, create_graph=True)`, then the loss plus a penalty on that gradient (R1, WGAN-GP):
    the rebuild is differentiated once; the dense path's gradients."""
    dense, batched = tanh_pair()
    x0 = torch.randn(3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for model in (dense, batched):
        x = x0.clone().requires_grad_()
        value = model(x)
        (g,) = torch.autograd.grad(value, x, create_graph=True)
        (value + g.pow(2).sum()).backward()
    assert_same_grads(dense, batched)


def test_weights_built_on_their_own_go_with_their_backward(input_ids, monkeypatch):
    """F2. The decoder called on its own (outside a pass) builds each layer's weight on its own: freed by the
    backward, though the loss lives on; kept where the graph is (retain_graph)."""
    made = []
    plain = batched_module.plain_weight

    def watched(*args):
        weight = plain(*args)
        made.append(weakref.ref(weight))
        return weight

    monkeypatch.setattr(batched_module, "plain_weight", watched)
    _, batched = pair()
    gc.disable()
    try:
        value = batched.base_model.model.model(input_ids=input_ids).last_hidden_state.pow(2).mean()
        assert len(made) == 14
        value.backward(retain_graph=True)
        assert all(ref() is not None for ref in made)
        value.backward()
        assert all(ref() is None for ref in made)
    finally:
        gc.enable()


def test_a_backward_that_does_not_reach_the_groups_leaves_nothing_on_them(input_ids, monkeypatch):
    """F3. `autograd.grad` for the inputs alone runs the layers' backwards (which rebuild the groups' weights and fill
    a stacked dW) but not the groups': its end drops them, though the loss lives on."""
    made = watch_rebuilds(monkeypatch)
    _, batched = pair()
    embeds = batched.get_input_embeddings()(input_ids).detach().requires_grad_()
    gc.disable()
    try:
        value = batched(inputs_embeds=embeds, labels=input_ids).loss
        torch.autograd.grad(value, embeds)
        assert len(made) == 8 and all(ref() is None for ref in made)  # forward, backward (then stacked dW)
    finally:
        gc.enable()


def test_factors_changed_after_a_backward_to_the_inputs_are_refused(input_ids):
    """F6. Each backward rebuilds and checks the factors again (none reuses an earlier backward's weights)."""
    _, batched = pair()
    embeds = batched.get_input_embeddings()(input_ids).detach().requires_grad_()
    value = batched(inputs_embeds=embeds, labels=input_ids).loss
    torch.autograd.grad(value, embeds, retain_graph=True)
    with torch.no_grad():
        layers(batched)[-1].sltrain_B["default"].add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place between the forward and the backward"):
        value.backward()


def test_supports_rewritten_between_forward_and_backward_are_refused(input_ids):
    """F5. The backward reads the supports again: rewritten in place, it would give gradients for another support."""
    _, batched = pair()
    value = loss(batched, input_ids)
    with torch.no_grad():
        support = layers(batched)[0].sltrain_indices["default"]
        support.copy_(torch.arange(support.numel(), dtype=support.dtype))
    with pytest.raises(RuntimeError, match="or support were modified in place"):
        value.backward()


def test_a_layer_called_alone_after_an_interrupted_pass_and_a_step(input_ids):
    """F4. A KeyboardInterrupt leaves its pass open until the next call of the model; a layer called on its own in
    between, after an optimizer step, must not take that pass's (stale) weights."""
    dense, batched = pair()
    outputs = []
    for model in (dense, batched):
        interrupt_a_forward(model, input_ids)
        with torch.no_grad():  # an optimizer step
            for p in model.parameters():
                if p.requires_grad:
                    p.mul_(1.5)
        layer = model.base_model.model.model.layers[1].self_attn.q_proj
        x = torch.randn(3, layer.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        outputs.append(layer(x.requires_grad_()))
        outputs[-1].pow(2).sum().backward()
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-10, atol=1e-12)
    assert_same_grads(dense, batched)


# review CB


X = torch.randn(3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("wrt", ["inputs", "factors"])
def test_a_backward_under_vmap(wrt):
    """B1. `autograd.grad(..., is_grads_batched=True)` runs the backward under vmap (per-row Jacobians), which has no
    rule for the writes into the stacked dW."""
    results = []
    for model in tanh_pair(per_row=True):
        x = X.clone().requires_grad_()
        inputs = [x] if wrt == "inputs" else [p for p in model.parameters() if p.requires_grad]
        results.append(torch.autograd.grad(model(x), inputs, torch.eye(3, dtype=torch.float64), is_grads_batched=True))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_second_derivatives_for_the_inputs():
    """F1's path: a Hessian-vector product and a vectorized Hessian for the inputs, as the dense path's."""
    v = torch.randn(3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    products, hessians = [], []
    for model in tanh_pair():
        x = X.clone().requires_grad_()
        (g,) = torch.autograd.grad(model(x), x, create_graph=True)
        products.append(torch.autograd.grad((g * v).sum(), x)[0])
        hessians.append(torch.autograd.functional.hessian(model, X[:1], vectorize=True))
    torch.testing.assert_close(products[1], products[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hessians[1], hessians[0], rtol=1e-10, atol=1e-12)


def test_factors_changed_before_a_second_derivative_for_the_inputs_are_refused():
    """F1's path reads the group's factors: changed in place since the forward, it refuses (kills that path without
    the version check: it would differentiate another weight than the forward's)."""
    _, batched = tanh_pair()
    x = X.clone().requires_grad_()
    value = batched(x)
    with torch.no_grad():
        batched.base_model.model.l[1].sltrain_B["default"].add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place between the forward and the backward"):
        torch.autograd.grad(value, x, create_graph=True)


def test_frozen_factors():
    """B2. Every factor frozen, gradients for the inputs (saliency): the group's weights have no autograd node."""
    results = []
    for model in tanh_pair():
        model.requires_grad_(False)
        x = X.clone().requires_grad_()
        results.append(torch.autograd.grad(model(x), x)[0])
    torch.testing.assert_close(results[1], results[0], rtol=1e-10, atol=1e-12)


def test_frozen_adapters_and_the_rest_trained(input_ids):
    dense, batched = pair()
    for model in (dense, batched):
        for name, p in model.named_parameters():
            p.requires_grad_("sltrain" not in name)
        loss(model, input_ids).backward()
    assert_same_grads(dense, batched)


def failing_once(model):
    """`model`'s forward, with a gradient hook after its first layer that raises in its first backward (B3)."""
    net, armed = model.base_model.model, [True]

    def hook(grad):
        if armed[0]:
            armed[0] = False
            raise FloatingPointError

    def forward(x):
        x = torch.tanh(net.l[0](x))
        x.register_hook(hook)
        for layer in net.l[1:]:
            x = torch.tanh(layer(x))
        return x.pow(2).mean()

    net.forward = forward


def test_a_backward_after_one_that_raised():
    """B3. A backward that raises leaves its groups' state behind until the graph is freed (PyTorch runs no callback
    then); the next backward of the kept graph makes its own, and checks the factors again."""
    dense, batched = tanh_pair()
    for model in (dense, batched):
        failing_once(model)
        value = model(X.clone().requires_grad_())
        with pytest.raises(FloatingPointError):
            value.backward(retain_graph=True)
        model.zero_grad()
        value.backward(retain_graph=True)
    assert_same_grads(dense, batched)
    with torch.no_grad():
        batched.base_model.model.l[2].sltrain_A["default"].add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place between the forward and the backward"):
        value.backward()


# review CD


def assert_same_with_forward(forward) -> None:
    """The tanh nets' forward replaced by `forward(net, x)` (the model's hooks still open a pass around it): the same
    gradients, dense and batched, for the parameters and the input."""
    dense, batched = tanh_pair()
    grads = []
    for model in (dense, batched):
        net = model.base_model.model
        net.forward = lambda x, net=net: forward(net, x)
        x = X.clone().requires_grad_()
        model(x).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)
    assert_same_grads(dense, batched)


def test_a_layer_called_three_times_reads_its_weight_in_each_backward():
    """Each call of a layer taken again while its group lives reads its weight in backward (its input needs a
    gradient): no call's `dW` may be written over that weight before the last has read it (kills a first-call-gets-
    the-slot rule, which gives wrong input gradients)."""

    def forward(net, x):
        h = torch.tanh(net.l[0](x))
        h = torch.tanh(net.l[1](h))
        h = torch.tanh(net.l[1](h))  # taken again
        h = torch.tanh(net.l[2](h))
        h = torch.tanh(net.l[1](h))  # and again, the group still alive (l[3] not taken yet)
        return torch.tanh(net.l[3](h)).pow(2).mean()

    assert_same_with_forward(forward)


def test_a_first_backward_that_needs_no_input_gradient():
    """The group's first layer in backward needs no input gradient, so no rebuild yet: its `dW` goes into a buffer of
    its own, and the later layers' rebuild is read, not written over."""

    def forward(net, x):
        h = torch.tanh(net.l[2](torch.tanh(net.l[1](torch.tanh(net.l[0](x))))))
        return (h + net.l[3](X.flip(0))).pow(2).mean()  # l[3]'s input needs no gradient; its backward runs first

    assert_same_with_forward(forward)


def test_backwards_of_one_kept_graph_in_several_threads():
    """Each backward has its own rebuild: concurrent ones (threads backpropagating one retained graph) do not write
    their `dW` over the weights another is reading (one shared state gave wrong gradients in 2 to 5 of these 120)."""
    torch.manual_seed(0)
    _, batched = tanh_pair(blocks=8, width=64)
    x = torch.randn(256, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    value = batched(x)
    inputs = [p for p in batched.parameters() if p.requires_grad] + [x]
    want = torch.autograd.grad(value, inputs, retain_graph=True)
    wrong = []

    def work():
        for _ in range(30):
            got = torch.autograd.grad(value, inputs, retain_graph=True)
            wrong.extend(
                i for i, (a, b) in enumerate(zip(got, want)) if not torch.allclose(a, b, rtol=1e-9, atol=1e-12)
            )

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


# `compute="auto"` takes the batched rebuild on the devices of `AUTO_DEVICE_TYPES` (CUDA); here CPU stands in for it.


def auto_model(blocks: int = 2, **settings):
    settings = dict(r=4, sparsity=0.1, alpha=8, from_scratch=True, compute="auto") | settings
    model = get_peft_model(tiny_llama(num_hidden_layers=blocks), SLTrainConfig(**settings)).double()
    perturb_trainable(model)
    return model.train()


def test_auto_batches_on_the_auto_devices_alone(input_ids, monkeypatch):
    """On CPU auto keeps its per-call choice; on a device of `AUTO_DEVICE_TYPES` it computes exactly as batched."""
    assert batched_module.AUTO_DEVICE_TYPES == ("cuda",)
    auto = auto_model()
    explicit = copy.deepcopy(auto)
    explicit.set_compute("batched")
    dense = copy.deepcopy(auto)
    dense.set_compute("dense")
    loss(auto, input_ids).backward()
    assert not groups(auto) and not any("_sltrain_took" in m.__dict__ for m in layers(auto))
    auto.zero_grad()

    monkeypatch.setattr(batched_module, "AUTO_DEVICE_TYPES", ("cpu",))
    for model in (auto, explicit, dense):
        loss(model, input_ids).backward()
    assert len(groups(auto)) == 4
    for (name, a), (_, b) in zip(trainable_grads(auto).items(), trainable_grads(explicit).items()):
        assert torch.equal(a, b), name  # the same ops
    assert_same_grads(dense, auto)


def test_auto_keeps_its_per_call_choice_where_batched_does_not_apply(input_ids, monkeypatch):
    """Without grad, and for fine-tuning layers (a frozen `W0`), auto on a batching device keeps its per-call
    choice."""
    monkeypatch.setattr(batched_module, "AUTO_DEVICE_TYPES", ("cpu",))
    model = auto_model()
    with torch.no_grad():
        loss(model, input_ids)
    assert not groups(model)

    tuned = auto_model(from_scratch=False, target_modules=["q_proj", "down_proj"])
    reference = copy.deepcopy(tuned)
    reference.set_compute("dense")
    for m in (tuned, reference):
        loss(m, input_ids).backward()
    assert not groups(tuned)
    assert_same_grads(reference, tuned)


def mark_as_zero3(model) -> None:
    """Mark every parameter as DeepSpeed ZeRO-3 does (its partitioned parameters carry a `ds_id`)."""
    for i, p in enumerate(model.parameters()):
        p.ds_id = i


def test_auto_does_not_batch_a_zero3_model(input_ids, monkeypatch):
    """DeepSpeed ZeRO-3's parameters keep auto to its per-call choice, also in a checkpoint's recompute after batched
    passes (which must take the forward's path)."""
    monkeypatch.setattr(batched_module, "AUTO_DEVICE_TYPES", ("cpu",))
    model = auto_model()
    dense = copy.deepcopy(model)
    dense.set_compute("dense")
    loss(model, input_ids).backward()
    assert len(groups(model)) == 4
    model.zero_grad()
    mark_as_zero3(model)
    for m in (model, dense):
        m.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
        loss(m, input_ids).backward()
    assert not groups(model) and not any("_sltrain_took" in m.__dict__ for m in layers(model))
    assert_same_grads(dense, model)


def test_batched_in_a_sharded_model_is_refused(input_ids):
    _, model = pair()
    mark_as_zero3(model)
    with pytest.raises(ValueError, match=r"Adapter 'default' has compute='batched'.*sharded.*set_compute\('auto'\)"):
        loss(model, input_ids)


def test_a_recompute_follows_its_forward_when_the_model_is_sharded_in_between(input_ids, monkeypatch):
    """The recompute takes the path its forward took, without asking again whether the model is sharded."""
    monkeypatch.setattr(batched_module, "AUTO_DEVICE_TYPES", ("cpu",))
    model = auto_model()
    dense = copy.deepcopy(model)
    dense.set_compute("dense")
    for m in (model, dense):
        m.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
    value = loss(model, input_ids)
    assert len(groups(model)) == 4
    mark_as_zero3(model)
    model.base_model._sltrain_rebuilds._sharded = (-1, False)  # the pass's answer forgotten: asked again, it changes
    value.backward()
    loss(dense, input_ids).backward()
    assert_same_grads(dense, model)


def test_auto_members_join_groups_on_the_auto_devices_alone(monkeypatch):
    _, model = pair()
    model.set_compute("auto")
    layer = layers(model)[0]
    A = layer.sltrain_A["default"]
    assert not batched_module._eligible(layer, "default", A)
    monkeypatch.setattr(batched_module, "AUTO_DEVICE_TYPES", ("cpu",))
    assert batched_module._eligible(layer, "default", A)
    assert not batched_module._eligible(layer, "default", A.to("meta"))  # (the device of the `A` given)


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "wrap", ["blocks", "outside", "outside-orig-params"], ids=["blocks", "outside", "outside-orig-params"]
)
def test_auto_under_fsdp1_keeps_to_its_per_call_choice_and_batched_is_refused(
    input_ids, monkeypatch, one_process_group, wrap
):
    """FSDP1 on one CPU process: its wrapped blocks inside the model, or the model wrapped from outside; in forward
    the parameters are views of its flat parameter (`use_orig_params` either way)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    monkeypatch.setattr(batched_module, "AUTO_DEVICE_TYPES", ("cpu",))
    model = auto_model()
    dense = copy.deepcopy(model)
    dense.set_compute("dense")
    policy = ModuleWrapPolicy({LlamaDecoderLayer}) if wrap == "blocks" else None
    wrapped = FSDP(model, device_id=torch.device("cpu"), auto_wrap_policy=policy, use_orig_params=wrap != "outside")
    got, want = loss(wrapped, input_ids), loss(dense, input_ids)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert not groups(model) and not any("_sltrain_took" in m.__dict__ for m in layers(model))
    if wrap != "outside":  # (the original parameters, and their gradients, are there to compare)
        with FSDP.summon_full_params(wrapped, with_grads=True):
            grads = {n.replace("_fsdp_wrapped_module.", ""): g for n, g in trainable_grads(model).items()}
            for name, g in trainable_grads(dense).items():
                torch.testing.assert_close(grads[name], g, rtol=1e-10, atol=1e-12, msg=name)
    model.set_compute("batched")
    with pytest.raises(ValueError, match="compute='batched'.*sharded"):
        loss(wrapped, input_ids)


@pytest.mark.parametrize("fsdp_module_hidden", [False, True], ids=["", "FSDPModule-from-composable"])
def test_auto_under_fsdp2_keeps_to_its_per_call_choice_and_batched_is_refused(
    input_ids, monkeypatch, one_process_group, fsdp_module_hidden
):
    """`fully_shard` (FSDP2, here on one CPU process) swaps whole parameters in for each block's forward, which the
    layers cannot tell from unsharded ones: the model's FSDP modules keep auto off the batched rebuild. Before torch
    2.6 `FSDPModule` was importable from `torch.distributed._composable.fsdp` alone."""
    import torch.distributed.fsdp
    from torch.distributed.fsdp import fully_shard

    monkeypatch.setattr(batched_module, "AUTO_DEVICE_TYPES", ("cpu",))
    if fsdp_module_hidden:
        monkeypatch.delattr(torch.distributed.fsdp, "FSDPModule")
    model = auto_model()
    loss(model, input_ids).backward()  # a batched pass before the model is sharded
    assert len(groups(model)) == 4
    model.zero_grad()
    dense = copy.deepcopy(model)
    dense.set_compute("dense")
    for block in model.base_model.model.model.layers:
        fully_shard(block)
    fully_shard(model)
    for m in (model, dense):
        loss(m, input_ids).backward()
    assert not groups(model)
    for name, g in trainable_grads(dense).items():
        got = trainable_grads(model)[name]
        torch.testing.assert_close(got.full_tensor(), g, rtol=1e-10, atol=1e-12, msg=name)
    model.set_compute("batched")
    with pytest.raises(ValueError, match="compute='batched'.*sharded"):
        loss(model, input_ids)
