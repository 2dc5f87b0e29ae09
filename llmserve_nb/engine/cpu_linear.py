"""Linear layers with their weights prepacked for oneDNN, the CPU matmul path of the transformers engine.

`nn.Linear` on CPU calls MKL's sgemm, which re-lays out the weight matrix on every call. For a decode
step that cost is paid 211 times (SmolLM2-135M) on matrices only `rows` tall, and it dominates: at
batch 32 the matmuls were 70 % of a step. oneDNN with the weight reordered once, at load (what
`torch.compile`'s freezing does for CPU linears, without compiling anything), ran the same products
1.6-3.5x faster on a 2-core AVX-512 machine and a whole decode step 1.75-1.9x faster
(`benchmarks/cpu_linear.py`). The products agree with `nn.Linear` to fp32 rounding (~1e-6).

The ops are torch's own (`torch.ops.mkldnn._reorder_linear_weight` / `_linear_pointwise`, used by
inductor); where they are missing or refuse a dtype (fp16 without AVX-512 FP16), the model keeps its
`nn.Linear` layers and `pack_linears` says why.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["PackedLinear", "pack_linears"]


class PackedLinear(torch.nn.Module):
    """`y = x @ W.T + b` through oneDNN, with W reordered for it once. Same inputs and outputs as the
    `nn.Linear` it replaces (any leading dimensions), inference only."""

    def __init__(self, linear: Any):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None))
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: Any) -> tuple[int, str | None]:
    """Replace every `nn.Linear` of a CPU `model` by a `PackedLinear`, in place.

    Returns (layers replaced, None), or (0, why not) leaving the model untouched: the first layer is
    packed and checked against `nn.Linear` before any is replaced.
    """
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is torch.nn.Linear]
    if not targets:
        return 0, "the model has no nn.Linear layers"
    first = targets[0][2]
    try:
        probe = PackedLinear(first)
        x = torch.randn(2, first.in_features, dtype=first.weight.dtype, device=first.weight.device)
        with torch.inference_mode():
            got, want = probe(x).float(), first(x).float()
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        return 0, f"oneDNN linear unavailable for {first.weight.dtype} here: {str(e).splitlines()[0][:200]}"
    if not torch.allclose(got, want, rtol=1e-2, atol=1e-3 * float(want.abs().max()) + 1e-6):
        return 0, "oneDNN linear disagreed with nn.Linear on a probe"
    for parent, name, child in targets:
        setattr(parent, name, probe if child is first else PackedLinear(child))
    return len(targets), None
