"""Run an unmodified diffusers UNet on a row strip: `with sharding(unet, rows): unet(strip)`.

Inside the context every module that reaches across rows is redirected to its exchanging version in
`renderer.parallel.ops`: 3×3 convs (plain, dilated, strided, after nearest upsampling) and GroupNorms through
diffusers' own hook registry (`diffusers.hooks`, as its context parallelism does), so that hooks a module already
carries (offloading, layerwise casting) are kept and come back on exit; every self-attention through its
attention processor. (The VAE runs in bands instead: `renderer.parallel.banded_vae`.) FreeScale's own cross-strip
operations (scale fusion's windows, global attention and blur; FreeU's Fourier filter) come in through
`sharded_backend`, which `freescale_mode` installs per call like the single-process processors.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_processor import Attention
from torch import nn

from renderer.parallel import ops
from renderer.parallel.strips import RowGroup, Span, StripLayout
from freescale_core.attention import (ScaleFusionProcessor, StageGeometry, grid_then_zero_token, local_attention, project,
                                      strided_global_attention)
from freescale_core.blur import kernel_size
from freescale_core.mode import LOCAL, Backend, temporal_modules
from freescale_core.windows import WindowPlan


class ShardedScaleFusion(ScaleFusionProcessor):
    """Scale fusion for the rows of one strip (design §A.3 rows 10–13)."""

    def __init__(self, geometry: StageGeometry, block_index: int, rows: RowGroup):
        super().__init__(geometry, block_index)
        self.rows = rows

    def grid_for(self, tokens: int) -> tuple[tuple[int, int], int, int]:
        start, stop = self.rows.span
        (height, width), downsample = self.geometry.latent, 1
        while (stop - start) // downsample * (width // downsample) > tokens:
            downsample *= 2
        own_rows = (stop - start) // downsample
        if own_rows * (width // downsample) != tokens:
            raise ValueError(f"{tokens} tokens are not a strip of the {self.geometry.latent} latent's grids")
        return (height // downsample, width // downsample), own_rows, downsample

    def window_rows(self, plan: WindowPlan, window: tuple[int, int], layout: StripLayout) -> tuple[list[Span], list[torch.Tensor]]:
        """Per rank: the rows (unpadded, may reach into the padding) that the windows touching its strip
        cover, and its groups of those windows (in the plan's group order)."""
        tops = plan.starts_h - plan.rows.jitter  # window rows in unpadded coordinates: [tops, tops + window[0])
        touching = [(tops < stop) & (tops + window[0] > start) for start, stop in (layout.span(r) for r in range(self.rows.world))]
        spans = [(int(tops[mask].min()), int(tops[mask].max()) + window[0]) for mask in touching]
        mine = touching[self.rows.rank]
        groups = [views[mine[views]] for views in plan.groups()]
        return spans, [views for views in groups if len(views)]

    def windows_on_slab(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: WindowPlan, window: tuple[int, int],
                        groups: list[torch.Tensor], slab: Span, held: Span, own: Span, width: int) -> torch.Tensor:
        """The strip's own rows of the window attention over the `slab` rows its windows cover, from q/k/v
        (B, tokens, heads, d) of the image's `held` rows of the slab and one zero token after them."""
        token_of = grid_then_zero_token(plan, slab, held)
        local = local_attention(q, k, v, plan, window, groups, slab[0] + plan.rows.jitter, token_of)
        return own_rows(local, held, own, width)

    def branches(self, attn: Attention, hidden: torch.Tensor, plan: WindowPlan, window: tuple[int, int]):
        """Global attention around the ring; the windows take the K/V rows they need from the blocks that pass,
        so no rows are fetched for them. Queries outside the strip are left zero: their outputs are dropped,
        and no other row depends on them."""
        if self.geometry.fast_mode:  # the ring passes sub-grids there, not rows
            return super().branches(attn, hidden, plan, window)
        batch, rows, width, channels = hidden.shape
        layout = self.rows.layout_for(rows)
        spans, groups = self.window_rows(plan, window, layout)
        slab, own = spans[self.rows.rank], layout.span(self.rows.rank)
        held = (max(0, slab[0]), min(layout.height, slab[1]))
        q, k, v = project(attn, hidden.flatten(1, 2))
        _, zero_k, zero_v = project(attn, hidden.new_zeros(1, 1, channels))
        tokens = (held[1] - held[0]) * width
        slab_q, slab_k, slab_v = (q.new_zeros(batch, tokens + 1, *q.shape[2:]) for _ in range(3))
        slab_k[:, tokens], slab_v[:, tokens] = zero_k[0, 0], zero_v[0, 0]

        def place(targets: tuple[torch.Tensor, ...], sources: tuple[torch.Tensor, ...], span: Span) -> None:
            """The held rows among `span`'s, from `sources` (B, tokens, heads, d) holding rows `span`."""
            start, stop = max(span[0], held[0]), min(span[1], held[1])
            for target, source in zip(targets, sources if start < stop else ()):
                target[:, (start - held[0]) * width : (stop - held[0]) * width] = source[:, (start - span[0]) * width : (stop - span[0]) * width]

        place((slab_q, slab_k, slab_v), (q, k, v), own)
        global_ = ops.ring_attention(self.rows, q, k, v, seen=lambda source, block_k, block_v: place(
            (slab_k, slab_v), (block_k.transpose(1, 2), block_v.transpose(1, 2)), layout.span(source)))
        return self.windows_on_slab(slab_q, slab_k, slab_v, plan, window, groups, slab, held, own, width), global_

    def local_branch(self, attn: Attention, hidden: torch.Tensor, plan: WindowPlan, window: tuple[int, int]):
        """Every window that touches this strip, computed whole from the image rows it covers (fetched from their
        owners; the padding is the zero token's, as in one process); only the strip's own rows of the result
        are kept. (Fast mode; other steps take the rows from the ring, see `branches`.)"""
        layout = self.rows.layout_for(hidden.shape[1])
        spans, groups = self.window_rows(plan, window, layout)
        held_spans = [(max(0, start), min(layout.height, stop)) for start, stop in spans]
        held, own, width = held_spans[self.rows.rank], layout.span(self.rows.rank), hidden.shape[2]
        held_rows = self.rows.fetch(hidden, 1, held_spans, "window")
        q, k, v = project(attn, F.pad(held_rows.flatten(1, 2), (0, 0, 0, 1)))
        local = self.windows_on_slab(q, k, v, plan, window, groups, spans[self.rows.rank], held, own, width)
        return local, tuple(own_rows(t, held, own, width) for t in (q, k, v))

    def strided_global_branch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return strided_global_attention(q, k, v, grid, self.geometry.scale, partial(ops.ring_attention, self.rows))

    def blur(self, grid: torch.Tensor) -> torch.Tensor:
        return ops.blur(self.rows, grid, self.geometry.fusion_blur, kernel_size(self.geometry.scale))


def own_rows(tokens: torch.Tensor, held: Span, own: Span, width: int) -> torch.Tensor:
    """The `own` rows of (B, tokens, ...) laid out as the grid's `held` rows then one zero token."""
    grid = tokens[:, :-1].unflatten(1, (held[1] - held[0], width))
    return grid[:, own[0] - held[0] : own[1] - held[0]].flatten(1, 2)


class ShardedSelfAttention:
    """Plain self-attention over all strips: the UNet's `attn1` when scale fusion is off. Follows diffusers'
    AttnProcessor2_0 for what these modules use."""

    def __init__(self, rows: RowGroup):
        self.rows = rows

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None:
            raise ValueError("sharded self-attention takes no encoder states, mask or spatial norm")
        residual = hidden_states
        shape = hidden_states.shape
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        q, k, v = project(attn, hidden_states)
        out = ops.ring_attention(self.rows, q, k, v).to(hidden_states.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if len(shape) == 4:
            out = out.transpose(1, 2).reshape(shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def sharded_backend(rows: RowGroup) -> Backend:
    """The exchanging FreeScale operations; a group of one computes on whole tensors (`LOCAL`)."""
    if rows.world == 1:
        return LOCAL
    return Backend(
        fusion_processor=lambda geometry, index: ShardedScaleFusion(geometry, index, rows),
        skip_filter=partial(ops.fourier_filter, rows),
    )


HOOK = "freescale_strip"  # the name of our hook in a module's diffusers HookRegistry


class StripHook(ModelHook):
    """A module's forward on this rank's strip: its exchanging version in `renderer.parallel.ops`."""

    def __init__(self, op: Callable, rows: RowGroup):
        super().__init__()
        self.op, self.rows = op, rows

    def new_forward(self, module: nn.Module, *args, **kwargs):
        return self.op(self.rows, module, *args, **kwargs)


def hook(module: nn.Module, op: Callable, rows: RowGroup) -> Callable[[], None]:
    """Put `op` in place of the module's forward through diffusers' hook registry, on top of any hook it already
    has (offloading, layerwise casting); the function that removes it and leaves the module as it was."""
    had_registry, had_forward = hasattr(module, "_diffusers_hook"), "forward" in vars(module)
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(StripHook(op, rows), HOOK)

    def remove() -> None:
        registry.remove_hook(HOOK, recurse=False)
        if not had_forward:  # the registry puts the bound forward back as an attribute: the class's again
            vars(module).pop("forward", None)
        if not had_registry:
            del module._diffusers_hook

    return remove


@contextmanager
def sharding(model: nn.Module, rows: RowGroup) -> Iterator[None]:
    """Make `model` (a UNet or any part) compute on this rank's strip; restored exactly on exit.

    A group of one holds the whole tensor: the model runs unchanged."""
    if rows.world == 1:
        yield
        return
    removals: list[Callable[[], None]] = []
    processors: dict[Attention, object] = {}
    temporal = temporal_modules(model)  # a motion UNet's attention along the frames at each pixel: row-local
    try:
        for module in model.modules():
            if isinstance(module, nn.Conv2d) and (module.kernel_size[0] > 1 or module.stride[0] > 1):
                removals.append(hook(module, ops.conv, rows))
            elif isinstance(module, nn.GroupNorm):
                removals.append(hook(module, ops.group_norm, rows))
            elif isinstance(module, Attention) and not module.is_cross_attention and module not in temporal:
                processors[module] = module.processor
                module.processor = ShardedSelfAttention(rows)
        yield
    finally:
        for remove in reversed(removals):
            remove()
        for module, processor in processors.items():
            module.processor = processor
