"""Time every usable attention kernel on the DiT's attention shape, in both memory layouts.

The shape comes from a config (tokens = text + latent frames x patch grid, heads, head size, a
guidance batch of 2). Queries, keys and values are made the way the model makes them:

* ``heads_first`` (the original): q and k LayerNorm'd per head after the permute, so contiguous
  (b, h, n, e); v a permuted view of the packed qkv projection;
* ``tokens_first``: q and k LayerNorm'd on the (b, n, h, e) view; v a view of the projection.

For each kernel and layout it prints milliseconds per call and TFLOP/s (4 b h n^2 e per call). On
CUDA it also asks PyTorch which of its fused kernels it would dispatch the original layout to and,
for those it refuses, why (PyTorch's own reasons, from ``can_use_*_attention(debug=True)``): this is
how to see whether the model's attention reaches cuDNN's kernel.

Example (GPU machine)::

    python benchmarks/attention.py --base configs/model.yaml configs/tasks/gen_rgba.yaml --json $OUT/attention.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sat"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from layerflow.config import load_config  # noqa: E402
from layerflow.io.atomic import write_text_atomic  # noqa: E402
from layerflow.runtime.attention import FAITHFUL, HEADS_FIRST, KERNELS, select_attention  # noqa: E402


def attention_shape(config) -> tuple[int, int, int, int]:
    """(batch, heads, tokens, head size) of one guided step of ``config``'s network."""
    network = config.network
    rows, cols = network.patch_grid
    tokens = config.layout.text_length + config.layout.latent_frames * rows * cols
    return 2, network.num_attention_heads, tokens, network.head_dim


def attention_flop(batch: int, heads: int, tokens: int, head_dim: int) -> float:
    """Two matmuls of n x n x e per head: 4 b h n^2 e."""
    return 4.0 * batch * heads * tokens * tokens * head_dim


def model_inputs(shape, layout: str, device, dtype, generator) -> tuple[torch.Tensor, ...]:
    """q, k, v with the strides the model gives them in ``layout`` (see the module docstring)."""
    b, h, n, e = shape
    packed = torch.randn(b, n, 3 * h * e, generator=generator, device="cpu").to(device, dtype)  # (b, n, 3d)
    query, key, value = (t.view(b, n, h, e) for t in packed.chunk(3, dim=-1))  # (b, n, h, e) views
    if layout == HEADS_FIRST:
        query, key, value = (t.permute(0, 2, 1, 3) for t in (query, key, value))  # (b, h, n, e)
    return F.layer_norm(query, (e,)), F.layer_norm(key, (e,)), value


def _timed(run, synchronize, repeats: int) -> float:
    run()  # warm-up (kernel selection, autotuning, lazy loading)
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def dispatch_reasons(query, key, value) -> dict[str, str]:
    """For each of PyTorch's CUDA kernels: 'usable' or the reasons PyTorch gives for refusing these tensors."""
    params = torch.backends.cuda.SDPAParams(query, key, value, None, 0.0, False, False)
    checks = {
        "cudnn": torch.backends.cuda.can_use_cudnn_attention,
        "flash": torch.backends.cuda.can_use_flash_attention,
        "efficient": torch.backends.cuda.can_use_efficient_attention,
    }
    reasons = {}
    for name, check in checks.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            usable = check(params, debug=True)
        reasons[name] = "usable" if usable else " | ".join(str(w.message) for w in caught) or "refused"
    return reasons


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", nargs="+", default=["configs/model.yaml", "configs/tasks/gen_rgba.yaml"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--tokens", type=int, default=0, help="override the token count (CPU smoke runs)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    config = load_config(args.base, args.set)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    b, h, n, e = attention_shape(config)
    shape = (b, h, args.tokens or n, e)
    flop = attention_flop(*shape)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generator = torch.Generator().manual_seed(0)

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "shape_bhne": list(shape),
        "kernels": [],
    }
    candidates = [("original", FAITHFUL)]
    for name in KERNELS:
        try:
            kernel, _ = select_attention(name, device, dtype, e)
        except ValueError as error:
            report["kernels"].append({"kernel": name, "skipped": str(error)})
            continue
        candidates.append((name, kernel))
    with torch.no_grad():
        for name, kernel in candidates:
            q, k, v = model_inputs(shape, kernel.layout, device, dtype, generator)
            seconds = _timed(lambda kernel=kernel, q=q, k=k, v=v: kernel(q, k, v), synchronize, args.repeats)
            row = {"kernel": name, "layout": kernel.layout, "ms": 1e3 * seconds, "tflops": flop / seconds / 1e12}
            report["kernels"].append(row)
            print(f"{name:14s} {kernel.layout:13s} {row['ms']:9.2f} ms  {row['tflops']:7.1f} TFLOP/s", flush=True)
        if device.type == "cuda":
            report["dispatch"] = {
                layout: dispatch_reasons(*model_inputs(shape, layout, device, dtype, generator))
                for layout in (HEADS_FIRST, "tokens_first")
            }
            for layout, reasons in report["dispatch"].items():
                for name, reason in reasons.items():
                    print(f"dispatch {layout:13s} {name:9s} {reason}")
    for row in report["kernels"]:
        if "skipped" in row:
            print(f"{row['kernel']:14s} skipped: {row['skipped']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
