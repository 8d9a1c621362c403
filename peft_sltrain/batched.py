"""`compute="batched"`: the dense weights of all like-shaped from-scratch layers rebuilt in one batched GEMM per pass.

On a GPU, SLTrain's layer calls at the 60M shape are bound by the CPU's work per op, not by arithmetic
(docs/compute_paths.md, "On a GPU"): the dense path launches about 16 kernels per layer forward + backward (casts of
the factors and values, the rebuild of `W` in forward and again in backward, the gather of `dS`, the casts of three
gradients) against `nn.Linear`'s 5 (40 dispatched ops against 20, views included, as the docs count them). Batched,
each group of L layers of one shape (the 60M LLaMA has three: the attention projections, gate/up, down) costs per
forward of the model

    forward:   stack + cast of A, B and the values, one `baddbmm` for the L products `s B_i A_i`, one `index_add_`
               for the L sparse parts; then each layer a plain `F.linear` on its slice `W_i`
    backward:  each layer `F.linear`'s two GEMMs; then, once all L `dW_i` are in, one stack, two `baddbmm` for the
               factors' gradients, one `index_select` for `dS`, three casts (of the stacks: one each, where autograd
               would cast each layer's gradients)

so the launches per layer fall below `nn.Linear`'s. The price is memory: the L rebuilt `W_i` (compute dtype, views of
one tensor) stay alive from the forward until the group's backward, and the L `dW_i` (plus their stacked copy) until
the last of them comes in: one bf16 copy of the adapted weights through the forward, up to about two at the groups'
backward (full-rank training under autocast keeps its weights' bf16 copies too, besides its fp32 weights, gradients
and optimizer states). So it is never chosen by `"auto"`.

A pass is one call of the `SLTrainModel` or of the model it wraps (their forward hooks); a group is rebuilt at its
first use in each pass, and the pass drops its weights at its end (autograd keeps them for backward; several forwards
before one backward keep a copy each). A layer called with grad that takes no batched weight (outside a pass: a layer
or block called on its own; a layer that joined no group) builds its own in plain differentiable ops, and so does
every layer recomputed in backward by activation checkpointing: `F.linear` then saves the same tensors in a forward
and in its recompute (non-reentrant checkpointing compares them), and gradients reach the factors (reentrant
checkpointing backpropagates through the recompute). The dense path runs without grad (evaluation, generation), for a
layer with a frozen `W0` (fine-tuning), under `torch.compile`, `torch.func` or forward-mode AD, and in the recompute of
a layer that never ran with grad (reentrant checkpointing's first forward runs without). The batched rebuild has no
second derivative (double backward is refused).
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch import nn
from torch.autograd import forward_ad

from .cost import exporting
from .functional import plain_weight


class BatchedRebuilds:
    """An `SLTrainModel`'s rebuilt weights for `compute="batched"`, per pass. The model's forward hooks call
    `begin_pass` and `end_pass`; its layers hold it as `_sltrain_rebuilds`, and their group and place in it, for the
    pass that made it, as `_sltrain_slot[(adapter name, dtype)]`."""

    def __init__(self, model: nn.Module | None) -> None:
        # the SLTrainModel and its layers, weakly: the layers hold this, and a cycle would keep a deleted model's
        # tensors until Python's cycle collector runs
        self._model = None if model is None else weakref.ref(model)
        self._layers: list[weakref.ref] | None = None  # listed at the first rebuild (again where a layer is missing)
        self._listed = 0  # the pass in which they were last listed
        self.depth = 0  # > 0 while the model's forward runs
        self._opener = None  # the frame that opened the pass
        self.generation = 0  # the pass
        self.built: dict[tuple, int] = {}  # (adapter name, dtype) -> the pass whose groups were built
        self.current: list[_Group] = []  # the groups this pass built, whose weights its end drops
        self.indices: dict[tuple, tuple] = {}  # per kind of layer: (its supports, their versions, flat positions)

    def __deepcopy__(self, memo):
        # a copied model's: its layers and hooks, copied, map to it through `memo`. A copy of the inner model alone
        # has no tuner of its own and is never batched (it must not rebuild the original's layers)
        model = None if self._model is None else self._model()
        return BatchedRebuilds(None if model is None else memo.get(id(model)))

    def __reduce__(self):  # pickled without its model, which a layer or block pickled alone must not carry along
        return BatchedRebuilds, (None,)  # (`SLTrainModel.__setstate__` ties it to a loaded model)

    def begin_pass(self, *_) -> None:
        if torch.compiler.is_compiling():  # (a compiled model takes the dense path; a counter traced would be a guard,
            return  # and each pass a recompile)
        if self.depth > 0 and not _on_stack(self._opener, sys._getframe(1)):
            # the pass that was open never ended: a BaseException (KeyboardInterrupt) skips `always_call` hooks
            self.depth = 1
            self.end_pass()
        if self.depth == 0:
            self.generation += 1
            self._opener = sys._getframe(1)  # the caller's frame (the module's `_call_impl`), while the pass runs
        self.depth += 1

    def end_pass(self, *_) -> None:
        if torch.compiler.is_compiling():
            return
        self.depth = max(self.depth - 1, 0)
        if self.depth == 0:  # no layer takes the pass's weights any more: only autograd keeps them, for backward
            for group in self.current:
                group.weights = None
            self.current = []
            self._opener = None

    def forget_layers(self) -> None:
        """List the layers again at the next rebuild (the model's layers changed)."""
        self._layers = None

    def layers(self) -> list:
        if self._layers is None:
            from .layer import SLTrainLayer  # (layer imports this module)

            model = None if self._model is None else self._model()
            found = [] if model is None else [m for m in model.modules() if isinstance(m, SLTrainLayer)]
            self._layers = [weakref.ref(m) for m in found if m.__dict__.get("_sltrain_rebuilds") is self]
            self._listed = self.generation
        return [m for m in (ref() for ref in self._layers) if m is not None]

    def rebuild(self, layer, name: str, dtype: torch.dtype) -> tuple | None:
        """Rebuild, for this pass, every group of adapter `name`'s batched layers in `dtype`; `layer`'s slot."""
        if self.built.get((name, dtype)) == self.generation:  # `layer` was not among them: not batched this pass
            return None
        self.built[(name, dtype)] = self.generation
        listed = self.layers()
        if not any(m is layer for m in listed) and self._listed != self.generation:
            self.forget_layers()  # a layer added to the model since the listing
            listed = self.layers()
        if not any(m is layer for m in listed):  # not this model's: rebuild nothing
            return None
        kinds: dict[tuple, list] = {}  # key -> [(member, its factors)]
        for m in listed:
            if _eligible(m, name):
                factors = _factors(m, name)
                if _whole(m, name, factors):
                    kinds.setdefault(_key(m, name, *factors), []).append((m, factors))
        for key in [k for k in self.indices if k[0] == name and k not in kinds]:  # kinds gone (moved, cast)
            del self.indices[key]
        for key, members in kinds.items():
            group = _Group(self.generation, dtype)
            tensors = [t for _, factors in members for t in factors]
            indices = _group_indices(self, key, [m for m, _ in members], name)
            # its saved tensors bypass the saved-tensor hooks of an enclosing activation checkpoint (this pass's
            # first batched layer call may lie in one), whose recompute in backward will not rebuild them
            with torch.autograd.graph.saved_tensors_hooks(_unchanged, _unchanged):
                group.weights = _BatchedRebuild.apply(dtype, key[4], indices, len(members), *tensors)
            self.current.append(group)
            for i, (m, _) in enumerate(members):
                m.__dict__.setdefault("_sltrain_slot", {})[(name, dtype)] = (group, i)
        slot = layer.__dict__.get("_sltrain_slot", {}).get((name, dtype))
        return slot if slot is not None and slot[0].generation == self.generation else None


def _on_stack(frame, top) -> bool:
    while top is not None:
        if top is frame:
            return True
        top = top.f_back
    return False


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class _Group:
    """The rebuilt weights of one kind of layer (adapter, shapes, r, nnz, scaling, dtypes, devices) in one pass."""

    def __init__(self, generation: int, dtype: torch.dtype):
        self.generation = generation
        self.dtype = dtype
        self.weights: tuple[torch.Tensor, ...] | None = None  # (d_out, d_in) each, during the pass

    def __reduce__(self):  # a copied or pickled layer carries nothing of a pass (nor its non-leaf weights)
        return _Group, (-1, self.dtype)


def _factors(layer, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer.sltrain_A[name], layer.sltrain_B[name], layer.sltrain_values[name]


def _whole(layer, name: str, factors: tuple[torch.Tensor, ...]) -> bool:
    """Whether `factors` are plain tensors of their full shapes: not DTensor's (FSDP2), nor the empty views that FSDP
    leaves of a layer that is not unsharded (which would be stacked with the others)."""
    A, B, values = factors
    return (
        all(type(t) in (torch.Tensor, nn.Parameter) for t in factors)
        and A.shape == (layer.r[name], layer.in_features)
        and B.shape == (layer.out_features, layer.r[name])
        and values.shape == layer.sltrain_indices[name].shape
    )


def _key(layer, name: str, A: torch.Tensor, B: torch.Tensor, values: torch.Tensor) -> tuple:
    return (name, tuple(B.shape), tuple(A.shape), values.numel(), layer.scaling[name], A.dtype, B.dtype,
            values.dtype, A.device, B.device, values.device, layer.sltrain_indices[name].device)  # fmt: skip


def _eligible(layer, name: str) -> bool:
    """Whether `layer` computes adapter `name` alone, batched, as `Linear.forward` would in this model's pass."""
    return (
        layer.compute.get(name) == "batched"
        and not layer.merged_adapters
        and not layer._disable_adapters
        and not layer.quantization
        and name in layer.active_adapters
        and layer.get_base_layer().weight is None
    )


def batched_weight(layer, name: str, x: torch.Tensor) -> torch.Tensor | None:
    """`layer`'s dense weight (d_out, d_in) in x's dtype for adapter `name`: from its group's batched rebuild, or
    built on its own (see the module's docstring); None where the layer takes the dense path. On a GPU this runs once
    per layer call, so it is kept to a few lookups."""
    rebuilds = layer.__dict__.get("_sltrain_rebuilds")
    if rebuilds is None or not torch.is_grad_enabled() or torch.compiler.is_compiling() or exporting():
        return None
    if torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0:
        return None  # torch.func transforms and forward-mode AD need plain ops (`functional._plain_sltrain_linear`)
    if torch._C._current_graph_task_id() != -1:
        # in backward: activation checkpointing recomputing the layer. A forward with grad took the batched weight or
        # its own, and saved (x, W): so does its own (non-reentrant checkpointing compares). A layer that never ran
        # with grad (reentrant checkpointing: its forwards ran without) keeps the dense path
        return _own_weight(layer, name, x) if "_sltrain_took" in layer.__dict__ else None
    layer.__dict__["_sltrain_took"] = True
    if rebuilds.depth == 0:  # outside a pass: its own weight
        return _own_weight(layer, name, x)
    slot = layer.__dict__.get("_sltrain_slot", {}).get((name, x.dtype))
    if slot is None or slot[0].generation != rebuilds.generation:
        slot = rebuilds.rebuild(layer, name, x.dtype)
        if slot is None:
            return _own_weight(layer, name, x)
    group, i = slot  # built in this pass: its weights are set until the pass ends
    return group.weights[i]


def _own_weight(layer, name: str, x: torch.Tensor) -> torch.Tensor:
    """`layer`'s weight built on its own in plain differentiable ops. Every call with grad that does not take a batched
    weight takes this, so that `F.linear` saves (x, W) whatever the pass's state: a checkpoint's recompute (which
    always takes this) saves what the forward saved. What these ops save bypasses the checkpoint's hooks."""
    A, B, values = _factors(layer, name)
    with torch.autograd.graph.saved_tensors_hooks(_unchanged, _unchanged):
        return plain_weight(A, B, values, layer.sltrain_indices[name], layer.scaling[name], x.dtype)


def _group_indices(rebuilds: BatchedRebuilds, key: tuple, members: list, name: str) -> torch.Tensor:
    """The members' supports as flat positions into the stacked (L, d_out, d_in) weights (int32 where they fit),
    made once and kept while the supports are the same tensors, unchanged."""
    supports = tuple(m.sltrain_indices[name] for m in members)
    versions = tuple(s._version for s in supports)
    kept = rebuilds.indices.get(key)
    if kept is not None and len(kept[0]) == len(supports) and all(a is b for a, b in zip(kept[0], supports)):
        if kept[1] == versions:
            return kept[2]
    entries = members[0].out_features * members[0].in_features
    dtype = torch.int32 if len(members) * entries < 2**31 else torch.int64
    offsets = torch.arange(len(members), device=supports[0].device, dtype=dtype) * entries
    indices = torch.cat(supports).to(dtype) + offsets.repeat_interleave(supports[0].numel())  # (equal nnz: the key)
    rebuilds.indices[key] = (supports, versions, indices)
    return indices


class _BatchedRebuild(torch.autograd.Function):
    """`(s B_i A_i + S_i for each member i)` as L views of one (L, d_out, d_in) tensor in `dtype`, from the members'
    `A_i`, `B_i` and `values_i` (flattened into `tensors` as A_1, B_1, v_1, A_2, ...), in their own dtype."""

    @staticmethod
    def forward(ctx, dtype, scaling, indices, count, *tensors):
        A = torch.stack(tensors[0::3]).to(dtype)  # (L, r, d_in)
        B = torch.stack(tensors[1::3]).to(dtype)  # (L, d_out, r)
        values = torch.cat(tensors[2::3]).to(dtype)  # (L nnz,)
        W = torch.baddbmm(A.new_empty(()), B, A, beta=0.0, alpha=scaling)  # (L, d_out, d_in); beta=0: input unread
        W.view(-1).index_add_(0, indices, values)
        ctx.save_for_backward(A, B, indices)
        ctx.scaling, ctx.count = scaling, count
        ctx.dtypes = tuple(t.dtype for t in tensors[:3])
        ctx.set_materialize_grads(False)
        return W.unbind(0)

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():  # create_graph=True: the stacks below have no history to differentiate
            raise RuntimeError(
                "The batched SLTrain rebuild (compute='batched') has no second derivative; use the dense path for "
                "double backward, e.g. gradient penalties on the parameters: `model.set_compute('dense')`."
            )
        A, B, indices = ctx.saved_tensors
        count = ctx.count
        if all(g is None for g in grads):
            return (None,) * (4 + 3 * count)
        zeros = None
        stacked = []
        for g in grads:
            if g is None:
                zeros = zeros if zeros is not None else A.new_zeros(B.shape[1], A.shape[2])
            stacked.append(zeros if g is None else g)
        dW = torch.stack(stacked)  # (L, d_out, d_in)
        del stacked
        need = ctx.needs_input_grad[4:]
        dA = dB = dvalues = None
        # each cast back to the factors' dtype once per stack: autograd would cast each layer's gradient on its own
        if any(need[0::3]):
            dA = torch.baddbmm(A.new_empty(()), B.transpose(1, 2), dW, beta=0.0, alpha=ctx.scaling).to(ctx.dtypes[0])
        if any(need[1::3]):
            dB = torch.baddbmm(B.new_empty(()), dW, A.transpose(1, 2), beta=0.0, alpha=ctx.scaling).to(ctx.dtypes[1])
        if any(need[2::3]):
            dvalues = dW.view(-1).index_select(0, indices).to(ctx.dtypes[2]).chunk(count)
        result = []
        for i, g in enumerate(grads):
            used = g is not None  # a member no forward took gets no gradient (as if it were not in the group)
            result += [dA[i] if used and dA is not None and need[3 * i] else None,
                       dB[i] if used and dB is not None and need[3 * i + 1] else None,
                       dvalues[i] if used and dvalues is not None and need[3 * i + 2] else None]  # fmt: skip
        return (None, None, None, None, *result)
