"""The ranks of one video agree, before each exchange, that none of them has failed.

A rank of a video group that fails (an exception: out of memory on its GPU, a bad input) stops
taking part in the group's exchanges, so without more its partners would wait in the next one
until the process-group timeout. Instead every collective of a video (:class:`Exchange`: the
guidance all-gather, the Ulysses all-to-alls, the split decode's all-reduces) is preceded by a
vote, a one-integer all-reduce in host memory over a gloo group of the video's ranks (no device
synchronisation), and each video ends with one more (:meth:`Agreement.finish`). A rank that
failed casts the vote its partners wait in, with its reason (:meth:`Agreement.fail`); then every
rank knows who failed first and why, the healthy ones raise :class:`PartnerFailed`, and the group
goes on with its next video: the process groups stay in step, nothing is torn down.

A rank that dies or hangs cannot vote. Gloo sees a dead peer at once (its connection closes); a
peer that does not answer is given up after ``runtime.parallel.timeout_s``, and the device
collectives of a video have the same limit. Either way :class:`GroupLost` is raised and the group
cannot go on. The first vote of each video (:meth:`Agreement.start`) waits as long as the default
process group does (60 min) instead: before it the ranks load their models, encode prompts and
given layers, and the leader writes the previous video, which may take them unequal times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankFailure:
    """Which rank failed a video, and its one-line reason."""

    rank: int
    reason: str


class PartnerFailed(RuntimeError):
    """Another rank of this video's group failed; this rank gives the video up too."""

    def __init__(self, failure: RankFailure):
        super().__init__(f"rank {failure.rank} of this video's group failed: {failure.reason}")
        self.failure = failure


class GroupLost(RuntimeError):
    """A rank of this video's group died or stopped answering: the group cannot go on."""


def _first_line(error: BaseException) -> str:
    """The first line of a collective's error, without gloo's ``[file.cc:line]`` prefix."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text


class Agreement:
    """The votes of one video group (see the module docstring); every member makes the same calls."""

    def __init__(self, ranks: tuple[int, ...], rank: int, first_group, later_group, timeout_s: float):
        self.ranks = ranks
        self.rank = rank
        self.timeout_s = timeout_s
        self._first_group = first_group  # gloo, the default group's timeout: the first vote of a video
        self._later_group = later_group  # gloo, runtime.parallel.timeout_s: every later vote
        self._votes = 0
        self._settled = False  # every member knows how the current video ended

    def start(self) -> None:
        """A new video begins (call on every member, before its first exchange)."""
        self._votes = 0
        self._settled = False

    def check(self) -> None:
        """Vote that this rank is fine; raise :class:`PartnerFailed` if a partner failed. Collective."""
        failure = self._vote(None)
        if failure is not None:
            raise PartnerFailed(failure)

    def finish(self) -> None:
        """The video's last exchange is behind: vote once more, so that all know it is made. Collective."""
        self.check()
        self._settled = True

    def fail(self, reason: str) -> RankFailure:
        """This rank failed the video with ``reason``: tell the partners, who wait in their next vote,
        and return the failure all members record (the lowest failing rank's). Collective, unless the
        video was already settled (a failure after :meth:`finish`, e.g. the leader's writing, is its own)."""
        own = RankFailure(self.rank, reason)
        return own if self._settled else self._vote(reason) or own

    def _vote(self, reason: str | None) -> RankFailure | None:
        group = self._first_group if self._votes == 0 else self._later_group
        self._votes += 1
        flag = torch.tensor([0 if reason is None else 1], dtype=torch.int32)
        try:
            dist.all_reduce(flag, group=group)
            if not flag.item():
                return None
            reasons: list[str | None] = [None] * len(self.ranks)
            dist.all_gather_object(reasons, reason, group=group)
        except RuntimeError as error:
            raise self.lost(error) from None
        self._settled = True
        member = next(i for i, text in enumerate(reasons) if text is not None)
        return RankFailure(self.ranks[member], reasons[member])

    def lost(self, error: BaseException) -> GroupLost:
        """The :class:`GroupLost` for a collective of this group that raised ``error``."""
        self._settled = True  # nothing more can be said to the partners
        text = _first_line(error)
        others = [str(r) for r in self.ranks if r != self.rank]
        partners = (
            f"its video partner rank {others[0]}"
            if len(others) == 1
            else f"one of its video partners (ranks {', '.join(others)})"
        )
        if "timed out" in text.lower():
            cause = f"did not answer within runtime.parallel.timeout_s = {self.timeout_s:g} s"
        elif "closed" in text.lower() or "reset" in text.lower():
            cause = f"died (its connection closed: {text.split('. ')[0]})"
        else:
            cause = f"stopped answering ({text.split('. ')[0]})"
        return GroupLost(f"rank {self.rank}: {partners} {cause}")


@dataclass(frozen=True)
class Exchange:
    """A process group of one video whose every collective is preceded by the group's vote.

    The vote and the collective run eagerly inside ``torch.compile``d blocks (a graph break at
    each exchange): the vote reads its flag on the host, which a compiled graph cannot do.
    """

    group: object
    agreement: Agreement

    def all_gather(self, tensors: list[torch.Tensor], tensor: torch.Tensor) -> None:
        self._run(dist.all_gather, tensors, tensor)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        self._run(dist.all_reduce, tensor)

    def all_to_all_single(
        self, output: torch.Tensor, tensor: torch.Tensor, output_split_sizes: list[int], input_split_sizes: list[int]
    ) -> None:
        self._run(dist.all_to_all_single, output, tensor, output_split_sizes, input_split_sizes)

    @torch.compiler.disable
    def _run(self, collective: Callable, *args) -> None:
        self.agreement.check()
        try:
            collective(*args, group=self.group)
        except RuntimeError as error:
            raise self.agreement.lost(error) from None
