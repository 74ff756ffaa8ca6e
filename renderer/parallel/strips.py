"""Row strips: which rows of an image each worker holds, and how its strip is exchanged with the others.

A `StripLayout` splits the latent rows of a stage among the ranks. Every activation inside the UNet or
VAE is the same layout at another scale (½ and ¼ in the UNet's down path, 8× in the VAE decoder's
output), so a rank recognises the scale of any tensor from its own strip height and knows every other
rank's rows at that scale without asking. `RowGroup` adds the three exchanges everything else is built
from: fetching any range of rows from their owners (halos, windows), summing over ranks (GroupNorm and
Fourier statistics) and passing blocks around the ring (global attention).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from fractions import Fraction
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

Span = tuple[int, int]  # [start, stop) in global rows

# Bytes this process has received, by purpose: row fetches are labelled by their caller ("conv", "window",
# "blur", "vae", "guidance"; "vae" also counts the banded VAE's halos, `edges`), "ring" counts K/V blocks,
# "sum" all-reduced statistics (counted once at their size), "guidance" also the partner's prediction of a
# guidance split (`renderer.parallel.guidance`), "handoff" the latents of the stages rank 0 ran alone
# (`hand_over`). Read by the benchmarks and the metrics.
received_bytes: dict[str, int] = defaultdict(int)


@dataclass(frozen=True)
class StripLayout:
    """Strip boundaries in latent rows: rank r holds rows [bounds[r], bounds[r + 1])."""

    bounds: tuple[int, ...]

    @property
    def ranks(self) -> int:
        return len(self.bounds) - 1

    @property
    def height(self) -> int:
        return self.bounds[-1]

    def span(self, rank: int) -> Span:
        return self.bounds[rank], self.bounds[rank + 1]

    def rows(self, rank: int) -> slice:
        return slice(*self.span(rank))

    def scaled(self, factor: Fraction) -> "StripLayout":
        scaled = [bound * factor for bound in self.bounds]
        if any(bound.denominator != 1 for bound in scaled):
            raise ValueError(f"strips {self.bounds} do not scale by {factor} to whole rows")
        return StripLayout(tuple(int(bound) for bound in scaled))


def plan_strips(height: int, ranks: int, unit: int) -> StripLayout:
    """Split `height` rows into `ranks` strips of whole `unit`s, as even as possible (the top ones larger)."""
    units, rest = divmod(height, unit)
    if rest or units < ranks:
        raise ValueError(
            f"{height} latent rows cannot be split into {ranks} strips of whole {unit}-row units; "
            f"use at most {units} workers or a height that is a multiple of {unit}"
        )
    sizes = [units // ranks + (1 if rank < units % ranks else 0) for rank in range(ranks)]
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size * unit)
    return StripLayout(tuple(bounds))


def with_rows(x: torch.Tensor, dim: int, rows: int) -> list[int]:
    """The shape of `x` with `rows` rows along `dim`."""
    shape = list(x.shape)
    shape[dim] = rows
    return shape


class RowGroup:
    """This rank's view of a row-sharded tensor world: the layout, and the exchanges over the process group.

    Tensors keep rows on one dimension (2 for (B, C, H, W), 1 for (B, H, W, C) token grids). With gloo and
    CUDA tensors, messages are staged through host memory (gloo's point-to-point is CPU-only)."""

    def __init__(self, layout: StripLayout, group: dist.ProcessGroup | None = None, local: bool = False):
        self.layout = layout
        self.group = group
        self.local = local
        self.rank = 0 if local else dist.get_rank(group)
        self.world = 1 if local else dist.get_world_size(group)
        if layout.ranks != self.world:
            raise ValueError(f"layout has {layout.ranks} strips for {self.world} ranks")
        self.host_staging = not local and dist.get_backend(group) == "gloo"

    @classmethod
    def single(cls, height: int) -> "RowGroup":
        """One process holding all `height` rows, without a process group: every exchange is a no-op."""
        return cls(StripLayout((0, height)), local=True)

    def with_layout(self, layout: StripLayout) -> "RowGroup":
        return RowGroup(layout, self.group, self.local)

    @property
    def span(self) -> Span:
        return self.layout.span(self.rank)

    def layout_for(self, local_rows: int) -> StripLayout:
        """The layout of a tensor of which this rank holds `local_rows` rows."""
        start, stop = self.span
        return self.layout.scaled(Fraction(local_rows, stop - start))

    def _wire(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.cpu() if self.host_staging else tensor

    def fetch(self, x: torch.Tensor, dim: int, requests: Sequence[Span], purpose: str) -> torch.Tensor:
        """Rows requests[rank] of the global tensor whose strip `x` is; rows outside the image are zeros.

        Every rank passes the same `requests` (one span per rank), so each knows what to send to whom;
        `purpose` labels the bytes in `received_bytes`."""
        layout = self.layout_for(x.shape[dim])
        own_start, own_stop = layout.span(self.rank)
        want_start, want_stop = requests[self.rank]
        pieces: dict[int, torch.Tensor] = {}
        operations = []
        for other in range(self.world):
            if other == self.rank:
                continue
            start, stop = max(requests[other][0], own_start), min(requests[other][1], own_stop)
            if start < stop:
                payload = self._wire(x.narrow(dim, start - own_start, stop - start).contiguous())
                operations.append(dist.P2POp(dist.isend, payload, group=self.group, group_peer=other))
            other_start, other_stop = layout.span(other)
            start, stop = max(want_start, other_start), min(want_stop, other_stop)
            if start < stop:
                pieces[start] = self._wire(x.new_empty(with_rows(x, dim, stop - start)))
                operations.append(dist.P2POp(dist.irecv, pieces[start], group=self.group, group_peer=other))
        for request in dist.batch_isend_irecv(operations) if operations else []:
            request.wait()
        received_bytes[purpose] += sum(piece.numel() * piece.element_size() for piece in pieces.values())
        pieces = {start: piece.to(x.device) for start, piece in pieces.items()}
        start, stop = max(want_start, own_start), min(want_stop, own_stop)
        if start < stop:
            pieces[start] = x.narrow(dim, start - own_start, stop - start)
        for start, stop in ((want_start, min(want_stop, 0)), (max(want_start, layout.height), want_stop)):
            if start < stop:
                pieces[start] = x.new_zeros(with_rows(x, dim, stop - start))
        covered = sum(piece.shape[dim] for piece in pieces.values())
        if covered != want_stop - want_start:
            raise RuntimeError(f"rows {want_start}:{want_stop} were not all delivered ({covered} rows)")
        return torch.cat([pieces[start] for start in sorted(pieces)], dim=dim)

    def edges(self, first: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The rows just above and just below this rank's strip, from its neighbours: each rank passes its own
        `first` rows (sent up, as the rank above's rows below) and `last` rows (sent down), (B, C, rows, W).
        None at the image's edges, and for empty halos. (The banded VAE's halos: counted as "vae".)"""
        above = below = None
        operations = []
        if self.rank > 0 and last.shape[2]:  # the rank above's last rows: as many as this rank sends down
            above = self._wire(last.new_empty(last.shape))
            operations.append(dist.P2POp(dist.irecv, above, group=self.group, group_peer=self.rank - 1))
        if self.rank > 0 and first.shape[2]:
            operations.append(dist.P2POp(dist.isend, self._wire(first.contiguous()), group=self.group, group_peer=self.rank - 1))
        if self.rank + 1 < self.world and first.shape[2]:
            below = self._wire(first.new_empty(first.shape))
            operations.append(dist.P2POp(dist.irecv, below, group=self.group, group_peer=self.rank + 1))
        if self.rank + 1 < self.world and last.shape[2]:
            operations.append(dist.P2POp(dist.isend, self._wire(last.contiguous()), group=self.group, group_peer=self.rank + 1))
        for request in dist.batch_isend_irecv(operations) if operations else []:
            request.wait()
        received = [edge for edge in (above, below) if edge is not None]
        received_bytes["vae"] += sum(edge.numel() * edge.element_size() for edge in received)
        return tuple(None if edge is None else edge.to(first.device) for edge in (above, below))

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over all ranks (a new tensor; `x` is left alone)."""
        if self.world == 1:
            return x.clone()
        total = self._wire(x.clone())
        dist.all_reduce(total, group=self.group)
        received_bytes["sum"] += total.numel() * total.element_size()
        return total.to(x.device)

    def ring(self, block: torch.Tensor, dim: int) -> Iterator[torch.Tensor]:
        """Every rank's block (own first, then the rank above's, and so on around the ring).

        The next block is in flight while the caller works on the current one. Blocks may differ in size
        along `dim`, in proportion to the strips."""
        layout = self.layout_for(block.shape[dim])
        current = block
        for step in range(self.world):
            pending = []
            if step + 1 < self.world:
                source_start, source_stop = layout.span((self.rank - step - 1) % self.world)
                incoming = self._wire(block.new_empty(with_rows(block, dim, source_stop - source_start)))
                operations = [
                    dist.P2POp(dist.isend, self._wire(current.contiguous()), group=self.group, group_peer=(self.rank + 1) % self.world),
                    dist.P2POp(dist.irecv, incoming, group=self.group, group_peer=(self.rank - 1) % self.world),
                ]
                pending = dist.batch_isend_irecv(operations)
            yield current
            for request in pending:
                request.wait()
            if pending:
                received_bytes["ring"] += incoming.numel() * incoming.element_size()
                current = incoming.to(block.device)


def init_process_group(rank: int, world: int, address: str, backend: str, timeout_s: float) -> None:
    """Explicit TCP rendezvous at `address` (host:port of rank 0), failing after `timeout_s`.

    Ends with one all-reduce on every rank, so that communicators exist before the first point-to-point
    batch (NCCL requires all ranks in the first one) and a broken group fails here, not mid-render."""
    if backend == "nccl":
        torch.cuda.set_device(0)  # Ray shows each GPU worker its own GPU as cuda:0
    dist.init_process_group(
        backend, init_method=f"tcp://{address}", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )
    dist.all_reduce(torch.zeros(1, device="cuda" if backend == "nccl" else "cpu"))


def hand_over(tensor: torch.Tensor | None, shape: Sequence[int], device: torch.device, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Rank 0's `tensor` (fp32, of `shape`) on every rank of `group`: the latents of the stages rank 0 ran alone.

    The other ranks pass None and wait here while rank 0 works (within the group's collective timeout)."""
    staged = dist.get_backend(group) == "gloo"
    if tensor is None:
        tensor = torch.empty(tuple(shape), dtype=torch.float32, device="cpu" if staged else device)
        received = True
    else:
        tensor = tensor.float().contiguous().to("cpu" if staged else device)
        received = False
    dist.broadcast(tensor, src=0, group=group)
    if received:
        received_bytes["handoff"] += tensor.numel() * tensor.element_size()
    return tensor.to(device)
