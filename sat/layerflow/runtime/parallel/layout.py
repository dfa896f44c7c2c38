"""Which rank does what when one video is spread over several processes: pure arithmetic, no collectives.

``N`` ranks form ``N / (cfg * ulysses)`` groups of consecutive ranks; each group makes one video at
a time and the groups share the sample list as single ranks did before. Inside a group of size
``g = cfg * ulysses``, member ``j`` (0 <= j < g) has

* cfg index ``j // ulysses``: 0 runs the unconditional pass, 1 the conditional one;
* ulysses index ``j % ulysses``: its slice of the token sequence.

The ranks of one Ulysses group are consecutive (the heaviest traffic stays between neighbours);
the two ranks of a guidance pair are ``ulysses`` apart. The member with j = 0 is the group's
leader: it writes the sample folder.

The token sequence (L text tokens, then N video tokens) splits into contiguous chunks whose sizes
differ by at most one token, so every sequence length splits (226 text tokens per prompt make
the length odd for most degrees: 16878 tokens for RGB generation split evenly only for 2, 3 and 6);
a chunk is always some text tokens followed by some video tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from layerflow.errors import ConfigError, FieldError


@dataclass(frozen=True)
class ParallelSection:
    """``runtime.parallel``, one video on several processes: ``cfg`` 2 runs the two guidance passes on
    two ranks; ``ulysses`` k splits the token sequence over k ranks."""

    cfg: int = 1
    ulysses: int = 1
    # how long a rank waits in an exchange of a video for a partner that neither answers nor fails
    # (one that hangs); a partner that raises or dies is noticed at once (layerflow.runtime.parallel.agreement)
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.cfg not in (1, 2):
            raise ConfigError(f"runtime.parallel.cfg must be 1 or 2 (the two guidance passes), got {self.cfg}")
        if self.ulysses < 1:
            raise ConfigError(f"runtime.parallel.ulysses must be at least 1, got {self.ulysses}")
        if not 0 < self.timeout_s <= 86400:
            raise FieldError("timeout_s", "a number of seconds from 0 (excluded) to 86400")

    @property
    def group_size(self) -> int:
        return self.cfg * self.ulysses


@dataclass(frozen=True)
class GroupLayout:
    """The grouping of ``world_size`` ranks for guidance degree ``cfg`` and sequence degree ``ulysses``."""

    world_size: int
    cfg: int = 1
    ulysses: int = 1

    def __post_init__(self) -> None:
        if self.world_size % self.group_size:
            raise ValueError(f"group size {self.group_size} does not divide {self.world_size} ranks")

    @property
    def group_size(self) -> int:
        return self.cfg * self.ulysses

    @property
    def num_groups(self) -> int:
        return self.world_size // self.group_size

    def group_index(self, rank: int) -> int:
        return rank // self.group_size

    def member(self, rank: int) -> int:
        """The rank's place j inside its group."""
        return rank % self.group_size

    def cfg_index(self, rank: int) -> int:
        return self.member(rank) // self.ulysses

    def ulysses_index(self, rank: int) -> int:
        return self.member(rank) % self.ulysses

    def is_leader(self, rank: int) -> bool:
        return self.member(rank) == 0

    def group_ranks(self, index: int) -> tuple[int, ...]:
        first = index * self.group_size
        return tuple(range(first, first + self.group_size))

    def ulysses_groups(self) -> list[tuple[int, ...]]:
        """Every Ulysses group of the world, in a fixed order (same cfg index, same video group)."""
        return [
            ranks[c * self.ulysses : (c + 1) * self.ulysses]
            for ranks in map(self.group_ranks, range(self.num_groups))
            for c in range(self.cfg)
        ]

    def cfg_groups(self) -> list[tuple[int, ...]]:
        """Every guidance pair of the world, in a fixed order (same ulysses index, same video group)."""
        return [
            ranks[u :: self.ulysses]
            for ranks in map(self.group_ranks, range(self.num_groups))
            for u in range(self.ulysses)
        ]


def token_chunks(tokens: int, parts: int) -> tuple[int, ...]:
    """Sizes of ``parts`` contiguous chunks of ``tokens`` tokens, the first ``tokens % parts`` one larger."""
    base, extra = divmod(tokens, parts)
    return tuple(base + (i < extra) for i in range(parts))


def sequence_length(config) -> int:
    """Tokens the network attends over for a :class:`~layerflow.config.LayerFlowConfig`'s task: text +
    every latent frame's patches."""
    rows, cols = config.network.patch_grid
    return config.layout.text_length + config.layout.latent_frames * rows * cols


def _divisors(n: int) -> list[int]:
    return [d for d in range(2, n + 1) if n % d == 0]


def check_layout(config, world_size: int) -> GroupLayout:
    """Validate ``runtime.parallel`` of a :class:`~layerflow.config.LayerFlowConfig` against the network
    and the number of ranks, before any model loads.

    Raises :class:`ConfigError` with one line naming the key, what was found and what is possible.
    """
    parallel = config.runtime.parallel
    heads = config.network.num_attention_heads
    if heads % parallel.ulysses:
        raise ConfigError(
            f"runtime.parallel.ulysses={parallel.ulysses} must divide the {heads} attention heads "
            f"(model.network.num_attention_heads); possible: 1, {', '.join(map(str, _divisors(heads)))}"
        )
    if world_size % parallel.group_size:
        raise ConfigError(
            f"runtime.parallel.cfg x ulysses = {parallel.cfg} x {parallel.ulysses} = "
            f"{parallel.group_size} ranks per video must divide the {world_size} processes "
            f"(torchrun --nproc_per_node)"
        )
    return GroupLayout(world_size, parallel.cfg, parallel.ulysses)
