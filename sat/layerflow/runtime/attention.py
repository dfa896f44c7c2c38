"""Attention kernels the DiT can run, and the choice among them (``runtime.attention``).

Every kernel computes softmax(q k^T / sqrt(e)) v over all tokens (the DiT has no mask). They take
queries, keys and values in one of two memory layouts:

* ``heads_first`` (b, h, n, e): the original's order. SAT splits the fused qkv projection and
  permutes each part to (b, h, n, e); the per-head LayerNorm then writes q and k contiguous in that
  order. This is the faithful path, the same numbers as the original.
* ``tokens_first`` (b, n, h, e): the projection's own order. The per-head LayerNorm runs on the
  (b, n, h, e) view, no permute copies are made, and the result reshapes to (b, n, d) for free.
  This is the layout FlashAttention and cuDNN read natively (PyTorch's kernels get transposed
  views, which are (b, h, n, e) tensors with (b, n, h, e) strides).

The kernels are a table (:data:`KERNELS`); ``auto`` takes the first usable one of :data:`AUTO_ORDER`,
the exact kernels from fastest to slowest on an H100 (see docs/performance.md). SageAttention
quantises q and k to int8, so it is not exact and ``auto`` never picks it; it runs only when named.

Legend: b batch, h heads, n tokens, e head size.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS_FIRST = "heads_first"
TOKENS_FIRST = "tokens_first"


class AttentionUnavailable(ValueError):
    """A kernel named in ``runtime.attention`` that cannot run here (one line saying why)."""


@dataclass(frozen=True)
class AttentionKernel:
    """One way to compute attention: ``run(q, k, v)`` in ``layout`` order, returning the same order."""

    name: str
    layout: str
    exact: bool
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    unavailable: Callable[[torch.device, torch.dtype, int], str | None]
    install: str = ""

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return self.run(query, key, value)


# -- PyTorch's fused attention -----------------------------------------------------------------------

_TORCH_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
# What PyTorch implements on the CPU (FLASH_ATTENTION has a CPU kernel of its own).
_CPU_BACKENDS = {SDPBackend.FLASH_ATTENTION, SDPBackend.MATH}


def _sdpa_tokens_first(backend: SDPBackend | None):
    """PyTorch SDPA on (b, n, h, e) tensors, restricted to ``backend`` (None: PyTorch's own choice).

    q and k arrive contiguous from the per-head LayerNorm; v is a view into the packed projection
    (token stride 3d) and is copied to the same (b, n, h, e) layout (~0.1 ms at full size). With all
    three alike, the stride check PyTorch has applied to cuDNN (``check_cudnn_layout``: q, k, v all
    in this layout, or in the packed-QKV one) accepts them. The original's mix (contiguous
    heads-first q/k beside a packed v) matches neither layout as a whole; whether that is what kept
    the model off cuDNN's kernel on the H100 is not yet confirmed: ``benchmarks/attention.py`` prints
    PyTorch's own reasons on a GPU.
    """

    def run(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        restrict = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
        with restrict:
            out = F.scaled_dot_product_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.contiguous().transpose(1, 2)
            )
        return out.transpose(1, 2)  # (b, h, n, e) -> (b, n, h, e), a view

    return run


def _probe(device: torch.device, dtype: torch.dtype, head_dim: int) -> torch.backends.cuda.SDPAParams:
    """Attention inputs of the DiT's head size on ``device``, in the tokens-first strides the kernels get."""
    x = torch.zeros(1, 256, 2, head_dim, device=device, dtype=dtype).transpose(1, 2)  # (1, 2, 256, e)
    return torch.backends.cuda.SDPAParams(x, x, x, None, 0.0, False, False)


_TORCH_CAN_USE = {
    SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.can_use_cudnn_attention,
    SDPBackend.FLASH_ATTENTION: torch.backends.cuda.can_use_flash_attention,
    SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.can_use_efficient_attention,
}


def _torch_backend_unavailable(backend: SDPBackend):
    def unavailable(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
        if device.type == "cpu":
            return None if backend in _CPU_BACKENDS else "needs a CUDA GPU (this run is on the CPU)"
        if backend is SDPBackend.MATH:
            return None
        if not _TORCH_CAN_USE[backend](_probe(device, dtype, head_dim), debug=False):
            return (
                f"PyTorch {torch.__version__} cannot run it on {torch.cuda.get_device_name(device)} "
                f"for {dtype} heads of size {head_dim}"
            )
        return None

    return unavailable


def _always_available(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    return None


# -- optional packages -------------------------------------------------------------------------------


def _package_unavailable(
    module: str, function: str, min_capability: tuple[int, int], exact_dtypes: tuple[torch.dtype, ...]
):
    def unavailable(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
        if _find(module) is None:
            return "not installed"
        if device.type == "cuda":  # importing may load CUDA code; only worth it where it could run
            try:
                loaded = importlib.import_module(module)
            except Exception as error:  # a broken build: say so rather than stop
                return f"installed but cannot be imported ({type(error).__name__}: {str(error).splitlines()[0]})"
            if not hasattr(loaded, function):
                return f"installed, but {module} has no {function}"
        if device.type != "cuda":
            return "needs a CUDA GPU (this run is on the CPU)"
        if torch.cuda.get_device_capability(device) < min_capability:
            major, minor = min_capability
            return f"needs compute capability {major}.{minor} or newer"
        if dtype not in exact_dtypes:
            return f"runs {' or '.join(str(d).removeprefix('torch.') for d in exact_dtypes)} only, not {dtype}"
        return None

    return unavailable


def _find(module: str):
    """The module's spec, or None when it (or its parent package) is not installed or cannot load."""
    try:
        return importlib.util.find_spec(module)
    except ImportError:
        return None


# Kernels from other packages run their own compiled code: torch.compile calls them as they are
# (a clean graph break) instead of tracing into them.
@torch.compiler.disable
def _flash_attn_4(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(query, key, value)
    return out[0] if isinstance(out, tuple) else out  # (b, n, h, e); newer releases also return the LSE


@torch.compiler.disable
def _flash_attn_3(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    from flash_attn_interface import flash_attn_func

    out = flash_attn_func(query, key, value)
    return out[0] if isinstance(out, tuple) else out  # (b, n, h, e)


@torch.compiler.disable
def _sage(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    from sageattention import sageattn

    return sageattn(query, key, value, tensor_layout="NHD", is_causal=False)


_HALF = (torch.bfloat16, torch.float16)

KERNELS: dict[str, AttentionKernel] = {
    "sdpa": AttentionKernel("sdpa", TOKENS_FIRST, True, _sdpa_tokens_first(None), _always_available),
    **{
        name: AttentionKernel(
            name, TOKENS_FIRST, True, _sdpa_tokens_first(backend), _torch_backend_unavailable(backend)
        )
        for name, backend in _TORCH_BACKENDS.items()
    },
    "flash-attn-4": AttentionKernel(
        "flash-attn-4",
        TOKENS_FIRST,
        True,
        _flash_attn_4,
        _package_unavailable("flash_attn.cute", "flash_attn_func", (9, 0), _HALF),
        install="pip install flash-attn-4 --pre",
    ),
    "flash-attn-3": AttentionKernel(
        "flash-attn-3",
        TOKENS_FIRST,
        True,
        _flash_attn_3,
        _package_unavailable("flash_attn_interface", "flash_attn_func", (9, 0), _HALF),
        install="build flash-attention's hopper/ folder: python setup.py install",
    ),
    "sage": AttentionKernel(
        "sage",
        TOKENS_FIRST,
        False,
        _sage,
        _package_unavailable("sageattention", "sageattn", (8, 0), _HALF),
        install="pip install sageattention",
    ),
}
# ``auto``: fastest exact kernel first. On an H100, cuDNN's kernel beat PyTorch's flash kernel
# (428 against 329 TFLOP/s for one call of the model's shape). FlashAttention-4 (Hopper and
# Blackwell) and FlashAttention-3 (Hopper) are tried first when installed; their order among the
# others is from their authors' reports, not yet from a measurement of ours.
AUTO_ORDER = ("flash-attn-4", "flash-attn-3", "cudnn", "flash", "efficient", "sdpa")
ATTENTION_CHOICES = ("auto", *KERNELS)


def _faithful(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(query, key, value)


# The original's attention: PyTorch's default dispatch on (b, h, n, e) tensors in SAT's order.
FAITHFUL = AttentionKernel("original", HEADS_FIRST, True, _faithful, _always_available)


def select_attention(
    choice: str, device: torch.device, dtype: torch.dtype, head_dim: int
) -> tuple[AttentionKernel, tuple[str, ...]]:
    """The kernel for ``runtime.attention = choice`` on ``device``, and the kernels ``auto`` passed over.

    A named kernel that cannot run here raises :class:`AttentionUnavailable` naming the reason and the
    kernels that can; ``auto`` takes the first usable kernel of :data:`AUTO_ORDER` and returns the
    ones before it with the reason each was passed over ("flash-attn-4: not installed").
    """
    if choice != "auto":  # the config loader has checked that it names a kernel
        kernel = KERNELS[choice]
        reason = kernel.unavailable(device, dtype, head_dim)
        if reason is not None:
            hint = f" ({kernel.install})" if kernel.install and reason == "not installed" else ""
            usable = [name for name in KERNELS if KERNELS[name].unavailable(device, dtype, head_dim) is None]
            raise AttentionUnavailable(
                f"runtime.attention = {choice}: {reason}{hint}; usable here: auto, {', '.join(usable)}"
            )
        return kernel, ()
    skipped = []
    for name in AUTO_ORDER:
        reason = KERNELS[name].unavailable(device, dtype, head_dim)
        if reason is None:
            return KERNELS[name], tuple(skipped)
        skipped.append(f"{name}: {reason}")
    raise AttentionUnavailable(f"runtime.attention = auto: no kernel can run here ({'; '.join(skipped)})")
