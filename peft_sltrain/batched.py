"""`compute="batched"` (and `"auto"` for training on a GPU): the dense weights of like-shaped from-scratch layers
rebuilt in groups, one batched GEMM each.

On a GPU, SLTrain's layer calls at the 60M shape are bound by the CPU's work per op, not by arithmetic
(docs/compute_paths.md, "On a GPU"): the dense path launches about 16 kernels per layer forward + backward (casts of
the factors and values, the rebuild of `W` in forward and again in backward, the gather of `dS`, the casts of three
gradients) against `nn.Linear`'s 5 (40 dispatched ops against 20, views included, as the docs count them). Batched,
each group of L layers of one kind (one shape; consecutive, up to `CHUNK_BYTES` of weights: the 60M LLaMA has three
groups, the attention projections, gate/up and down) costs per forward of the model

    forward:   stack + cast of A, B and the values, one `baddbmm` for the L products `s B_i A_i`, one `index_add_`
               for the L sparse parts; then each layer one GEMM on its slice `W_i`
    backward:  at the first of the group's layers, the same rebuild again; each layer two GEMMs, its `dW_i` written
               over its own `W_i` in that stack (read, and needed no more); then, once all L are in, two `baddbmm`
               for the factors' gradients, one `index_select` for `dS`, three casts (of the stacks: one each, where
               autograd would cast each layer's)

so the launches per layer fall below `nn.Linear`'s. No copy of the weights is kept from the forward to the backward:
the layers save their input alone (`_LayerLinear`), the group its members' factors as they are (no stack, no cast),
and the forward's weights are dropped once every member has taken its own. The backward's rebuilt weights, which
turn into the stacked `dW` one member at a time (one copy of the group's weights in the compute dtype), live from the
first of its layers' backwards to the group's own, when the activations that set a step's peak are mostly freed:
measured, a step's peak is at most the dense path's, in bf16 and fp32 (benchmarks/results/step_cpu_batched*.json).

A pass is one call of the `SLTrainModel` or of the model it wraps (their forward hooks); a group is rebuilt at its
first use in each pass, and its weights are dropped once all members took theirs, or at the pass's end. A layer called
with grad that takes no batched weight (outside a pass: a layer or block called on its own; a layer that joined no
group; a layer called again after its whole group) builds its own in plain differentiable ops, kept until backward,
and so does every layer recomputed in backward by activation checkpointing: a forward and its recompute then save the
same tensor (x) through the saved-tensor hooks (non-reentrant checkpointing compares them), and gradients reach the
factors (reentrant checkpointing backpropagates through the recompute). The dense path runs without grad (evaluation,
generation), for a layer with a frozen `W0` (fine-tuning), under `torch.compile`, `torch.func` or forward-mode AD,
and in the recompute of a layer that never ran with grad (reentrant checkpointing's first forward runs without). The
batched rebuild has no second derivative for the factors (refused); one for the inputs (a penalty on the input
gradients) builds each member's weight on its own.
"""

from __future__ import annotations

import sys
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad

from .cost import exporting
from .functional import plain_weight

# The most weights (in the compute dtype) one group rebuilds at once: a group is rebuilt at its first member's call in
# forward, and again at its first member's backward, and keeps its weights (in backward, each written over with its
# gradient) until its last member's. Bounding it bounds what the mode holds above the dense path's memory on small
# micro-batches (350M: three kinds of 128-256 MiB of bf16 weights each; 60M: one group per kind, 11-22 MiB), for more
# groups.
CHUNK_BYTES = 32 * 2**20

# Where `compute="auto"` takes this rebuild for from-scratch layers trained in a pass of their model, unless the model
# is sharded (`BatchedRebuilds.sharded`). On GPUs (60M and 350M LLaMA, bf16 autocast) it beat the dense path at every
# 32k-token step timed and at every 2k-token step but one noisy rerun, and peaked no higher; on CPU it lost to it at
# 350M (docs/compute_paths.md).
AUTO_DEVICE_TYPES = ("cuda",)


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
        self.built: dict[tuple, int] = {}  # (adapter name, dtype) -> the pass whose groups were made
        self._sharded: tuple[int, bool] = (-1, False)  # (the pass, whether its model was sharded: `sharded`)
        self._walked: tuple[weakref.ref | None, bool] = (None, False)  # (the factor asking, FSDP2 modules found)
        self.current: list[_Group] = []  # the groups this pass made, whose weights its end drops

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
        if self.depth == 0:  # no layer takes the pass's weights any more (autograd keeps none: backward rebuilds)
            for group in self.current:
                group.weights = group.members = None
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

    def sharded(self, layer, name: str) -> bool:
        """Whether `layer`'s parameters are sharded (FSDP, either version; DTensors, as tensor parallelism makes;
        DeepSpeed ZeRO-3): `compute="auto"` then keeps to its per-call choice (the batched rebuild is not made for
        sharding). Answered once per pass, at its first question, by the asking layer's factor `A`
        (`_sharded_factor`), or else, for FSDP2, which swaps whole `Parameter`s in for each block's forward, by the
        model's modules' classes, for which the model is walked (about 0.2 ms at 60M on this CPU) unless `A` is the
        factor the last walk was made for (wrapping swaps it)."""
        generation, answer = self._sharded
        if generation == self.generation:
            return answer
        A = layer.sltrain_A[name]
        answer = _sharded_factor(A)
        if not answer:
            walked_for, found = self._walked
            if walked_for is None or walked_for() is not A:
                model = None if self._model is None else self._model()
                found = model is not None and _has_fsdp_modules(model)
                self._walked = (weakref.ref(A), found)
            answer = found
        self._sharded = (self.generation, answer)
        return answer

    def make_groups(self, layer, name: str, dtype: torch.dtype) -> tuple | None:
        """Group, for this pass, adapter `name`'s batched layers in `dtype` (each group rebuilt at its first member's
        call); `layer`'s slot."""
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
        for m in listed:  # (the caller found the model unsharded: `batched_linear`)
            if m.compute.get(name) not in ("batched", "auto"):  # (a layer without the adapter has no tensors to read)
                continue
            factors = _factors(m, name)
            support = _support(m, name)
            if _eligible(m, name, factors[0]) and _whole(m, name, factors, support):
                kinds.setdefault(_key(m, name, *factors, support), []).append((m, factors))
        for members in kinds.values():
            first = members[0][0]
            size = max(1, CHUNK_BYTES // (first.out_features * first.in_features * dtype.itemsize))  # per group
            for start in range(0, len(members), size):
                chunk = members[start : start + size]
                group = _Group(self.generation, dtype, name, first.scaling[name], chunk)
                self.current.append(group)
                for i, (m, _) in enumerate(chunk):
                    m.__dict__.setdefault("_sltrain_slot", {})[(name, dtype)] = (group, i)
        slot = layer.__dict__.get("_sltrain_slot", {}).get((name, dtype))
        return slot if slot is not None and slot[0].generation == self.generation else None


def _on_stack(frame, top) -> bool:
    while top is not None:
        if top is frame:
            return True
        top = top.f_back
    return False


_MODIFIED_IN_PLACE = (
    "A batched SLTrain layer's factors (sltrain_A, sltrain_B, sltrain_values) or support were modified in place "
    "between the forward and the backward (e.g. an optimizer step before `backward()`); the gradients would be wrong. "
    "Run the backward first."
)


def _pack_with_version(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    return tensor, tensor._version


def _unpack_unchanged(packed: tuple[torch.Tensor, int]) -> torch.Tensor:
    """A saved tensor as it was saved: with hooks in place autograd no longer compares versions itself."""
    tensor, version = packed
    if tensor._version != version:
        raise RuntimeError(_MODIFIED_IN_PLACE)
    return tensor


class _Group:
    """The rebuilt weights, in one pass, of consecutive layers of one kind (adapter, shapes, r, nnz, scaling, dtypes,
    devices): as many as `CHUNK_BYTES` of weights hold, at least one."""

    def __init__(self, generation: int, dtype: torch.dtype, name: str = "", scaling: float = 1.0, members=()):
        self.generation = generation
        self.dtype = dtype
        self.name, self.scaling = name, scaling
        self.members: list | None = list(members)  # [(layer, its factors)] until the rebuild
        self.weights: tuple[torch.Tensor, ...] | None = None  # (d_out, d_in) each, until the last member takes its own
        self.untaken = set(range(len(self.members)))  # the members that have not taken their weight in this pass

    def take(self, i: int) -> torch.Tensor | None:
        """Member `i`'s rebuilt weight (the group rebuilt at the first call); the group's weights are dropped once
        every member has taken its own (a member called again after that gets None)."""
        if self.members:
            members, self.members = self.members, None
            tensors = [t for _, factors in members for t in factors]
            supports = tuple(_support(m, self.name) for m, _ in members)
            self.weights = _BatchedRebuild.apply(self.dtype, self.scaling, supports, len(members), *tensors)
        if self.weights is None:
            return None
        weight = self.weights[i]
        node = weight.grad_fn  # (None where the group's factors are all frozen: no backward reads them)
        if node is not None and not _BatchedRebuild.unchanged(node, i):  # a pass left open (a KeyboardInterrupt),
            return None  # then changed
        if node is not None and i not in self.untaken:  # taken again: its weight is read by two layer calls
            node.retaken.add(i)
        self.untaken.discard(i)
        if not self.untaken:  # (the pass's last use: the forward holds no copy of the weights after it)
            self.weights = None
        return weight

    def __reduce__(self):  # a copied or pickled layer carries nothing of a pass (nor its non-leaf weights)
        return _Group, (-1, self.dtype)


def _factors(layer, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # read from the ParameterDicts' `_parameters` (their `[name]` and the layer's attributes go through
    # `nn.Module.__getattr__`, about 1.5 us each, for every layer in each pass), else as they would be read
    modules = layer._modules
    found = tuple(modules[key]._parameters.get(name) for key in ("sltrain_A", "sltrain_B", "sltrain_values"))
    if any(t is None for t in found):  # (a tensor set as a plain attribute, as FSDP1 leaves its views)
        return layer.sltrain_A[name], layer.sltrain_B[name], layer.sltrain_values[name]
    return found


def _support(layer, name: str) -> torch.Tensor:
    return layer._modules["sltrain_indices"][name]  # (a BufferDict's `[name]` reads its `_buffers`)


def _whole(layer, name: str, factors: tuple[torch.Tensor, ...], support: torch.Tensor) -> bool:
    """Whether `factors` are plain tensors of their full shapes: not DTensor's (FSDP2), nor the empty views that FSDP
    leaves of a layer that is not unsharded (which would be stacked with the others)."""
    A, B, values = factors
    return (
        all(type(t) in (torch.Tensor, nn.Parameter) for t in factors)
        and A.shape == (layer.r[name], layer.in_features)
        and B.shape == (layer.out_features, layer.r[name])
        and values.shape == support.shape
    )


def _key(layer, name: str, A: torch.Tensor, B: torch.Tensor, values: torch.Tensor, support: torch.Tensor) -> tuple:
    return (name, tuple(B.shape), tuple(A.shape), values.numel(), layer.scaling[name], A.dtype, B.dtype,
            values.dtype, A.device, B.device, values.device, support.device)  # fmt: skip


def _sharded_factor(A: torch.Tensor) -> bool:
    """Whether `A` is DeepSpeed ZeRO-3's (a `ds_id`), a view of FSDP1's flat parameter (swapped in for the forward,
    whether or not `use_orig_params`), or a DTensor (tensor parallelism; FSDP2 outside its forward)."""
    return (
        hasattr(A, "ds_id")
        or getattr(A._base, "_is_flat_param", False)
        or any(cls.__name__ == "DTensor" for cls in type(A).__mro__)
    )


def _fsdp_module_types() -> tuple[type, ...]:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a PyTorch built without torch.distributed
        return ()
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import FSDPModule
    return FSDPModule, FullyShardedDataParallel


def _has_fsdp_modules(model: nn.Module) -> bool:
    types = _fsdp_module_types()
    return bool(types) and any(isinstance(m, types) for m in model.modules())


def _batches(compute: str, device: torch.device) -> bool:
    """Whether the setting `compute` batches on `device`: `"batched"`, or `"auto"` on a device of `AUTO_DEVICE_TYPES`
    (`"batched"` first: no device looked up for it)."""
    return compute == "batched" or (compute == "auto" and device.type in AUTO_DEVICE_TYPES)


def takes_batched(layer, name: str, x: torch.Tensor) -> bool:
    """Whether adapter `name` of `layer`, from scratch, asks `batched_linear` for `x W^T` (which may still answer
    None: auto's per-call choice)."""
    return layer.from_scratch[name] and _batches(layer.compute[name], x.device)


def _eligible(layer, name: str, A: torch.Tensor) -> bool:
    """Whether `layer` computes adapter `name` alone, batched, as `Linear.forward` would in this model's pass (an
    unsharded one); `A`: its factor `A`."""
    return (
        _batches(layer.compute.get(name), A.device)  # (False for a layer without the adapter: no setting)
        and not layer.merged_adapters
        and not layer._disable_adapters
        and not layer.quantization
        and name in layer.active_adapters
        and layer.get_base_layer().weight is None
    )


def batched_linear(layer, name: str, x: torch.Tensor) -> torch.Tensor | None:
    """`x W^T` for `layer`'s dense weight `W` (d_out, d_in) for adapter `name`, in x's dtype: from its group's batched
    rebuild, or built on its own (see the module's docstring); None where the layer takes the dense path. On a GPU
    this runs once per layer call, so it is kept to a few lookups."""
    rebuilds = layer.__dict__.get("_sltrain_rebuilds")
    if rebuilds is None or not torch.is_grad_enabled() or torch.compiler.is_compiling() or exporting():
        return None
    if torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0:
        return None  # torch.func transforms and forward-mode AD need plain ops (`functional._plain_sltrain_linear`)
    if torch._C._current_graph_task_id() != -1:
        # in backward: activation checkpointing recomputing the layer. A forward with grad saved x alone, as its own
        # weight's product does (non-reentrant checkpointing compares). A layer that never ran with grad (reentrant
        # checkpointing: its forwards ran without), or last ran with grad on auto's per-call choice, keeps that path
        return _own_linear(layer, name, x) if "_sltrain_took" in layer.__dict__ else None
    if rebuilds.sharded(layer, name):
        if layer.compute[name] == "batched":
            raise ValueError(
                f"Adapter {name!r} has compute='batched', which rebuilds like-shaped layers' weights together, and "
                "this model's parameters are sharded (FSDP, DTensors or DeepSpeed ZeRO-3); use compute='auto', which "
                "keeps its per-call choice there (`model.set_compute('auto')`), or 'dense'."
            )
        layer.__dict__.pop("_sltrain_took", None)  # auto's per-call choice (and its recompute's)
        return None
    layer.__dict__["_sltrain_took"] = True
    if rebuilds.depth == 0:  # outside a pass: its own weight
        return _own_linear(layer, name, x)
    slot = layer.__dict__.get("_sltrain_slot", {}).get((name, x.dtype))
    if slot is None or slot[0].generation != rebuilds.generation:
        slot = rebuilds.make_groups(layer, name, x.dtype)
        if slot is None:
            return _own_linear(layer, name, x)
    group, i = slot
    weight = group.take(i)
    if weight is None:  # called again in this pass after its whole group, or its factors changed since the rebuild
        return _own_linear(layer, name, x)
    return _LayerLinear.apply(x, weight, weight.grad_fn, i)


def _own_linear(layer, name: str, x: torch.Tensor) -> torch.Tensor:
    """`x W^T` for `layer`'s weight built on its own in plain differentiable ops. Every call with grad that takes no
    batched weight takes this, so that what goes through saved-tensor hooks is x alone whatever the pass's state: a
    checkpoint's recompute (which always takes this) saves what the forward saved. The weight, and what its ops save,
    bypass the checkpoint's hooks."""
    A, B, values = _factors(layer, name)
    with torch.autograd.graph.saved_tensors_hooks(_pack_with_version, _unpack_unchanged):
        weight = plain_weight(A, B, values, layer.sltrain_indices[name], layer.scaling[name], x.dtype)
    return _LayerLinear.apply(x, weight, None, -1)


class _BatchedRebuild(torch.autograd.Function):
    """`(s B_i A_i + S_i for each member i)` as L views of one (L, d_out, d_in) tensor in `dtype`, from the members'
    `A_i`, `B_i` and `values_i` (flattened into `tensors` as A_1, B_1, v_1, A_2, ...), in their own dtype, and their
    supports (all of one length: the group's key).

    It keeps the members' factors and supports themselves, no stack, cast or weight: in each backward, the first of
    the members' `_LayerLinear` nodes has the weights rebuilt (`rebuilt`), and each writes its `dW_i` over its own
    `W_i` (`grad_slot`); this node's backward, which autograd runs once all of them are in, uses and drops the stack,
    and the end of a backward that did not reach it drops it too. Each backward (graph task) has its own state
    (`_Backward`): backwards of one kept graph in several threads share none."""

    @staticmethod
    def forward(ctx, dtype, scaling, supports, count, *tensors):
        # the factors and supports kept as they are (leaves and buffers: no copy), checked for in-place changes as
        # saved tensors would be
        ctx.factors, ctx.supports = tensors, supports
        ctx.versions = tuple(t._version for t in (*tensors, *supports))
        ctx.dtype, ctx.scaling, ctx.count = dtype, scaling, count
        ctx.dtypes = tuple(t.dtype for t in tensors[:3])
        ctx.retaken = set()  # the members whose weight two or more layer calls took (`_Group.take`)
        ctx.backwards = {}  # graph task id -> its `_Backward`
        ctx.set_materialize_grads(False)
        A, B, values = _stacks(tensors, dtype)
        return _rebuild(A, B, values, supports, scaling).unbind(0)  # (the stacks are freed here)

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():  # create_graph=True: the stacks below have no history to differentiate
            _refuse_double_backward()
        state = ctx.backwards.pop(torch._C._current_graph_task_id(), None)  # (the backward's end then finds none)
        made = state is not None and state.stacks is not None
        stacks = state.stacks if made else _stacks(_BatchedRebuild.factors(ctx), ctx.dtype)
        stacked = None if state is None else state.grads
        del state
        A, B, _ = stacks
        del stacks
        count = ctx.count
        if all(g is None for g in grads):
            return (None,) * (4 + 3 * count)
        dW = stacked if stacked is not None else A.new_empty(count, B.shape[1], A.shape[2])  # (L, d_out, d_in)
        used = [g is not None for g in grads]  # a member no forward took gets no gradient (as if not in the group)
        if any(g is not None and _vmapped(g) for g in grads):  # (a backward under vmap: no in-place writes)
            dW = torch.stack([torch.zeros_like(dW[0]) if g is None else g for g in grads])
        else:
            start, step = dW.data_ptr(), dW.stride(0) * dW.element_size()
            for i, g in enumerate(grads):  # each `dW_i`, in place unless it came in summed (a layer called twice)
                if g is not None and (g.data_ptr() != start + i * step or g.stride() != dW.stride()[1:]):
                    dW[i].copy_(g)
        del grads
        need = ctx.needs_input_grad[4:]
        dA = dB = dvalues = None
        # each cast back to the factors' dtype once per stack: autograd would cast each layer's gradient on its own
        if any(need[0::3]):
            dA = torch.baddbmm(A.new_empty(()), B.transpose(1, 2), dW, beta=0.0, alpha=ctx.scaling)
            dA = dA.to(ctx.dtypes[0]).unbind(0)
        if any(need[1::3]):
            dB = torch.baddbmm(B.new_empty(()), dW, A.transpose(1, 2), beta=0.0, alpha=ctx.scaling)
            dB = dB.to(ctx.dtypes[1]).unbind(0)
        if any(need[2::3]):
            dvalues = dW.view(-1).index_select(0, _flat_positions(ctx.supports, dW.shape[1] * dW.shape[2]))
            dvalues = dvalues.to(ctx.dtypes[2]).chunk(count)
        result = []  # (an unused member's slice of dW holds its weight, or nothing: its results are dropped here)
        for i in range(count):
            result += [dA[i] if used[i] and dA is not None and need[3 * i] else None,
                       dB[i] if used[i] and dB is not None and need[3 * i + 1] else None,
                       dvalues[i] if used[i] and dvalues is not None and need[3 * i + 2] else None]  # fmt: skip
        return (None, None, None, None, *result)

    @staticmethod
    def factors(node) -> tuple[torch.Tensor, ...]:
        if any(t._version != v for t, v in zip((*node.factors, *node.supports), node.versions)):
            raise RuntimeError(_MODIFIED_IN_PLACE)
        return node.factors

    @staticmethod
    def unchanged(node, i: int) -> bool:
        """Whether member `i`'s factors and support are as the forward rebuilt them."""
        tensors = (*node.factors[3 * i : 3 * i + 3], node.supports[i])
        versions = (*node.versions[3 * i : 3 * i + 3], node.versions[3 * node.count + i])
        return all(t._version == v for t, v in zip(tensors, versions))

    @staticmethod
    def rebuilt(node) -> tuple[torch.Tensor, ...]:
        """The L (d_out, d_in) weights again (`node`: this function's node), made once per backward and kept, with the
        stacks they came from, until this node's backward or the backward's end."""
        state = _this_backward(node)
        if state.weights is None:
            state.stacks = _stacks(_BatchedRebuild.factors(node), node.dtype)
            state.rebuilt = _rebuild(*state.stacks, node.supports, node.scaling)
            state.weights = state.rebuilt.unbind(0)
        return state.weights

    @staticmethod
    def grad_slot(node, i: int, d_out: int, d_in: int, like: torch.Tensor) -> torch.Tensor | None:
        """Member `i`'s (d_out, d_in) slice of this backward's stacked `dW` (`like`'s dtype and device), or None for a
        member taken twice in one pass (autograd sums its gradients, and the backward above copies the sum in).

        The stack is the backward's rebuilt weights where they were made: each member writes its `dW_i` over its own
        `W_i`, which it has read, and which no other layer call reads (`dy` has the weights' dtype: autograd casts a
        gradient to its output's). A group then holds one copy of its weights in backward, not two; two where a layer
        that needs no input gradient runs its backward before the group's first that does (not in a LLaMA: its last
        layers' inputs all need one)."""
        state = _this_backward(node)
        if state.grads is None:
            if state.rebuilt is not None:
                state.grads, state.slots = state.rebuilt, state.weights
            else:  # (no rebuild: no layer of the group needed its input's gradient so far)
                state.grads = like.new_empty(node.count, d_out, d_in)
                state.slots = state.grads.unbind(0)
        return None if i in node.retaken else state.slots[i]


class _Backward:
    """A group's state in one backward: its rebuilt weights (`rebuilt`, (L, d_out, d_in), and `weights`, its L
    views), the stacks they came from, and the stacked `dW` (`grads`, and `slots`, its L views): mostly the rebuilt
    weights, written over."""

    __slots__ = ("stacks", "rebuilt", "weights", "grads", "slots")

    def __init__(self):
        self.stacks = self.rebuilt = self.weights = self.grads = self.slots = None


def _this_backward(node) -> _Backward:
    """`node`'s state for the running backward (graph task), made at its first use. The node's own backward drops it;
    the end of the backward drops it where that did not run (gradients for the inputs alone). A backward that raises
    runs no end-of-backward callback: its state stays on the node until the graph is freed."""
    task = torch._C._current_graph_task_id()
    state = node.backwards.get(task)
    if state is None:
        state = node.backwards[task] = _Backward()
        torch.autograd.Variable._execution_engine.queue_callback(lambda: node.backwards.pop(task, None))
    return state


def _stacks(tensors, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The members' factors stacked and cast: A (L, r, d_in), B (L, d_out, r), values (L nnz,)."""
    A, B, values = torch.stack(tensors[0::3]), torch.stack(tensors[1::3]), torch.cat(tensors[2::3])
    return A.to(dtype), B.to(dtype), values.to(dtype)


def _rebuild(A: torch.Tensor, B: torch.Tensor, values: torch.Tensor, supports: tuple, scaling: float) -> torch.Tensor:
    W = torch.baddbmm(A.new_empty(()), B, A, beta=0.0, alpha=scaling)  # (L, d_out, d_in); beta=0: input unread
    W.view(-1).index_add_(0, _flat_positions(supports, W.shape[1] * W.shape[2]), values)
    return W


def _flat_positions(supports: tuple, entries: int) -> torch.Tensor:
    """The members' supports as flat positions into their stacked (L, d_out, d_in) weights (int32 where they fit),
    made where they are used and not kept (4 bytes per nonzero while they live)."""
    dtype = torch.int32 if len(supports) * entries < 2**31 else torch.int64
    offsets = torch.arange(0, len(supports) * entries, entries, device=supports[0].device, dtype=dtype)
    return (torch.stack(supports).to(dtype) + offsets[:, None]).view(-1)


def _refuse_double_backward():
    raise RuntimeError(
        "The batched SLTrain rebuild (compute='batched', and 'auto' for layers trained on a GPU) has no second "
        "derivative; use the dense path for double backward, e.g. gradient penalties on the parameters: "
        "`model.set_compute('dense')`."
    )


class _LayerLinear(torch.autograd.Function):
    """`x W^T` (x: (..., d_in), W: (d_out, d_in)), saving x alone through saved-tensor hooks. `W` is member `i`'s
    view of a batched rebuild whose node is `group` (which rebuilds it in backward: no copy of the weights is kept
    from the forward to the backward), or, where `group` is None, a weight built on its own, kept on the node until
    its backward (until the graph's end where the graph is kept)."""

    @staticmethod
    def forward(ctx, x, W, group, i):
        ctx.save_for_backward(x)
        ctx.group, ctx.i = group, i
        ctx.weight = W if group is None else None
        return F.linear(x, W)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        group, i = ctx.group, ctx.i
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, d_out)
        x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
        if group is None or torch.is_grad_enabled():
            # differentiable ops: a weight built on its own, or, under create_graph (a penalty on the input
            # gradients), this member's built on its own from the group's factors (the group's node, where such a
            # backward reaches it, refuses a second derivative for the factors)
            W = ctx.weight
            if group is not None:
                A, B, values = _BatchedRebuild.factors(group)[3 * i : 3 * i + 3]
                W = plain_weight(A, B, values, group.supports[i], group.scaling, group.dtype)
            elif _keep_graph is not None and not _keep_graph():
                ctx.weight = None  # (autograd frees what it saved now; this node cannot run again)
            dx = (dy2 @ W).view(x.shape) if ctx.needs_input_grad[0] else None
            return dx, dy2.t() @ x2 if ctx.needs_input_grad[1] else None, None, None
        dx = dW = None
        if ctx.needs_input_grad[0]:
            dx = (dy2 @ _BatchedRebuild.rebuilt(group)[i]).view(x.shape)
        if ctx.needs_input_grad[1]:
            slot = None if _vmapped(dy) else _BatchedRebuild.grad_slot(group, i, dy2.shape[1], x2.shape[1], dy)
            dW = dy2.t() @ x2 if slot is None else torch.mm(dy2.t(), x2, out=slot)
        return dx, dW, None, None


# whether the running backward keeps the graph (retain_graph): a private function of PyTorch's, so looked up (where it
# is missing, a weight built on its own lives until the graph does)
_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def _vmapped(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is batched by vmap: `autograd.grad(..., is_grads_batched=True)` (and `functional.jacobian` or
    `hessian` with `vectorize=True`) run the backward under vmap, which has no rule for writes into a plain buffer."""
    return torch._C._functorch.is_legacy_batchedtensor(tensor) or torch._C._functorch.is_batchedtensor(tensor)
