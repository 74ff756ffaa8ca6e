"""The operations that reach across strips, each equal to its whole-tensor counterpart (design §A.3).

Everything else in the UNet and VAE is row-local (1×1 convs, linears, norms over channels, activations,
cross-attention) and runs unchanged on a strip.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from renderer.parallel.strips import RowGroup, StripLayout
from freescale_core import freeu
from freescale_core.blur import BLUR_AXES, gaussian_blur
from renderer.vae.bands import group_moments, merge_moments, normalize_groups


def conv(rows: RowGroup, module: nn.Conv2d, x: torch.Tensor, pad_top: int | None = None) -> torch.Tensor:
    """A 3×3 (any dilation or stride) conv of a (B, C, rows, W) strip.

    Each rank fetches the input rows its output rows read (its halo, zeros beyond the image) and convolves
    them without row padding. `pad_top` overrides the conv's own top padding (asymmetric-pad downsamplers)."""
    if module.padding_mode != "zeros":
        raise ValueError(f"sharded convs need zero padding, not {module.padding_mode!r}")
    kernel, dilation, stride = module.kernel_size[0], module.dilation[0], module.stride[0]
    top = module.padding[0] if pad_top is None else pad_top
    layout = rows.layout_for(x.shape[2])
    if any(start % stride for start in layout.bounds):
        raise ValueError(f"strips {layout.bounds} do not start on multiples of the conv stride {stride}")
    reach = dilation * (kernel - 1)
    requests = [
        (start - top, stop - stride - top + reach + 1) for start, stop in (layout.span(r) for r in range(rows.world))
    ]
    slab = rows.fetch(x, 2, requests, "conv")
    return F.conv2d(slab, module.weight, module.bias, module.stride, (0, module.padding[1]), module.dilation, module.groups)


def group_norm(rows: RowGroup, module: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm with every strip's (count, mean, M2) merged with the between-strip term (design §A.3).

    Each rank fills its slot of a (ranks, B, groups, 3) tensor and one all-reduce hands everyone all slots."""
    moments = group_moments(x, module.num_groups)
    slots = moments.new_zeros(rows.world, *moments.shape)
    slots[rows.rank] = moments
    return normalize_groups(module, x, *merge_moments(rows.sum(slots)))


def fourier_filter(rows: RowGroup, x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """FreeU's skip filter on a strip: ranks sum their parts of the few global Fourier coefficients it
    changes (complex128) and rebuild their own rows."""
    layout = rows.layout_for(x.shape[2])

    def sum_over_rows(coefficients: torch.Tensor) -> torch.Tensor:
        return torch.view_as_complex(rows.sum(torch.view_as_real(coefficients).contiguous()))

    return freeu.fourier_filter(x, threshold, scale, layout.span(rows.rank)[0], layout.height, sum_over_rows)


def blur(rows: RowGroup, grid: torch.Tensor, variant: str, size: int) -> torch.Tensor:
    """The scale-fusion Gaussian on a (B, rows, W, C) strip: blur it with a halo of size//2 rows, keep its rows."""
    halo = size // 2 if 1 in BLUR_AXES[variant] and size > 1 else 0
    if halo == 0:
        return gaussian_blur(grid, variant, size)
    layout = rows.layout_for(grid.shape[1])
    slab = rows.fetch(grid, 1, [(start - halo, stop + halo) for start, stop in (layout.span(r) for r in range(rows.world))], "blur")
    return gaussian_blur(slab, variant, size)[:, halo:-halo]


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of (N, heads, Lq, d) queries over one key block, and each query's log-sum-exp.

    Fused kernels that return the LSE: the memory-efficient one on CUDA (any head size, the VAE's 512
    included), the flash one on the CPU. Results are fp32, or fp64 for fp64 inputs."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
        return out.to(dtype), lse[..., : q.shape[2]].to(dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q.to(dtype), k.to(dtype), v.to(dtype))
    return out, lse


# Called with (the rank a K/V block comes from, its keys, its values), each (N, heads, L, d), as it passes.
BlockSeen = Callable[[int, torch.Tensor, torch.Tensor], None]


def ring_attention(rows: RowGroup, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seen: BlockSeen | None = None) -> torch.Tensor:
    """Exact attention of this strip's queries over the keys of all strips; (N, L, heads, d) → (N, L, heads·d).

    `seen` is shown every other rank's block (scale fusion takes its window rows from them)."""
    return ring_attention_bands(rows, [q], k, v, seen)[0]


def ring_attention_bands(rows: RowGroup, queries: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor,
                         seen: BlockSeen | None = None) -> list[torch.Tensor]:
    """`ring_attention` for several pieces of the strip's queries (bands of rows) against its keys.

    K/V blocks travel around the ring once; each piece's partial (o, lse) is merged in fp32 with
    o ← o − σ(lse_b − lse)(o − o_b), lse ← lse + softplus(lse_b − lse) (design §3)."""
    pieces = [q.transpose(1, 2) for q in queries]  # (N, heads, Lq, d)
    packed = torch.cat([k, v], dim=-1).transpose(1, 2)  # (N, heads, L, 2d)
    outs: list[torch.Tensor | None] = [None] * len(pieces)
    lses: list[torch.Tensor | None] = [None] * len(pieces)
    for step, block in enumerate(rows.ring(packed.contiguous(), dim=2)):
        block_k, block_v = block.chunk(2, dim=-1)
        if seen is not None and step:
            seen((rows.rank - step) % rows.world, block_k, block_v)
        for index, q in enumerate(pieces):
            block_out, block_lse = attention_with_lse(q, block_k, block_v)
            if outs[index] is None:
                outs[index], lses[index] = block_out, block_lse
                continue
            outs[index] = outs[index] - torch.sigmoid(block_lse - lses[index])[..., None] * (outs[index] - block_out)
            lses[index] = lses[index] + F.softplus(block_lse - lses[index])
    return [out.to(q.dtype).transpose(1, 2).flatten(2) for out, q in zip(outs, pieces)]


def resize(rows: RowGroup, x: torch.Tensor, target: StripLayout, width: int) -> torch.Tensor:
    """Bicubic resize (align_corners=False, clamped borders) of a (B, C, rows, W) strip to `width` columns
    and `target.height` rows, returning this rank's rows of the result under `target`.

    With the ratio p/q in lowest terms, every source slab that starts on a multiple of q resizes with
    exactly the same source positions and weights as the whole image, so each rank fetches a q-aligned
    slab around the source rows its output rows read (one spare row each side) and lets `F.interpolate`
    do the rest: bit-identical to resizing the whole image."""
    source = rows.layout_for(x.shape[2])
    factor = Fraction(target.height, source.height)
    p, q = factor.numerator, factor.denominator

    def slab(span: tuple[int, int]) -> tuple[int, int]:
        first = math.floor((span[0] + 0.5) / factor - 0.5) - 2
        last = math.floor((span[1] - 0.5) / factor - 0.5) + 3
        return max(0, first // q * q), min(source.height, -(-last // q) * q)

    slabs = [slab(target.span(r)) for r in range(rows.world)]
    start, stop = slabs[rows.rank]
    out_start, out_stop = start * p // q, (stop * p // q if stop < source.height else target.height)
    resized = F.interpolate(rows.fetch(x, 2, slabs, "resize"), size=(out_stop - out_start, width), mode="bicubic", align_corners=False)
    own_start, own_stop = target.span(rows.rank)
    return resized[:, :, own_start - out_start : own_stop - out_start]
