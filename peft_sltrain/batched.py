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
               factors' gradients, one `index_select` for `dS`, three casts

so the launches per layer fall below `nn.Linear`'s. The price is memory: the L rebuilt `W_i` (compute dtype) stay
alive from the forward until the group's backward (or the next pass, where no backward comes), and so do the L `dW_i`
(plus their stacked copy) until the last of them comes in, about as full-rank training under autocast keeps its
weights' bf16 copies (but not its fp32 weights, gradients and optimizer states). So it is never chosen by `"auto"`.

A pass is one call of the `SLTrainModel` (PEFT's model calls it): its forward pre-hook starts a new generation, and a
group is rebuilt at its first use in each generation. Where the batched rebuild does not apply, a layer computes the
same map on the dense path: outside a pass (a layer or the inner model called directly), without grad (evaluation,
generation), for a layer with a frozen `W0` (fine-tuning), under `torch.compile`, `torch.func` or forward-mode AD.
Non-reentrant activation checkpointing recomputes a layer in backward from the `W_i` its forward used; reentrant
checkpointing runs its first forward without grad, so its layers take the dense path both times.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.autograd import forward_ad

from .cost import exporting


class BatchedRebuilds:
    """An `SLTrainModel`'s rebuilt weights for `compute="batched"`, per pass. The model's forward hooks call
    `begin_pass` and `end_pass`; its layers hold it as `_sltrain_rebuilds`, and their group and place in it, for the
    pass that made it, as `_sltrain_slot[adapter name]`."""

    def __init__(self, model: nn.Module | None) -> None:
        self._model = None if model is None else weakref.ref(model)  # the SLTrainModel (not kept alive by this)
        self.depth = 0  # > 0 while the model's forward runs
        self.generation = 0  # the pass
        self.built: dict[tuple, int] = {}  # (adapter name, dtype) -> the pass whose groups were built
        self.indices: dict[tuple, tuple] = {}  # per kind of layer: (the supports' identities, their flat positions)
        self._layers: list | None = None  # the model's SLTrain layers (listed again where a layer is missing)
        self._listed = 0  # the pass in which they were last listed

    def __deepcopy__(self, memo):  # a copied model's (its layers and hooks, copied, map to it through `memo`)
        model = None if self._model is None else self._model()
        return BatchedRebuilds(memo.get(id(model), model))

    def __reduce__(self):  # pickled with its model (`torch.save(model)`): a weak reference does not pickle
        return BatchedRebuilds, (None if self._model is None else self._model(),)

    def begin_pass(self, *_) -> None:
        if torch.compiler.is_compiling():  # (a compiled model takes the dense path; a counter traced would be a guard,
            return  # and each pass a recompile)
        if self.depth == 0:
            self.generation += 1
        self.depth += 1

    def end_pass(self, *_) -> None:
        if torch.compiler.is_compiling():
            return
        self.depth = max(self.depth - 1, 0)

    def forget_layers(self) -> None:
        """List the layers again at the next rebuild (the model's layers changed: an adapter was added)."""
        self._layers = None

    def layers(self) -> list:
        if self._layers is None:
            from .layer import SLTrainLayer  # (layer imports this module)

            model = None if self._model is None else self._model()
            self._layers = [] if model is None else [m for m in model.modules() if isinstance(m, SLTrainLayer)]
            self._listed = self.generation
        return self._layers

    def rebuild(self, layer, name: str, dtype: torch.dtype) -> tuple | None:
        """Rebuild, for this pass, every group of adapter `name`'s batched layers in `dtype`; `layer`'s slot."""
        if self.built.get((name, dtype)) == self.generation:  # `layer` was not among them: not batched this pass
            return None
        self.built[(name, dtype)] = self.generation
        if not any(m is layer for m in self.layers()) and self._listed != self.generation:
            self.forget_layers()  # a layer added to the model since the listing
        if not any(m is layer for m in self.layers()):  # not this model's (a copy of the inner model alone, whose
            return None  # layers and hooks map to the tuner of the original): rebuild nothing
        kinds: dict[tuple, list] = {}  # key -> [(member, its factors)]
        for m in self.layers():
            if _eligible(m, name):
                factors = _factors(m, name)
                if _whole(m, name, factors):
                    kinds.setdefault(_key(m, name, *factors), []).append((m, factors))
        for key, members in kinds.items():
            group = _Group(self.generation, dtype)
            tensors = [t for _, factors in members for t in factors]
            indices = _group_indices(self, key, [m for m, _ in members], name)
            # its saved tensors bypass the saved-tensor hooks of an enclosing activation checkpoint (this pass's
            # first batched layer call may lie in one), whose recompute in backward will not rebuild them
            with torch.autograd.graph.saved_tensors_hooks(_unchanged, _unchanged):
                group.weights = _BatchedRebuild.apply(group, dtype, key[4], indices, len(members), *tensors)
            for i, (m, _) in enumerate(members):
                m.__dict__.setdefault("_sltrain_slot", {})[name] = (group, i)
        slot = layer.__dict__.get("_sltrain_slot", {}).get(name)
        return slot if slot is not None and slot[0].generation == self.generation else None


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class _Group:
    """The rebuilt weights of one kind of layer (adapter, shapes, r, nnz, scaling, dtypes, device) in one pass."""

    def __init__(self, generation: int, dtype: torch.dtype):
        self.generation = generation
        self.dtype = dtype
        self.weights: tuple[torch.Tensor, ...] | None = None  # (d_out, d_in) each; None again once backward ran
        self.used: set[int] = set()  # members whose W_i a forward took


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
        and "_sltrain_rebuilds" in layer.__dict__
        and not layer.merged_adapters
        and not layer._disable_adapters
        and not layer.quantization
        and name in layer.active_adapters
        and layer.get_base_layer().weight is None
    )


def batched_weight(layer, name: str, x: torch.Tensor) -> torch.Tensor | None:
    """`layer`'s rebuilt dense weight (d_out, d_in) in x's dtype for adapter `name`, from its group's batched rebuild;
    or None where the batched rebuild does not apply (the layer then takes the dense path). On a GPU this runs once
    per layer call, so it is kept to a few lookups."""
    rebuilds = layer.__dict__.get("_sltrain_rebuilds")
    if rebuilds is None or not torch.is_grad_enabled() or torch.compiler.is_compiling() or exporting():
        return None
    if torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0:
        return None  # torch.func transforms and forward-mode AD need plain ops (`functional._plain_sltrain_linear`)
    slot = layer.__dict__.get("_sltrain_slot", {}).get(name)
    if torch._C._current_graph_task_id() != -1:  # in backward: a non-reentrant checkpoint recomputing the layer
        if slot is None:  # takes what its forward took, or the saved tensors would differ
            return None
        group, i = slot
        return group.weights[i] if group.weights is not None and i in group.used and group.dtype == x.dtype else None
    if rebuilds.depth == 0:
        return None
    if slot is None or slot[0].generation != rebuilds.generation or slot[0].dtype != x.dtype:
        slot = rebuilds.rebuild(layer, name, x.dtype)
        if slot is None:
            return None
    group, i = slot
    if group.weights is None:
        return None
    group.used.add(i)
    return group.weights[i]


def _group_indices(rebuilds: BatchedRebuilds, key: tuple, members: list, name: str) -> torch.Tensor:
    """The members' supports as flat positions into the stacked (L, d_out, d_in) weights (int32 where they fit),
    made once and kept while the supports are the same tensors, unchanged."""
    supports = [m.sltrain_indices[name] for m in members]
    signature = tuple((id(s), s._version) for s in supports)
    kept = rebuilds.indices.get(key)
    if kept is not None and kept[0] == signature:
        return kept[1]
    entries = members[0].out_features * members[0].in_features
    dtype = torch.int32 if len(members) * entries < 2**31 else torch.int64
    offsets = torch.arange(len(members), device=supports[0].device, dtype=dtype) * entries
    indices = torch.cat(supports).to(dtype) + offsets.repeat_interleave(supports[0].numel())  # (equal nnz: the key)
    rebuilds.indices[key] = (signature, indices)
    return indices


class _BatchedRebuild(torch.autograd.Function):
    """`(s B_i A_i + S_i for each member i)` as L views of one (L, d_out, d_in) tensor in `dtype`, from the members'
    `A_i`, `B_i` and `values_i` (flattened into `tensors` as A_1, B_1, v_1, A_2, ...), in their own dtype."""

    @staticmethod
    def forward(ctx, group, dtype, scaling, indices, count, *tensors):
        A = torch.stack(tensors[0::3]).to(dtype)  # (L, r, d_in)
        B = torch.stack(tensors[1::3]).to(dtype)  # (L, d_out, r)
        values = torch.cat(tensors[2::3]).to(dtype)  # (L nnz,)
        W = torch.baddbmm(A.new_empty(()), B, A, beta=0.0, alpha=scaling)  # (L, d_out, d_in); beta=0: input unread
        W.view(-1).index_add_(0, indices, values)
        ctx.save_for_backward(A, B, indices)
        # the group weakly: it holds the outputs, whose graph holds `ctx`; a cycle would keep a pass that never runs
        # backward (a forward with grad, for evaluation) in memory until Python's cycle collector runs
        ctx.group, ctx.scaling, ctx.count = weakref.ref(group), scaling, count
        ctx.dtypes = tuple(t.dtype for t in tensors[:3])
        ctx.set_materialize_grads(False)
        return W.unbind(0)

    @staticmethod
    def backward(ctx, *grads):
        A, B, indices = ctx.saved_tensors
        group = ctx.group()
        if group is not None:
            group.weights = None  # the pass is over: nothing may take these weights again
        count = ctx.count
        none = (None,) * (5 + 3 * count)
        if all(g is None for g in grads):
            return none
        zeros = None
        stacked = []
        for g in grads:
            if g is None:
                zeros = zeros if zeros is not None else A.new_zeros(B.shape[1], A.shape[2])
            stacked.append(zeros if g is None else g)
        dW = torch.stack(stacked)  # (L, d_out, d_in)
        del stacked
        need = ctx.needs_input_grad[5:]
        dA = dB = dvalues = None
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
        return (None, None, None, None, None, *result)
