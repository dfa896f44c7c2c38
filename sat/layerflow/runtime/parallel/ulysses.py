"""Ulysses sequence parallelism (DeepSpeed-Ulysses, arXiv 2309.14509) for the DiT, on torch.distributed.

Each of the k ranks of a Ulysses group holds one contiguous slice of the token sequence (text
first, then video; :func:`layerflow.runtime.parallel.layout.token_chunks`) through every token-wise part
of a block: adaLN, LayerNorms, the projections with their LoRA, the MLP. Position embeddings are
absolute (a sin-cos table added once at the input), so a slice takes its rows of the table and
needs nothing else. Around attention, one all-to-all turns sequence-sharded queries, keys and
values into head-sharded ones over the whole sequence, PyTorch's fused attention runs on h/k
heads, and a second all-to-all turns the result back. The per-head LayerNorm on queries and keys
is token-wise and runs before the exchange. After the last block the slices are gathered, so the
final layer and every rank see the whole output.

Chunks may differ by one token (any sequence length splits), so the exchanges use
``all_to_all_single`` with split sizes. A slice is always [text tokens, video tokens], so the
block's text/video modulation runs unchanged with the slice's own text length. Every exchange goes
through the group's :class:`~layerflow.runtime.parallel.agreement.Exchange`, which first has the
group vote that no rank failed.

Legend: b batch, h heads, k ranks in the group, n tokens (all), n_r tokens of rank r, e head size,
d hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from layerflow.runtime.parallel.agreement import Exchange
from layerflow.runtime.parallel.layout import token_chunks


def sequence_to_heads(x: torch.Tensor, chunks: tuple[int, ...], group: Exchange) -> torch.Tensor:
    """All-to-all: this rank's tokens of every head -> every token of this rank's heads.

    (b, h, n_r, e) -> (b, h/k, n, e); ``chunks`` are the token counts of the group's ranks.
    """
    k = len(chunks)
    b, h, n_r, e = x.shape
    per_rank = h // k
    send = x.reshape(b, k, per_rank, n_r, e).transpose(0, 1).contiguous()  # (k, b, h/k, n_r, e)
    block = b * per_rank * e
    received = x.new_empty(block * sum(chunks))
    group.all_to_all_single(received, send.reshape(-1), [block * n for n in chunks], [block * n_r] * k)
    parts = received.split([block * n for n in chunks])
    return torch.cat([part.view(b, per_rank, n, e) for part, n in zip(parts, chunks, strict=True)], dim=2)


def heads_to_sequence(x: torch.Tensor, chunks: tuple[int, ...], rank: int, group: Exchange) -> torch.Tensor:
    """The inverse all-to-all: (b, h/k, n, e) -> (b, h, n_r, e) for this rank's tokens."""
    k = len(chunks)
    b, per_rank, _, e = x.shape
    n_r = chunks[rank]
    block = b * per_rank * e
    send = torch.cat([part.reshape(-1) for part in x.split(list(chunks), dim=2)])  # rank by rank, (b, h/k, n_i, e)
    received = x.new_empty(k * block * n_r)
    group.all_to_all_single(received, send, [block * n_r] * k, [block * n for n in chunks])
    return received.view(k, b, per_rank, n_r, e).transpose(0, 1).reshape(b, k * per_rank, n_r, e)


def gather_sequence(x: torch.Tensor, chunks: tuple[int, ...], group: Exchange) -> torch.Tensor:
    """All ranks' slices, joined in order: (b, n_r, d) -> (b, n, d)."""
    longest = max(chunks)
    padded = F.pad(x, (0, 0, 0, longest - x.shape[1])).contiguous()  # (b, max n_r, d)
    parts = [torch.empty_like(padded) for _ in chunks]
    group.all_gather(parts, padded)
    return torch.cat([part[:, :n] for part, n in zip(parts, chunks, strict=True)], dim=1)


@dataclass(frozen=True)
class SequenceShard:
    """This rank's slice [start, stop) of one forward's token sequence, and the exchanges it needs."""

    group: Exchange
    rank: int
    chunks: tuple[int, ...]
    text_length: int

    @property
    def start(self) -> int:
        return sum(self.chunks[: self.rank])

    @property
    def stop(self) -> int:
        return self.start + self.chunks[self.rank]

    @property
    def local_text_length(self) -> int:
        """Text tokens in this slice (the slice is text tokens first, then video tokens)."""
        return min(max(self.text_length - self.start, 0), self.stop - self.start)

    def take(self, tokens: torch.Tensor) -> torch.Tensor:
        """(b, n, d) -> (b, n_r, d)."""
        return tokens[:, self.start : self.stop]

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Full attention for this slice's queries over all keys: (b, h, n_r, e) x3 -> (b, h, n_r, e)."""
        q, k, v = (sequence_to_heads(t, self.chunks, self.group) for t in (query, key, value))  # (b, h/k, n, e)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, h/k, n, e)
        return heads_to_sequence(out, self.chunks, self.rank, self.group)

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """(b, n_r, d) -> (b, n, d)."""
        return gather_sequence(tokens, self.chunks, self.group)


@dataclass(frozen=True)
class UlyssesGroup:
    """A Ulysses group as the network sees it: the process group, this rank's index and the degree."""

    group: Exchange
    rank: int
    degree: int

    def shard(self, text_length: int, tokens: int) -> SequenceShard:
        """The slice of a sequence of ``tokens`` tokens (the first ``text_length`` of them text)."""
        return SequenceShard(self.group, self.rank, token_chunks(tokens, self.degree), text_length)
