"""Scale fusion (§4): every self-attention output = G(local windows) + global − G(global).

Installed as a diffusers attention processor on each `attn1`. The projections run once, on the token
grid and one zero token that stands for the windows' zero padding; the local branch gathers windows in
batches (whole groups of non-overlapping windows, about 1 MiB on the CPU) and runs each batch as one
attention; the global branch is one full attention (or, in fast mode, all strided sub-grids as one
batch). Because G is linear, G(local) + global − G(global) is computed as global + G(local − global),
one blur instead of two; and, where G leaves the channels alone, as to_out(global + G(local − global))
on the attention outputs: one output projection instead of two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from freescale_core.blur import BLUR_AXES, gaussian_blur, kernel_size
from freescale_core.windows import WindowPlan, plan_windows, window_shape


@dataclass(frozen=True)
class StageGeometry:
    """What the attention processors need to know about the current upscaling stage."""

    size_px: tuple[int, int]  # (H, W) of the stage in pixels
    vae_scale: int
    train_latent: int  # unet.config.sample_size
    scale: tuple[int, int]  # (s_h, s_w)
    step_index: int
    seed: int
    fusion_blur: str
    window_jitter: bool
    fast_mode: bool

    @property
    def latent(self) -> tuple[int, int]:
        return self.size_px[0] // self.vae_scale, self.size_px[1] // self.vae_scale

    def grid_for(self, tokens: int) -> tuple[tuple[int, int], int]:
        """The (h, w) token grid of a block with `tokens` tokens, and its downsampling from the latent."""
        h, w = self.latent
        downsample = 1
        while h * w > tokens and h % 2 == 0 and w % 2 == 0:
            h, w, downsample = h // 2, w // 2, downsample * 2
        if h * w != tokens:
            raise ValueError(f"{tokens} tokens do not form a grid of the {self.latent} latent")
        return (h, w), downsample


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., C) → (..., heads, C/heads)."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Batched attention over token sequences shaped (N, L, heads, d); returns (N, L, heads·d)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


def project(attn: Attention, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of `tokens` (..., C), split into heads (..., heads, d), with the module's q/k norms."""
    q, k, v = (split_heads(layer(tokens), attn.heads) for layer in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k, v


def window_index(plan: WindowPlan, views: torch.Tensor, window: tuple[int, int], row_offset: int = 0) -> torch.Tensor:
    """Flat indices of the tokens of `views` into padded-grid rows from `row_offset` on: (len(views), wh·ww)."""
    rows = plan.starts_h[views, None] - row_offset + torch.arange(window[0])
    cols = plan.starts_w[views, None] + torch.arange(window[1])
    flat = rows[:, :, None] * plan.padded_shape[1] + cols[:, None, :]
    return flat.flatten(1)


def grid_then_zero_token(plan: WindowPlan, rows: tuple[int, int] | None = None, held: tuple[int, int] | None = None) -> torch.Tensor:
    """For every padded-grid position of `rows` (grid rows [start, stop), reaching into the padding; default:
    the whole padded grid), its row in tokens laid out as the grid's `held` rows (default: all) then one zero
    token.

    The padding's keys and values are a zero token's, so windows can be gathered from the projections of the
    rows held plus that one token, instead of projecting a padded grid. (A row strip holds the rows its windows
    cover; positions outside `held` and the image map to the zero token.)"""
    height, width, pad_w = plan.rows.grid, plan.cols.grid, plan.cols.jitter
    first, stop = rows if rows is not None else (-plan.rows.jitter, height + plan.rows.jitter)
    low, high = held if held is not None else (0, height)
    index = torch.full((stop - first, width + 2 * pad_w), (high - low) * width)
    start, end = max(first, low), min(stop, high)
    if start < end:
        index[start - first : end - first, pad_w : pad_w + width] = torch.arange((start - low) * width, (end - low) * width).view(end - start, width)
    return index.flatten()


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to `device` without making the host wait for the device (pinned, non-blocking)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def chunk_budget(q: torch.Tensor) -> int:
    """Gathered elements per tensor in one batch of windows. On the CPU about 1 MiB of fp32, which stays in
    cache from the gather through the attention to the scatter (measured faster than larger batches);
    elsewhere at most q's own size, so the gathered copies cost no more memory than q, k, v."""
    return 2**18 if q.device.type == "cpu" else q.numel()


def group_chunks(sizes: list[int], per_view: int, budget: int) -> list[tuple[int, int]]:
    """Consecutive runs [first, stop) of groups whose `sizes` views hold at most `budget` elements (or one group)."""
    chunks, first, held = [], 0, 0
    for index, size in enumerate(sizes):
        if index > first and (held + size) * per_view > budget:
            chunks.append((first, index))
            first, held = index, 0
        held += size
    return chunks + [(first, len(sizes))] if sizes else chunks


def local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: WindowPlan, window: tuple[int, int],
    groups: list[torch.Tensor] | None = None, row_offset: int = 0, token_of: torch.Tensor | None = None,
) -> torch.Tensor:
    """Uniform average of windowed attention over a padded grid; q/k/v (B, N, heads, d) → (B, N, heads·d).

    By default q/k/v hold the whole padded grid (N positions) and every window is computed; `token_of`
    instead maps each padded position to its row of q/k/v (see `grid_then_zero_token`). A row strip passes
    the padded rows from `row_offset` on and only the `groups` of windows it needs (in the plan's group
    order, so each row sums its windows in the same order as the whole grid would). Every (token, head)
    is gathered as one row of d values, so a batch of windows arrives as one contiguous (windows, heads,
    L, d) attention input and its output scatters back without a transpose. Windows of several groups
    attend as one batch (`chunk_budget`); each group is scattered on its own, so that no scatter writes a
    row twice (except rows that a `token_of` sends several positions to, whose sums go unused): the same
    sums in the same order on any device. Rows that no window covers are zero.
    """
    batch, sources, heads, head_dim = q.shape
    tokens = window[0] * window[1]
    groups = plan.groups() if groups is None else groups
    sizes = [len(views) for views in groups]
    views = torch.cat(groups) if groups else torch.zeros(0, dtype=torch.long)
    flat = window_index(plan, views, window, row_offset)
    if token_of is not None:
        flat = token_of[flat]
    count = torch.bincount(flat.flatten(), minlength=sources).clamp(min=1)
    # Rows of (B·N·heads, d), ordered view, batch, head, window token: a run of views is a slice.
    batch_token = torch.arange(batch)[:, None] * sources + flat[:, None, :]  # (V, B, L)
    index = (batch_token[:, :, None, :] * heads + torch.arange(heads)[:, None]).flatten()
    # Built on the host and sent in one copy: a blocking host-to-device copy per group would stall the
    # launch queue 16 times per block on a GPU.
    index, count = to_device(torch.cat([index, count]), q.device).split([index.numel(), sources])
    rows_of = [t.reshape(-1, head_dim) for t in (q, k, v)]
    total = q.new_zeros(batch * sources * heads, head_dim)
    per_view = batch * heads * tokens
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size * per_view)
    for first, stop in group_chunks(sizes, per_view * head_dim, chunk_budget(q)):
        chunk = index[offsets[first] : offsets[stop]]
        q_w, k_w, v_w = (t.index_select(0, chunk).view(-1, heads, tokens, head_dim) for t in rows_of)
        out = F.scaled_dot_product_attention(q_w, k_w, v_w).view(-1, head_dim)
        for group in range(first, stop):
            part = slice(offsets[group] - offsets[first], offsets[group + 1] - offsets[first])
            total.index_add_(0, chunk[part], out[part])
    return total.view(batch, sources, heads * head_dim).div_(count.to(total.dtype)[:, None])


def strided_global_attention(q, k, v, grid: tuple[int, int], scale: tuple[int, int], attention=attend) -> torch.Tensor:
    """Fast mode: attention within each strided sub-grid x[a::s_h, b::s_w], all sub-grids as one batch.

    `grid` may be a strip of whole rows of sub-grid cells; `attention` then reaches the other strips."""
    batch, heads, head_dim = q.shape[0], q.shape[2], q.shape[3]
    sh, sw = scale
    h, w = grid

    def to_subgrids(t: torch.Tensor) -> torch.Tensor:
        t = t.view(batch, h // sh, sh, w // sw, sw, heads, head_dim)
        return t.permute(0, 2, 4, 1, 3, 5, 6).reshape(batch * sh * sw, (h // sh) * (w // sw), heads, head_dim)

    out = attention(to_subgrids(q), to_subgrids(k), to_subgrids(v))
    out = out.view(batch, sh, sw, h // sh, w // sw, heads * head_dim)
    return out.permute(0, 3, 1, 4, 2, 5).reshape(batch, h * w, heads * head_dim)


class ScaleFusionProcessor:
    """Replaces the processor of one `attn1`; `block_index` keys its window-jitter stream.

    The branches (local windows and global attention together, and the blur) are methods, so that a
    row-sharded variant (`renderer.parallel.sharding`) can replace how each one reaches beyond its rows and keep
    everything else.
    """

    def __init__(self, geometry: StageGeometry, block_index: int):
        self.geometry = geometry
        self.block_index = block_index

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError("scale fusion applies to self-attention on (B, L, C) tokens without a mask")
        geometry = self.geometry
        batch, tokens, channels = hidden_states.shape
        grid, rows, downsample = self.grid_for(tokens)
        window = window_shape(grid, geometry.size_px, geometry.train_latent, downsample)
        plan = plan_windows(
            grid, window, geometry.window_jitter, geometry.seed,
            key=(geometry.size_px, geometry.step_index, self.block_index),
        )
        local, global_ = self.branches(attn, hidden_states.view(batch, rows, grid[1], channels), plan, window)
        local, global_ = local.to(hidden_states.dtype), global_.to(hidden_states.dtype)
        # G and the output projection commute unless G blurs channels: then project both branches first.
        projected_first = 3 in BLUR_AXES[geometry.fusion_blur]
        if projected_first:
            local, global_ = (attn.to_out[1](attn.to_out[0](t)) for t in (local, global_))
        low_frequency_correction = self.blur((local - global_).view(batch, rows, grid[1], -1))
        fused = global_ + low_frequency_correction.flatten(1, 2)
        if not projected_first:
            fused = attn.to_out[1](attn.to_out[0](fused))
        if attn.residual_connection:
            fused = fused + hidden_states
        return fused / attn.rescale_output_factor

    def grid_for(self, tokens: int) -> tuple[tuple[int, int], int, int]:
        """The block's whole token grid, how many of its rows this process holds, and its downsampling."""
        grid, downsample = self.geometry.grid_for(tokens)
        return grid, grid[0], downsample

    def branches(self, attn: Attention, hidden: torch.Tensor, plan: WindowPlan, window: tuple[int, int]):
        """The local and global branches' attention (before `to_out`) for the rows of `hidden` (B, rows, W, C)."""
        local, (q, k, v) = self.local_branch(attn, hidden, plan, window)
        if self.geometry.fast_mode:
            return local, self.strided_global_branch(q, k, v, hidden.shape[1:3])
        return local, self.global_branch(q, k, v)

    def local_branch(self, attn: Attention, hidden: torch.Tensor, plan: WindowPlan, window: tuple[int, int]):
        """Window attention for the rows of `hidden` (B, rows, W, C), and the rows' own q, k, v."""
        # The grid's tokens and one zero token after them, whose k/v stand for the zero padding.
        q, k, v = project(attn, F.pad(hidden.flatten(1, 2), (0, 0, 0, 1)))
        local = local_attention(q, k, v, plan, window, token_of=grid_then_zero_token(plan))
        return local[:, :-1], (q[:, :-1], k[:, :-1], v[:, :-1])

    def global_branch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attend(q, k, v)

    def strided_global_branch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return strided_global_attention(q, k, v, grid, self.geometry.scale, attend)

    def blur(self, grid: torch.Tensor) -> torch.Tensor:
        return gaussian_blur(grid, self.geometry.fusion_blur, kernel_size(self.geometry.scale))
