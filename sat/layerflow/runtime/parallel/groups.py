"""The process groups of one parallel layout, created once on every rank before any model loads.

:func:`setup` is collective (every rank calls it with the same settings, as ``torch.distributed``
requires for ``new_group``); afterwards :func:`current` tells the runner which share of the
samples this rank's group takes and whether this rank writes, and the pipeline which groups to
talk to. Without :func:`setup` every rank is a group of its own, as before.

Every collective of a video goes through an :class:`~layerflow.runtime.parallel.agreement.Exchange`,
which first makes the group vote that none of its ranks failed (see
:mod:`layerflow.runtime.parallel.agreement`); the device groups wait at most
``runtime.parallel.timeout_s`` for a collective.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from layerflow.errors import ConfigError
from layerflow.runtime import distributed
from layerflow.runtime.parallel.agreement import Agreement, Exchange
from layerflow.runtime.parallel.layout import GroupLayout, ParallelSection
from layerflow.runtime.parallel.ulysses import UlyssesGroup


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's place in a :class:`GroupLayout` and the process groups it belongs to."""

    layout: GroupLayout
    rank: int
    video_group: Exchange | None = None  # every rank of this video (VAE decode split)
    cfg_group: Exchange | None = None  # this rank's guidance pair
    ulysses_group: Exchange | None = None  # the ranks sharing this rank's token sequence
    agreement: Agreement | None = None  # the votes before each exchange of this rank's video

    @property
    def size(self) -> int:
        return self.layout.group_size

    @property
    def group_index(self) -> int:
        return self.layout.group_index(self.rank)

    @property
    def num_groups(self) -> int:
        return self.layout.num_groups

    @property
    def member(self) -> int:
        return self.layout.member(self.rank)

    @property
    def is_leader(self) -> bool:
        return self.layout.is_leader(self.rank)

    @property
    def cfg_index(self) -> int:
        return self.layout.cfg_index(self.rank)

    @property
    def ulysses(self) -> UlyssesGroup | None:
        """What the network needs for sequence parallelism, or None when the sequence is not split."""
        if self.layout.ulysses == 1:
            return None
        return UlyssesGroup(self.ulysses_group, self.layout.ulysses_index(self.rank), self.layout.ulysses)


_current: ParallelGroups | None = None


def _new_groups(rank_lists: Sequence[tuple[int, ...]], rank: int, **options) -> object | None:
    """Create a group for every list (collective: the same lists, in the same order, on every rank);
    return the one holding ``rank``. ``options`` go to ``dist.new_group`` (backend, timeout)."""
    mine = None
    for ranks in rank_lists:
        group = dist.new_group(list(ranks), **options)
        if rank in ranks:
            mine = group
    return mine


def setup(section: ParallelSection) -> ParallelGroups:
    """Form the groups of ``section`` over all ranks (collective); see the module docstring."""
    global _current
    distributed.init_process_group()
    layout = GroupLayout(distributed.world_size(), section.cfg, section.ulysses)
    rank = distributed.rank()
    if layout.group_size == 1:
        _current = ParallelGroups(layout, rank)
        return _current
    videos = [layout.group_ranks(i) for i in range(layout.num_groups)]
    timeout = timedelta(seconds=section.timeout_s)
    agreement = Agreement(
        layout.group_ranks(layout.group_index(rank)),
        rank,
        first_group=_new_groups(videos, rank, backend="gloo", timeout=distributed.PROCESS_GROUP_TIMEOUT),
        later_group=_new_groups(videos, rank, backend="gloo", timeout=timeout),
        timeout_s=section.timeout_s,
    )

    def exchanges(rank_lists: Sequence[tuple[int, ...]]) -> Exchange:
        return Exchange(_new_groups(rank_lists, rank, timeout=timeout), agreement)

    video = exchanges(videos)
    cfg = exchanges(layout.cfg_groups()) if layout.cfg > 1 else None
    ulysses = exchanges(layout.ulysses_groups()) if layout.ulysses > 1 else None
    _current = ParallelGroups(layout, rank, video, cfg, ulysses, agreement)
    return _current


def current() -> ParallelGroups:
    """The groups made by :func:`setup`; without it, every rank is its own group."""
    if _current is not None:
        return _current
    return ParallelGroups(GroupLayout(distributed.world_size()), distributed.rank())


def groups_for(section: ParallelSection) -> ParallelGroups:
    """:func:`current`, checked against the settings a pipeline was configured with."""
    groups = current()
    if (groups.layout.cfg, groups.layout.ulysses) != (section.cfg, section.ulysses):
        raise ConfigError(
            f"runtime.parallel is cfg={section.cfg}, ulysses={section.ulysses}, but the process groups "
            f"were formed for cfg={groups.layout.cfg}, ulysses={groups.layout.ulysses}; call "
            f"layerflow.runtime.parallel.setup(config.runtime.parallel) on every rank first"
        )
    return groups
