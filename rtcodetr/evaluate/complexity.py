"""Parameter count and FLOPs of one forward pass, counted with ``torch.utils.flop_counter.FlopCounterMode``.

Convention, stated once and reported next to every figure: ``FlopCounterMode`` counts a multiply-accumulate as two
floating-point operations (``mm`` of ``[M, K] @ [K, N]`` = ``2·M·N·K``; convolutions likewise). So its total is
**FLOPs = 2 × MACs**, and ``GMACs = flops / 2e9``. Papers disagree on which of the two they call "FLOPs" (thop and
fvcore count MACs; ultralytics prints ``2 ×`` thop's MACs as GFLOPs), so both are reported side by side.

Only matrix products, convolutions and attention kernels are counted. Everything else costs time but no counted
FLOPs — normalisation, activations, element-wise arithmetic, softmax, pooling, interpolation and, for RT-DETR and
Deformable-DETR-style models, the deformable attention *sampling* itself (``grid_sampler_2d`` plus the weighted sum of
the sampled values). The ops seen during the pass that were not counted are returned by name with their call counts,
so a report can say exactly what is missing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten

# Ops that move or view data and do no arithmetic: not worth naming as "uncounted compute".
_DATA_MOVEMENT = {
    "view", "_unsafe_view", "reshape", "expand", "t", "transpose", "permute", "unsqueeze", "squeeze", "slice",
    "select", "clone", "detach", "copy_", "copy", "empty", "empty_like", "empty_strided", "zeros", "zeros_like",
    "ones", "ones_like", "full", "full_like", "fill_", "arange", "alias", "contiguous", "split", "split_with_sizes",
    "unbind", "cat", "stack", "index", "index_select", "gather", "lift_fresh", "lift_fresh_copy", "_to_copy",
    "new_zeros", "new_ones", "new_empty", "new_full", "as_strided", "unfold", "flip", "roll", "repeat",
    "masked_fill", "masked_fill_", "where", "scalar_tensor", "_local_scalar_dense", "item", "zero_", "linspace",
    "meshgrid", "constant_pad_nd", "pad", "slice_scatter", "select_scatter", "index_put_", "index_put",
    "_reshape_alias", "diagonal", "narrow", "squeeze_", "unsqueeze_", "resize_", "set_", "nonzero", "sort",
    "argsort", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not", "bitwise_and",
    "bitwise_or", "bitwise_not", "any", "all", "_has_compatible_shallow_copy_type", "is_same_size", "sym_size",
    "sym_stride", "sym_numel", "sym_storage_offset", "dim", "size", "stride", "_assert_async", "flatten",
    "unflatten", "dropout", "to", "concat", "concatenate", "chunk", "tensor_split", "type_as", "float", "half",
    "expand_as", "view_as", "reshape_as", "movedim", "swapaxes", "contiguous",
}
# Composite ops the recorder may see before they decompose into counted kernels (linear -> addmm, conv2d ->
# convolution, sdpa -> its flash/efficient kernel): their FLOPs are in the counted total, so they are not "missing".
_COMPOSITE_COUNTED = {
    "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "matmul", "einsum", "bilinear",
    "scaled_dot_product_attention", "multi_head_attention_forward",
}


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """``_scaled_dot_product_flash_attention_for_cpu`` is missing from torch's registry; same formula as CUDA's."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CUSTOM_FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


class _OpRecorder(TorchDispatchMode):
    """Counts every aten op packet dispatched inside the context (name -> calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[Any, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        self.calls[packet] = self.calls.get(packet, 0) + 1
        return func(*args, **(kwargs or {}))


@dataclass
class Complexity:
    """Parameters and counted FLOPs of one batch-1 forward pass at ``input_hw``."""

    params: int
    flops: int                      # FlopCounterMode total = 2 x MACs
    input_hw: tuple[int, int]
    counted_ops: dict[str, int] = field(default_factory=dict)     # op -> FLOPs
    uncounted_ops: dict[str, int] = field(default_factory=dict)   # compute op -> calls (no FLOPs attributed)

    @property
    def macs(self) -> int:
        return self.flops // 2

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    @property
    def gmacs(self) -> float:
        return self.flops / 2e9

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            macs=self.macs, gflops=self.gflops, gmacs=self.gmacs,
            convention="flop_counter counts 2 FLOPs per multiply-accumulate: GFLOPs = 2 x GMACs",
        )
        return d


def count_parameters(model: torch.nn.Module) -> int:
    """All parameters (trainable or frozen), counted once even when shared."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.inference_mode()
def count_flops(forward: Callable[[], Any], model: torch.nn.Module, input_hw: tuple[int, int]) -> Complexity:
    """Run ``forward()`` once (batch 1, at ``input_hw``) under ``FlopCounterMode`` and an op recorder.

    Args:
        forward: a closure that runs the model on a ready input, e.g. ``lambda: model(pixel_values=x)``.
        model: the module whose parameters are counted.
        input_hw: the input size the closure uses (recorded, not enforced).
    """
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM_FORMULAS)
    recorder = _OpRecorder()
    with counter, recorder:
        forward()
    counted_packets = set(counter.flop_registry)
    per_op = counter.get_flop_counts().get("Global", {})
    counted = {str(op).replace("aten.", ""): int(n) for op, n in per_op.items() if n}
    uncounted = {}
    for packet, calls in recorder.calls.items():
        name = str(packet).replace("aten.", "")
        if packet in counted_packets or name in _DATA_MOVEMENT or name in _COMPOSITE_COUNTED:
            continue
        uncounted[name] = calls
    return Complexity(
        params=count_parameters(model),
        flops=int(counter.get_total_flops()),
        input_hw=(int(input_hw[0]), int(input_hw[1])),
        counted_ops=dict(sorted(counted.items(), key=lambda kv: -kv[1])),
        uncounted_ops=dict(sorted(uncounted.items(), key=lambda kv: -kv[1])),
    )
