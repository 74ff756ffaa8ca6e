"""Classifier-free guidance split over an even gang: each half of the workers runs one branch.

Unsplit, every rank runs the UNet on the CFG batch [negative, positive] of its strip, so every halo, every
K/V block and every statistic it exchanges carries both branches. Split, rank r runs branch r % 2 only
(0: negative, 1: positive) on the rows of two neighbouring strips, 2(r // 2) and 2(r // 2) + 1, with the
ranks of its branch: half as many ranks, each with twice the rows and half the batch. The K/V each rank
receives per attention falls from (W - 1)/W to (W - 2)/(2W) of the image's, and a 2-worker gang exchanges
nothing inside the UNet at all. Once a step, partners r and r ^ 1 (the same rows, the other branch) swap
their predictions, so both combine the same two and stay equal.

Everything outside the UNet steps (VAE transitions, checkpoints, the final decode) keeps the gang's own
strips: rank r's strip lies inside its branch rows, so going back is a slice, and going there one fetch.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist

from renderer.parallel.strips import RowGroup, StripLayout, received_bytes


def branch_layout(layout: StripLayout) -> StripLayout:
    """The rows of each branch rank: every two neighbouring strips of the gang's layout merged."""
    return StripLayout(layout.bounds[::2])


class GuidanceSplit:
    """This rank's branch, the group of its branch's ranks and the partner it swaps predictions with."""

    def __init__(self, group: dist.ProcessGroup | None, branch_group: dist.ProcessGroup, pair_group: dist.ProcessGroup):
        self.group = group
        self.branch_group = branch_group
        self.pair_group = pair_group
        self.branch = dist.get_rank(group) % 2
        self.host_staging = dist.get_backend(group) == "gloo"

    def branch_rows(self, rows: RowGroup) -> RowGroup:
        """The rows this rank denoises (its strip and its partner's) among its branch's ranks."""
        return RowGroup(branch_layout(rows.layout), self.branch_group)

    def to_branch(self, rows: RowGroup, x: torch.Tensor) -> torch.Tensor:
        """This rank's branch rows of a tensor held in the gang's strips (`rows`), fetched from the partner."""
        spans = branch_layout(rows.layout_for(x.shape[2]))
        return rows.fetch(x, 2, [spans.span(rank // 2) for rank in range(rows.world)], "guidance")

    @staticmethod
    def to_strip(rows: RowGroup, branch: RowGroup, x: torch.Tensor) -> torch.Tensor:
        """This rank's own strip of a tensor held in its branch rows (a slice: the strip lies inside them)."""
        start, stop = rows.span
        return x[:, :, start - branch.span[0] : stop - branch.span[0]]

    def both_branches(self, prediction: torch.Tensor) -> torch.Tensor:
        """[negative, positive] from this rank's one-branch prediction and its partner's, in the order the
        unsplit CFG batch has them, the same on both partners."""
        mine = prediction.cpu() if self.host_staging else prediction
        theirs = torch.empty_like(mine)
        partner = 1 - self.branch  # the pair group holds ranks 2i and 2i + 1, in that order
        operations = [dist.P2POp(dist.isend, mine.contiguous(), group=self.pair_group, group_peer=partner),
                      dist.P2POp(dist.irecv, theirs, group=self.pair_group, group_peer=partner)]
        for request in dist.batch_isend_irecv(operations):
            request.wait()
        received_bytes["guidance"] += theirs.numel() * theirs.element_size()
        pair = (mine, theirs) if self.branch == 0 else (theirs, mine)
        return torch.cat(pair).to(prediction.device)


@contextmanager
def guidance_split(group: dist.ProcessGroup | None = None) -> Iterator[GuidanceSplit]:
    """Create the branch and pair groups of an even gang (collective: every rank of `group` enters it together)
    and destroy them on exit."""
    ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
    if len(ranks) % 2:
        raise ValueError(f"a guidance split needs an even number of ranks, not {len(ranks)}")
    mine = dist.get_rank(group)
    created = []
    try:
        # Every rank creates every group, in the same order (torch.distributed requires it), and keeps its own.
        for members in (ranks[0::2], ranks[1::2]):
            created.append(dist.new_group(members))
        branch_group = created[mine % 2]
        for pair in range(len(ranks) // 2):
            created.append(dist.new_group(ranks[2 * pair : 2 * pair + 2]))
        pair_group = created[2 + mine // 2]
        yield GuidanceSplit(group, branch_group, pair_group)
    finally:
        for made in created:
            if made is not dist.GroupMember.NON_GROUP_MEMBER:
                dist.destroy_process_group(made)
