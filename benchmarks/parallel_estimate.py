"""What one video costs each rank under ``runtime.parallel``: communication and compute per step.

For every layout (guidance degree x Ulysses degree) this prints, per rank and per denoising step:

* the bytes each rank sends (derived from the shapes: the all-to-alls around every attention, the
  gather after the last block, the guidance pair's exchange of its half of the prediction);
* the transformer's floating-point operations (derived: linear layers, the content LoRA and
  attention, at the rank's share of samples, tokens and heads);
* with ``--measure``, the rank's compute time measured on this machine's device: the network runs
  at the split sizes (its samples of the guidance batch, its slice of the tokens, attention over
  the whole sequence on its share of the heads), with local copies standing in for the exchanges;
* the step time those give for a link of ``--link-gbs`` GB/s per rank (an assumption, printed).

Once per video, the split VAE decode's all-reduces are counted by running the decoder at the
configured channel widths on a 2x2 latent and scaling by the latent area (every activation's
height and width are proportional to the latent's).

Example (full size, derived numbers only; add --measure on a GPU)::

    python benchmarks/parallel_estimate.py --base configs/model.yaml configs/tasks/gen_rgb.yaml
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sat"))

from layerflow.config import LayerFlowConfig, load_config  # noqa: E402
from layerflow.models.vae import CausalVideoVAE  # noqa: E402
from layerflow.runtime.parallel.layout import check_layout, sequence_length, token_chunks  # noqa: E402
from layerflow.runtime.parallel.vae_decode import RegionShare  # noqa: E402

GUIDANCE_BATCH = 2  # unconditional + conditional


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="parallel_estimate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", nargs="+", required=True, metavar="YAML", help="config files, as for sample_video.py")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--bytes", type=int, default=2, help="bytes per element of the network's activations (bf16: 2)")
    parser.add_argument(
        "--link-gbs", type=float, default=100.0, help="assumed bytes per second each rank moves, in GB/s (default 100)"
    )
    parser.add_argument("--measure", action="store_true", help="time the per-rank compute on this device")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-ranks", type=int, default=12, help="largest cfg x ulysses to list")
    parser.add_argument("--no-vae", action="store_true", help="skip counting the split VAE decode")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class RankCost:
    cfg: int
    ulysses: int
    sent_bytes: float  # per rank per step
    flops: float  # per rank per step


def rank_cost(config: LayerFlowConfig, cfg: int, ulysses: int, element_bytes: int) -> RankCost:
    """Bytes sent and transformer flops of the busiest rank in one denoising step (derived)."""
    net, layout = config.network, config.layout
    samples = GUIDANCE_BATCH // cfg
    tokens = sequence_length(config)
    mine = max(token_chunks(tokens, ulysses))
    d, layers = net.hidden_size, net.num_layers
    sent = 0.0
    if ulysses > 1:
        per_layer = 4 * samples * mine * d * (ulysses - 1) / ulysses  # q, k, v out, attention result back
        sent += layers * per_layer * element_bytes
        sent += samples * mine * d * (ulysses - 1) * element_bytes  # gather before the final layer
    if cfg > 1:
        rows, cols = net.latent_height, net.latent_width
        sent += samples * layout.generated_frames * net.out_channels * rows * cols * 4  # float32 prediction
    lora = net.lora
    lora_macs = 0 if lora is None else 8 * lora.spatial_r * d  # content LoRA: down + up, qkv (3 d) and dense (d)
    linear_macs = mine * (3 * d * d + d * d + 2 * 4 * d * d + lora_macs)
    attention_macs = 2 * tokens * tokens * d / ulysses  # QK^T and AV over the whole sequence, h/k heads
    flops = 2 * samples * layers * (linear_macs + attention_macs)
    return RankCost(cfg, ulysses, sent, flops)


def vae_activation_bytes(config: LayerFlowConfig, element_bytes: int) -> float:
    """Bytes of every decoder activation the split decode all-reduces, summed over the layers."""
    section = config.model.vae
    vae = CausalVideoVAE(section.sizes).eval()
    net = config.network
    counted = []

    def count(out: torch.Tensor) -> torch.Tensor:
        counted.append(out.numel())
        return out

    latent = torch.zeros(1, section.z_channels, config.layout.latent_frames, 2, 2)
    with torch.no_grad():
        vae.decode(latent, temporal_chunk=config.layout.latent_frames, share=RegionShare(0, 1, count))
    scale = net.latent_height * net.latent_width / 4
    return sum(counted) * scale * element_bytes


class EmulatedShard:
    """One Ulysses rank's computation on one device: its tokens, attention on h/k heads over the whole
    sequence; local copies stand in for the all-to-alls (the exchanged bytes are counted apart)."""

    def __init__(self, text_length: int, tokens: int, degree: int):
        self.text_length, self.tokens, self.degree = text_length, tokens, degree
        self.size = max(token_chunks(tokens, degree))
        self.local_text_length = min(text_length, self.size)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : self.size]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        heads = q.shape[1] // self.degree
        q, k, v = (t[:, :heads].repeat(1, 1, self.degree, 1)[:, :, : self.tokens] for t in (q, k, v))  # (b, h/k, n, e)
        out = F.scaled_dot_product_attention(q, k, v)
        return out[:, :, : self.size].repeat(1, self.degree, 1, 1)  # (b, h, n_r, e)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(1, self.degree, 1)[:, : self.tokens]


class _EmulatedGroup:
    def __init__(self, degree: int):
        self.degree = degree

    def shard(self, text_length: int, tokens: int) -> EmulatedShard:
        return EmulatedShard(text_length, tokens, self.degree)


def measure_step(config: LayerFlowConfig, cfg: int, ulysses: int, repeats: int) -> float:
    """Median seconds of one rank's network call at the split sizes (random weights, this device)."""
    from layerflow.models.dit import LayerFlowDiT
    from layerflow.runtime.devices import resolve_placement
    from layerflow.runtime.distributed import ensure_model_parallel
    from layerflow.weights.random import randomize_

    ensure_model_parallel()
    placement = resolve_placement(config.runtime)
    device, dtype = placement.compute_device, placement.dtype
    net, layout = config.network, config.layout
    network = LayerFlowDiT(net, device="cpu", dtype=torch.float32)
    randomize_(network, 0)
    network = network.to(device, dtype).eval().requires_grad_(False)
    samples = GUIDANCE_BATCH // cfg
    x = torch.randn(
        samples, layout.latent_frames, net.in_channels, net.latent_height, net.latent_width, device=device, dtype=dtype
    )
    text = torch.randn(samples, layout.text_length, net.text_hidden_size, device=device, dtype=dtype)
    t = torch.full((samples,), 500.0, device=device)
    group = _EmulatedGroup(ulysses) if ulysses > 1 else None
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            placement.synchronize()
            start = time.perf_counter()
            network(x, t, text, sequence_parallel=group)
            placement.synchronize()
            times.append(time.perf_counter() - start)
    times = sorted(times[1:])
    return times[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.base, args.set)
    net = config.network
    print(
        f"{config.layout.name}: {sequence_length(config)} tokens ({config.layout.text_length} text), "
        f"hidden {net.hidden_size}, {net.num_attention_heads} heads, {net.num_layers} layers; "
        f"{args.bytes} bytes per activation element; link {args.link_gbs:g} GB/s per rank (assumed)"
    )
    print(
        "cfg x ulysses | ranks | sent per rank per step | TFLOP per rank per step | comm s at link"
        + (" | measured compute s | step s" if args.measure else "")
    )
    heads = net.num_attention_heads
    layouts = [
        (cfg, ulysses)
        for ulysses in range(1, heads + 1)
        if heads % ulysses == 0
        for cfg in (1, 2)
        if cfg * ulysses <= args.max_ranks
    ]
    for cfg, ulysses in layouts:
        try:
            check_layout(
                load_config(
                    args.base, [*args.set, f"runtime.parallel.cfg={cfg}", f"runtime.parallel.ulysses={ulysses}"]
                ),
                cfg * ulysses,
            )
        except ValueError as error:
            print(f"{cfg} x {ulysses} | {cfg * ulysses} | not possible: {error}")
            continue
        cost = rank_cost(config, cfg, ulysses, args.bytes)
        comm = cost.sent_bytes / (args.link_gbs * 1e9)
        row = (
            f"{cfg} x {ulysses} | {cfg * ulysses} | {cost.sent_bytes / 1e6:,.1f} MB | {cost.flops / 1e12:,.2f} | "
            f"{comm:.4f}"
        )
        if args.measure:
            compute = measure_step(config, cfg, ulysses, args.repeats)
            row += f" | {compute:.4f} | {compute + comm:.4f}"
        print(row, flush=True)
    if not args.no_vae:
        activations = vae_activation_bytes(config, args.bytes)
        print(f"split VAE decode: {activations / 1e9:,.1f} GB of decoder activations are all-reduced per video")
        for group in sorted({cfg * ulysses for cfg, ulysses in layouts} - {1}):
            sent = activations * 2 * (group - 1) / group  # a ring all-reduce sends 2 (g-1)/g of the data
            print(
                f"split VAE decode over {group} ranks: {sent / 1e9:,.2f} GB sent per rank per video "
                f"({sent / (args.link_gbs * 1e9):.2f} s at the assumed link)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
