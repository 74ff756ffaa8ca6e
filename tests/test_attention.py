"""Scale fusion (reference §4): fused = G(local windows) + global − G(global), checked against explicit loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from freescale_core.attention import ScaleFusionProcessor, StageGeometry, strided_global_attention
from freescale_core.windows import plan_windows, window_shape

# With jitter on, every token must be covered by some window (edge windows move outward into the padding);
# an uncovered token would get to_out(0) = the to_out bias as its local value in the package but 0 in the
# reference, which the exact comparisons below detect.
JITTER = [False, True]


def make_attention(channels=32, heads=4, seed=0, **kwargs) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(query_dim=channels, heads=heads, dim_head=channels // heads, **kwargs).double().eval()
    # make the output projection's bias non-trivial so that averaging after/before it would differ if wrong
    with torch.no_grad():
        attn.to_out[0].bias.copy_(torch.linspace(-0.5, 0.5, channels, dtype=torch.float64))
    return attn


def structured_tokens(batch, grid, channels, seed=0) -> torch.Tensor:
    """(B, H·W, C): smooth ramps over rows/cols mixed into channels, a different offset per quadrant, a
    checkerboard, and a small random part to break symmetry."""
    h, w = grid
    i = torch.arange(h, dtype=torch.float64)[:, None, None]
    j = torch.arange(w, dtype=torch.float64)[None, :, None]
    c = torch.arange(channels, dtype=torch.float64)[None, None, :]
    x = torch.cos(0.7 * c + 3.0 * i / h) * (j / w) + 0.2 * torch.sin(0.3 * c * (1 + i / h))
    x = x + 0.3 * (((i + j) % 2) * 2 - 1) * (c % 3 == 0)
    region = torch.zeros(h, w, 1, dtype=torch.float64)
    region[: h // 2, w // 2 :] = 0.6
    region[h // 2 :, : w // 2] = -0.4
    x = x + region * torch.cos(c)
    generator = torch.Generator().manual_seed(seed)
    batchwise = torch.stack([x + 0.25 * b for b in range(batch)])
    noise = 0.05 * torch.randn(batchwise.shape, generator=generator, dtype=torch.float64)
    return (batchwise + noise).reshape(batch, h * w, channels)


def stock(attn: Attention, tokens: torch.Tensor) -> torch.Tensor:
    return AttnProcessor2_0()(attn, tokens)


def gaussian_1d(k: int) -> torch.Tensor:
    values = [math.exp(-((x - (k - 1) / 2) ** 2) / 2) for x in range(k)]
    return torch.tensor(values, dtype=torch.float64) / sum(values)


def dense_gaussian(grid: torch.Tensor, variant: str, k: int) -> torch.Tensor:
    """Dense k×k (or k×k×k) product-kernel convolution of a (B, H, W, C) grid, zero padding k//2."""
    if k == 1:
        return grid
    g = gaussian_1d(k)
    b, h, w, c = grid.shape
    if variant == "hw":
        x = grid.permute(0, 3, 1, 2).reshape(b * c, 1, h, w)
        out = F.conv2d(x, torch.outer(g, g)[None, None], padding=k // 2)
        return out.reshape(b, c, h, w).permute(0, 2, 3, 1)
    if variant == "wc":
        return F.conv2d(grid.reshape(b * h, 1, w, c), torch.outer(g, g)[None, None], padding=k // 2).reshape(b, h, w, c)
    kernel = torch.einsum("i,j,l->ijl", g, g, g)[None, None]
    return F.conv3d(grid[:, None], kernel, padding=k // 2)[:, 0]


def geometry(size_px, train_latent, scale, *, jitter=True, blur="hw", fast=False, seed=7, step=16) -> StageGeometry:
    return StageGeometry(
        size_px=size_px, vae_scale=8, train_latent=train_latent, scale=scale, step_index=step, seed=seed,
        fusion_blur=blur, window_jitter=jitter, fast_mode=fast,
    )


# ---------------------------------------------------------------------------------------------- (a)

@pytest.mark.parametrize("jitter", [False, True])
@pytest.mark.parametrize("scale,blur", [((1, 1), "hw"), ((2, 2), "hw"), ((2, 2), "hwc"), ((4, 4), "wc")])
@pytest.mark.parametrize("size_px,train_latent", [((64, 64), 8), ((64, 128), 16)])
def test_window_covering_the_grid_gives_plain_attention(size_px, train_latent, scale, blur, jitter):
    attn = make_attention()
    grid = (size_px[0] // 8, size_px[1] // 8)
    assert window_shape(grid, size_px, train_latent, 1) == grid
    tokens = structured_tokens(2, grid, 32)
    expected = stock(attn, tokens)
    attn.set_processor(ScaleFusionProcessor(geometry(size_px, train_latent, scale, jitter=jitter, blur=blur), block_index=0))
    got = attn(tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


def test_whole_grid_window_with_residual_and_rescale():
    attn = make_attention(residual_connection=True, rescale_output_factor=2.0)
    tokens = structured_tokens(1, (8, 8), 32)
    expected = stock(attn, tokens)
    attn.set_processor(ScaleFusionProcessor(geometry((64, 64), 8, (2, 2)), block_index=1))
    torch.testing.assert_close(attn(tokens), expected, atol=1e-10, rtol=0)


def test_rejects_cross_attention_and_masks():
    attn = make_attention()
    tokens = structured_tokens(1, (8, 8), 32)
    processor = ScaleFusionProcessor(geometry((64, 64), 8, (1, 1)), block_index=0)
    with pytest.raises(ValueError):
        processor(attn, tokens, encoder_hidden_states=tokens)
    with pytest.raises(ValueError):
        processor(attn, tokens, attention_mask=torch.ones(1, 64))


# ---------------------------------------------------------------------------------------------- (b)

def reference_fusion(attn, tokens, geo: StageGeometry, block_index: int) -> torch.Tensor:
    """Scale fusion written the reference's way: one Python-loop iteration per window on the zero-padded
    grid (the attention module run on each window's tokens), uniform average, crop; global = plain
    attention (or strided sub-grids in fast mode); G by dense convolution; G(local) + global − G(global)."""
    batch, length, channels = tokens.shape
    h, w = geo.latent
    downsample = 1
    while h * w > length:
        h, w, downsample = h // 2, w // 2, downsample * 2
    assert h * w == length
    window = window_shape((h, w), geo.size_px, geo.train_latent, downsample)
    plan = plan_windows((h, w), window, geo.window_jitter, geo.seed, key=(geo.size_px, geo.step_index, block_index))
    r_h, r_w = window[0] // 8 if geo.window_jitter else 0, window[1] // 8 if geo.window_jitter else 0
    grid = tokens.view(batch, h, w, channels)
    padded = torch.zeros(batch, h + 2 * r_h, w + 2 * r_w, channels, dtype=tokens.dtype)
    padded[:, r_h : r_h + h, r_w : r_w + w] = grid
    total = torch.zeros_like(padded)
    count = torch.zeros(h + 2 * r_h, w + 2 * r_w, 1, dtype=tokens.dtype)
    for top, left in zip(plan.starts_h.tolist(), plan.starts_w.tolist()):
        window_tokens = padded[:, top : top + window[0], left : left + window[1]].reshape(batch, -1, channels)
        out = stock(attn, window_tokens).view(batch, window[0], window[1], channels)
        total[:, top : top + window[0], left : left + window[1]] += out
        count[top : top + window[0], left : left + window[1]] += 1
    local = torch.where(count > 0, total / count.clamp(min=1), total)[:, r_h : r_h + h, r_w : r_w + w]
    if geo.fast_mode:
        sh, sw = geo.scale
        global_ = torch.zeros_like(grid)
        for a in range(sh):
            for b in range(sw):
                sub = grid[:, a::sh, b::sw]
                out = stock(attn, sub.reshape(batch, -1, channels))
                global_[:, a::sh, b::sw] = out.view(sub.shape)
    else:
        global_ = stock(attn, tokens).view(batch, h, w, channels)
    k = 2 * max(geo.scale) - 1
    fused = dense_gaussian(local, geo.fusion_blur, k) + global_ - dense_gaussian(global_, geo.fusion_blur, k)
    covered = (count > 0)[r_h : r_h + h, r_w : r_w + w, 0]
    return fused.reshape(batch, length, channels), local, global_, covered


def trusted_tokens(covered: torch.Tensor, variant: str, k: int) -> torch.Tensor:
    """Tokens whose blur neighbourhood (k//2 along the blurred spatial axes) is covered by some window."""
    uncovered = (~covered).double()[None, None]
    reach = (k // 2 if variant in ("hw", "hwc") else 0, k // 2)
    kernel = torch.ones(1, 1, 2 * reach[0] + 1, 2 * reach[1] + 1, dtype=torch.float64)
    near = F.conv2d(uncovered, kernel, padding=reach)[0, 0] > 0
    return ~near


FUSION_CASES = [
    # size_px, train_latent, scale, tokens: windows 8×8 on a 16×16 grid (3×3 views, r = 1)
    ((128, 128), 8, (2, 2), 256),
    # windows 16×16 on 32×32 (r = 2), and the 1/2-res block of the same stage (windows 8×8 on 16×16)
    ((256, 256), 16, (2, 2), 1024),
    ((256, 256), 16, (2, 2), 256),
    # non-square 1×2 stage: windows (8, 16) on a (16, 32) grid, r = (1, 2)
    ((128, 256), 16, (1, 2), 512),
    # 4× stage: 7×7 views of 8×8 on 32×32, k = 7
    ((256, 256), 8, (4, 4), 1024),
]


def case_tokens(geo: StageGeometry, length: int, batch=2, seed=3) -> torch.Tensor:
    grid = geo.latent
    while grid[0] * grid[1] > length:
        grid = (grid[0] // 2, grid[1] // 2)
    return structured_tokens(batch, grid, 16, seed=seed)


@pytest.mark.parametrize("blur", ["hw", "hwc", "wc"])
@pytest.mark.parametrize("size_px,train_latent,scale,length", FUSION_CASES)
def test_fusion_with_jitter_matches_reference_where_windows_cover(size_px, train_latent, scale, length, blur):
    """Jitter on, fixed seed: window starts from plan_windows with the processor's key; compared on every token
    whose blur neighbourhood lies in the area the windows cover (all tokens once the edge-jitter bug is fixed)."""
    attn = make_attention(channels=16, heads=2)
    geo = geometry(size_px, train_latent, scale, jitter=True, blur=blur, seed=11, step=17)
    tokens = case_tokens(geo, length)
    expected, local, global_, covered = reference_fusion(attn, tokens, geo, block_index=5)
    assert (local - global_).abs().max() > 1e-3
    trusted = trusted_tokens(covered, blur, 2 * max(scale) - 1).flatten()
    assert trusted.float().mean() > 0.5  # most of the grid is compared
    attn.set_processor(ScaleFusionProcessor(geo, block_index=5))
    got = attn(tokens)
    torch.testing.assert_close(got[:, trusted], expected[:, trusted], atol=1e-9, rtol=0)
    assert (got - global_.reshape(got.shape)).abs().max() > 1e-4


@pytest.mark.parametrize("jitter", JITTER)
@pytest.mark.parametrize("blur", ["hw", "hwc", "wc"])
@pytest.mark.parametrize("size_px,train_latent,scale,length", FUSION_CASES)
def test_fusion_matches_explicit_reference(size_px, train_latent, scale, length, blur, jitter):
    attn = make_attention(channels=16, heads=2)
    geo = geometry(size_px, train_latent, scale, jitter=jitter, blur=blur, seed=11, step=17)
    tokens = case_tokens(geo, length)
    expected, local, global_, covered = reference_fusion(attn, tokens, geo, block_index=5)
    # the case is not degenerate: local and global differ, and the blur matters
    assert (local - global_).abs().max() > 1e-3
    attn.set_processor(ScaleFusionProcessor(geo, block_index=5))
    got = attn(tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=0)
    # and it is not plain attention
    assert (got - global_.reshape(got.shape)).abs().max() > 1e-4


def test_fusion_without_jitter_matches_reference():
    attn = make_attention(channels=16, heads=2)
    geo = geometry((128, 128), 8, (2, 2), jitter=False)
    tokens = structured_tokens(1, (16, 16), 16)
    expected, _, _, covered = reference_fusion(attn, tokens, geo, block_index=0)
    assert covered.all()
    attn.set_processor(ScaleFusionProcessor(geo, block_index=0))
    torch.testing.assert_close(attn(tokens), expected, atol=1e-9, rtol=0)


def test_jitter_stream_depends_on_block_and_step():
    attn = make_attention(channels=16, heads=2)
    tokens = structured_tokens(1, (16, 16), 16)
    outputs = []
    for step, block in ((16, 0), (16, 0), (16, 1), (17, 0)):
        attn.set_processor(ScaleFusionProcessor(geometry((128, 128), 8, (2, 2), step=step), block_index=block))
        outputs.append(attn(tokens))
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2])
    assert not torch.equal(outputs[0], outputs[3])


@pytest.mark.parametrize("jitter", JITTER)
@pytest.mark.parametrize("size_px,train_latent,scale,length", [((128, 256), 16, (1, 2), 512), ((256, 256), 16, (2, 2), 1024), ((256, 384), 8, (2, 3), 1536)])
def test_fast_mode_fusion_matches_reference(size_px, train_latent, scale, length, jitter):
    attn = make_attention(channels=16, heads=2)
    geo = geometry(size_px, train_latent, scale, fast=True, blur="hwc", jitter=jitter)
    grid = geo.latent
    assert grid[0] * grid[1] == length
    tokens = structured_tokens(2, grid, 16, seed=5)
    expected, _, _, _ = reference_fusion(attn, tokens, geo, block_index=2)
    attn.set_processor(ScaleFusionProcessor(geo, block_index=2))
    torch.testing.assert_close(attn(tokens), expected, atol=1e-9, rtol=0)


# ---------------------------------------------------------------------------------------------- (c)

def manual_attention(q, k, v):
    """q/k/v (N, L, heads, d) → (N, L, heads·d) with an explicit softmax."""
    scores = torch.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(q.shape[-1])
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("nhqk,nkhd->nqhd", weights, v).flatten(2)


@pytest.mark.parametrize("grid,scale", [((8, 8), (2, 2)), ((6, 8), (1, 2)), ((8, 6), (2, 1)), ((6, 8), (3, 2)), ((12, 8), (4, 2)), ((4, 4), (1, 1))])
def test_strided_global_attention_equals_loops(grid, scale):
    batch, heads, dim = 2, 3, 4
    h, w = grid
    length = h * w
    base = structured_tokens(batch, grid, heads * dim, seed=1).view(batch, length, heads, dim)
    q, k, v = base, base.flip(-1) * 0.7 + 0.1, base.roll(1, dims=-2) - 0.2
    got = strided_global_attention(q, k, v, grid, scale)
    sh, sw = scale
    expected = torch.zeros(batch, h, w, heads * dim, dtype=torch.float64)
    as_grid = lambda t: t.view(batch, h, w, heads, dim)  # noqa: E731
    for a in range(sh):
        for b in range(sw):
            sub = [as_grid(t)[:, a::sh, b::sw] for t in (q, k, v)]
            shape = sub[0].shape
            out = manual_attention(*(s.reshape(batch, -1, heads, dim) for s in sub))
            expected[:, a::sh, b::sw] = out.view(batch, shape[1], shape[2], heads * dim)
    assert got.shape == (batch, length, heads * dim)
    torch.testing.assert_close(got, expected.view(batch, length, heads * dim), atol=1e-10, rtol=0)
    if scale != (1, 1):
        full = manual_attention(q, k, v)
        assert not torch.allclose(got, full, atol=1e-4)
