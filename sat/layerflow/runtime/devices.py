"""Device, dtype, offload, CPU-thread and speed-path decisions, made in one place from the runtime config."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from layerflow.runtime.attention import FAITHFUL, AttentionKernel, AttentionUnavailable, select_attention
from layerflow.runtime.distributed import local_rank

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Placement:
    """Where models run and live, and in which precision.

    With ``offload`` the models stay on the CPU (``storage_device``) and each one is moved to the
    accelerator only while it runs (:meth:`on_compute`), so the peak holds one model at a time.
    """

    compute_device: torch.device
    dtype: torch.dtype
    offload: bool = False

    @property
    def storage_device(self) -> torch.device:
        return torch.device("cpu") if self.offload else self.compute_device

    @property
    def device_kind(self) -> str:
        """``cpu`` or ``cuda (<GPU name>)``: the kind of machine the outputs were computed on (no rank index)."""
        if self.compute_device.type == "cuda":
            return f"cuda ({torch.cuda.get_device_name(self.compute_device)})"
        return self.compute_device.type

    def synchronize(self) -> None:
        """Wait for queued GPU work, so that stage timings measure the work and not its launch."""
        if self.compute_device.type == "cuda":
            torch.cuda.synchronize(self.compute_device)

    @contextlib.contextmanager
    def on_compute(self, module: nn.Module) -> Iterator[nn.Module]:
        """Hold ``module`` on the compute device for the duration of the block."""
        if not self.offload or self.compute_device.type == "cpu":
            yield module
            return
        module.to(self.compute_device)
        try:
            yield module
        finally:
            module.to(self.storage_device)
            torch.cuda.empty_cache()


@contextlib.contextmanager
def cpu_threads(count: int) -> Iterator[int]:
    """Run the block with ``count`` intra-op CPU threads (0: keep torch's choice); yields the count in use.

    The count is fixed rather than taken from the machine because it changes the numbers: oneDNN's
    1x1x1 convolution on the CPU (the VAE decoder's channel-changing shortcuts) blocks its sum over
    input channels by the thread count, so another count rounds the decoded video differently.
    With the same count in every process, one process and N ranks under torchrun (which would
    otherwise give each rank one thread) write the same bytes. The previous count is restored after.
    """
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def resolve_placement(runtime) -> Placement:
    """``runtime.device``/``dtype`` 'auto': this rank's GPU in bfloat16 if there is one, else CPU float32."""
    if runtime.device == "auto":
        device = torch.device(f"cuda:{local_rank()}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(runtime.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"runtime.device is {runtime.device!r} but no CUDA device is available")
    if runtime.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[runtime.dtype]
    return Placement(compute_device=device, dtype=dtype, offload=runtime.model_cpu_offload)


@dataclass(frozen=True)
class SpeedPlan:
    """How the network runs: the faithful path (the original's numbers) or a faster one.

    The faithful path keeps the content LoRA as a separate branch, runs every block eagerly and
    computes attention as the original does (:data:`layerflow.runtime.attention.FAITHFUL`). The fast
    path folds the content LoRA into the projections (``merge_lora``), compiles the repeated block
    once (``compile``) and runs ``attention``; its outputs differ from the faithful ones by rounding.
    """

    faithful: bool
    attention: AttentionKernel
    merge_lora: bool
    compile: bool
    passed_over: tuple[str, ...] = ()  # kernels ``auto`` did not take, with the reason

    def describe(self) -> dict:
        """What ran, for meta.json and the logs."""
        return {
            "faithful": self.faithful,
            "attention": self.attention.name,
            "merge_lora": self.merge_lora,
            "compile": self.compile,
        }


def resolve_speed(runtime, placement: Placement, head_dim: int) -> SpeedPlan:
    """``runtime.faithful/attention/merge_lora/compile`` (``auto`` = None) -> the plan for this device.

    ``faithful: auto`` is the faithful path on the CPU, unless a fast-path switch is set, and the fast
    path on a GPU. On the fast path ``merge_lora: auto`` is on and ``compile: auto`` is on for GPUs
    only (compiling for the CPU takes minutes). Raises AttentionUnavailable for a named kernel that
    cannot run here.

    With the token sequence split over ranks (``runtime.parallel.ulysses`` > 1) attention runs on the
    heads the ranks exchange, with PyTorch's default dispatch in the heads-first layout
    (:mod:`layerflow.runtime.parallel.ulysses`): that is the kernel the plan names (:data:`FAITHFUL`),
    so ``meta.json`` records what ran; a kernel named in ``runtime.attention`` is refused there.
    """
    device = placement.compute_device
    asks_fast = runtime.attention != "auto" or runtime.merge_lora or runtime.compile
    faithful = runtime.faithful if runtime.faithful is not None else device.type != "cuda" and not asks_fast
    if faithful:
        return SpeedPlan(faithful=True, attention=FAITHFUL, merge_lora=False, compile=False)
    if runtime.parallel.ulysses > 1:
        kernel, passed_over = _sequence_parallel_attention(runtime)
    else:
        kernel, passed_over = select_attention(runtime.attention, device, placement.dtype, head_dim)
    return SpeedPlan(
        faithful=False,
        attention=kernel,
        merge_lora=runtime.merge_lora if runtime.merge_lora is not None else True,
        compile=runtime.compile if runtime.compile is not None else device.type == "cuda",
        passed_over=passed_over,
    )


def _sequence_parallel_attention(runtime) -> tuple[AttentionKernel, tuple[str, ...]]:
    """The kernel that runs under Ulysses (see :func:`resolve_speed`), and why ``auto`` took it."""
    ulysses = runtime.parallel.ulysses
    if runtime.attention != "auto":
        raise AttentionUnavailable(
            f"runtime.attention = {runtime.attention}: not used with runtime.parallel.ulysses = {ulysses} "
            f"(the heads the ranks exchange run PyTorch's default attention); leave runtime.attention auto"
        )
    return FAITHFUL, (f"every kernel: runtime.parallel.ulysses = {ulysses} runs PyTorch's default attention",)
