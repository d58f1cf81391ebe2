"""Target forwards over a few tokens at about the cost of one on CPU: a matmul kernel chosen per shape.

A decoding step reads every weight once, so verifying 2-8 drafted tokens should cost little more than
decoding one. The stock `F.linear` does not get there on CPU: the BLAS path it takes for 2-8 rows can cost
twice its one-row path. `SmallBatchLinears` times, once per weight shape, dtype and thread count, kernels
that compute the same product (`Kernel`) at every row count 1..`max_rows` on the model's own weights, and
while active routes each `nn.Linear` of the model through the fastest kernel for the rows at hand.

The kernels compute the same product in real arithmetic but round differently, exactly as the stock `F.linear`
already rounds differently at one row and at eight: a verification forward and a plain decoding step give
the same position logits that agree to float precision, not bit for bit, with or without this runtime.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

# - "linear": the stock `F.linear(x, W)`;
# - "transposed": the same product as `(W @ x.T).T`, which BLAS runs as a few tall matrix-vector products;
# - "onednn_packed": oneDNN's matmul on a copy of W packed once into its blocked layout (any row count);
# - "mkl_packed": MKL's packed GEMM on a copy of W packed for one row count (float32 only).
Kernel = Literal["linear", "transposed", "onednn_packed", "mkl_packed"]
KERNELS: tuple[Kernel, ...] = get_args(Kernel)
# A kernel other than the stock one must beat it by this fraction: timing noise, and a packed copy of the
# weight is memory that only a real gain justifies.
MIN_GAIN = 0.05
# Profiling streams each shape's weights until this many bytes, so they come from memory as in a forward
# rather than from a warm cache.
PROFILE_BYTES = 128 * 2**20

_ShapeKey = tuple[int, int, bool, torch.dtype]  # out_features, in_features, has bias, dtype


@dataclass(frozen=True)
class _Profile:
    """The kernel chosen per row count 1..max_rows of one weight shape, and every kernel's fastest seconds
    per row count (one pass over the profiled weights)."""

    plan: tuple[Kernel, ...]
    seconds: dict[Kernel, list[float]]


# Per process, by (shape, threads, max_rows, kernels offered, repeats).
_PROFILES: dict[tuple, _Profile] = {}


def _pack(kernel: Kernel, weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """The packed copy of `weight` that `kernel` multiplies with (None for the unpacked kernels)."""
    if kernel == "onednn_packed":
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    if kernel == "mkl_packed":
        return torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)
    return None


def _apply(
    kernel: Kernel,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    packed: torch.Tensor | None,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for a 2-D `x` computed by `kernel`."""
    if kernel == "linear":
        return F.linear(x, weight, bias)
    if kernel == "transposed":  # made contiguous: later ops and kernels are slower on a transposed output
        if bias is None:
            return torch.mm(weight, x.t()).t().contiguous()
        return torch.addmm(bias.unsqueeze(1), weight, x.t()).t().contiguous()
    if kernel == "onednn_packed":
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, x.shape[0])


def _available(kernel: Kernel, dtype: torch.dtype) -> bool:
    """Whether this PyTorch build and CPU run `kernel` for weights of `dtype`."""
    if kernel == "onednn_packed":
        if not torch.backends.mkldnn.is_available():
            return False
        return dtype == torch.float32 or (
            dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    if kernel == "mkl_packed":
        return dtype == torch.float32 and torch.backends.mkl.is_available()
    return True


@dataclass
class _LinearState:
    """One routed `nn.Linear`: its weight and bias, the kernel per row count and the packed copies in use."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    plan: tuple[Kernel, ...]
    version: tuple[int, int]
    packed: dict[tuple[Kernel, int], torch.Tensor] = field(default_factory=dict)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not 1 <= rows <= len(self.plan) or torch.is_grad_enabled() or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        kernel = self.plan[rows - 1]
        packed = self.packed.get((kernel, rows if kernel == "mkl_packed" else 0))
        out = _apply(kernel, x.reshape(rows, x.shape[-1]), self.weight, self.bias, packed)
        return out.reshape(*x.shape[:-1], self.weight.shape[0])


def _version(weight: torch.Tensor) -> tuple[int, int]:
    # Inference tensors (made under torch.inference_mode) have no version counter and cannot change in place.
    return weight.data_ptr(), 0 if weight.is_inference() else weight._version


class SmallBatchLinears:
    """A reusable context manager that routes `model`'s CPU `nn.Linear` layers through the fastest kernel for
    1..`max_rows` input rows (the tokens of a decoding or verification forward); larger inputs, autograd and
    other devices keep the stock path.

    ```python
    fast = SmallBatchLinears(target)
    with fast:  # the first entry profiles each weight shape (seconds) and packs the weights it needs
        out = target.generate(ids, assistant_model=drafter, max_new_tokens=128)
    ```
    Outside the `with` block the model is untouched: the same modules and parameters, the stock forwards.
    Packed copies of weights stay with this object (memory: up to one copy of the routed weights, plus one
    per row count that MKL's packing wins), so enter the same object again to reuse them; a weight changed
    in place is packed anew on the next entry.

    Args:
        model (`nn.Module`): the model whose plain `nn.Linear` modules are routed (subclasses, modules with a
            patched `forward` and weights off the CPU or in other dtypes than float32 / bfloat16 are left).
        max_rows (`int`): the largest row count routed, i.e. the most tokens of one forward.
        kernels (`Sequence[Kernel]`): the candidates to profile; "linear" is always among them.
        repeats (`int`): timed rounds per (shape, rows, kernel); the fastest counts (other processes on the
            cores only ever add time, so the minimum ranks the kernels most reliably on a shared machine).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_rows: int = 8,
        kernels: Sequence[Kernel] = KERNELS,
        repeats: int = 5,
    ):
        unknown = sorted(set(kernels) - set(KERNELS))
        if unknown:
            raise ValueError(f"Unknown kernels {unknown}; choose from {KERNELS}.")
        if max_rows < 1 or repeats < 1:
            raise ValueError("max_rows and repeats must be >= 1.")
        self.model = model
        self.max_rows = max_rows
        self.kernels: tuple[Kernel, ...] = tuple(dict.fromkeys(("linear", *kernels)))
        self.repeats = repeats
        self._profiles: dict[_ShapeKey, _Profile] = {}
        self._states: dict[nn.Linear, _LinearState] = {}
        self._active = False

    def report(self) -> dict[str, dict]:
        """Per routed weight shape (e.g. "1536x576 float32"): the kernel chosen for each row count 1..max_rows
        and the profiled milliseconds of every kernel per row count (all the shape's profiled weights)."""
        report = {}
        for (out_features, in_features, bias, dtype), profile in self._profiles.items():
            name = (
                f"{out_features}x{in_features}{' +bias' if bias else ''} {str(dtype).removeprefix('torch.')}"
            )
            milliseconds = {
                kernel: [round(1000 * s, 3) for s in times] for kernel, times in profile.seconds.items()
            }
            report[name] = {"plan": list(profile.plan), "milliseconds": milliseconds}
        return report

    def __enter__(self) -> SmallBatchLinears:
        if self._active:
            raise RuntimeError("SmallBatchLinears is already active.")
        with torch.no_grad():
            self._prepare(list(self._routable()))
        for module, state in self._states.items():
            module.forward = state.forward
        self._active = True
        return self

    def __exit__(self, *exc_info) -> None:
        for module in self._states:
            module.__dict__.pop("forward", None)
        self._active = False

    def _routable(self) -> Iterable[nn.Linear]:
        for module in self.model.modules():
            weight = getattr(module, "weight", None)
            if (
                type(module) is nn.Linear
                and "forward" not in module.__dict__
                and weight.device.type == "cpu"
                and weight.dtype in (torch.float32, torch.bfloat16)
            ):
                yield module

    def _prepare(self, modules: list[nn.Linear]) -> None:
        """Each module's state: the plan of its shape (profiled once per process) and the packs it needs."""
        groups: dict[_ShapeKey, list[nn.Linear]] = {}
        for module in modules:
            key = (module.out_features, module.in_features, module.bias is not None, module.weight.dtype)
            groups.setdefault(key, []).append(module)
        threads = torch.get_num_threads()
        states, self._profiles = {}, {}
        for key, group in groups.items():
            cache_key = (key, threads, self.max_rows, self.kernels, self.repeats)
            if cache_key not in _PROFILES:
                _PROFILES[cache_key] = self._profile(key, group)
            profile = self._profiles[key] = _PROFILES[cache_key]
            for module in group:
                states[module] = self._state(module, profile.plan)
        self._states = states

    def _state(self, module: nn.Linear, plan: tuple[Kernel, ...]) -> _LinearState:
        """The module's state for `plan`; the previous entry's, packs included, while weight and plan hold."""
        previous = self._states.get(module)
        version = _version(module.weight)
        if (
            previous is not None
            and previous.weight is module.weight
            and previous.bias is module.bias
            and previous.version == version
            and previous.plan == plan
        ):
            return previous
        state = _LinearState(module.weight, module.bias, plan, version)
        for rows, kernel in enumerate(plan, start=1):
            slot = (kernel, rows if kernel == "mkl_packed" else 0)
            if kernel in ("onednn_packed", "mkl_packed") and slot not in state.packed:
                state.packed[slot] = _pack(kernel, module.weight, rows)
        return state

    def _profile(self, key: _ShapeKey, group: list[nn.Linear]) -> _Profile:
        """The fastest kernel per row count for one weight shape, timed on the group's own weights in turn
        (up to `PROFILE_BYTES` of them), the kernels interleaved within each round."""
        _, in_features, _, dtype = key
        weights, total = [], 0
        for module in group:
            weights.append((module.weight, module.bias))
            total += module.weight.numel() * module.weight.element_size()
            if total >= PROFILE_BYTES:
                break
        kernels = [kernel for kernel in self.kernels if _available(kernel, dtype)]
        onednn = [_pack("onednn_packed", w, 0) for w, _ in weights] if "onednn_packed" in kernels else []
        generator = torch.Generator().manual_seed(0)
        seconds: dict[Kernel, list[float]] = {kernel: [] for kernel in kernels}
        for rows in range(1, self.max_rows + 1):
            x = torch.randn(rows, in_features, generator=generator).to(dtype)
            packs = {kernel: [None] * len(weights) for kernel in ("linear", "transposed")}
            packs["onednn_packed"] = onednn
            if "mkl_packed" in kernels:
                packs["mkl_packed"] = [_pack("mkl_packed", w, rows) for w, _ in weights]
            runs = {
                kernel: functools.partial(_run_all, kernel, x, weights, packs[kernel]) for kernel in kernels
            }
            samples: dict[Kernel, list[float]] = {kernel: [] for kernel in kernels}
            for repeat in range(self.repeats + 1):  # the first round warms up
                for kernel, run in runs.items():
                    start = time.perf_counter()
                    run()
                    if repeat:
                        samples[kernel].append(time.perf_counter() - start)
            for kernel in kernels:
                seconds[kernel].append(min(samples[kernel]))
        plan = []
        for rows in range(self.max_rows):
            best = min(kernels, key=lambda kernel: seconds[kernel][rows])
            gain = seconds[best][rows] < (1 - MIN_GAIN) * seconds["linear"][rows]
            plan.append(best if gain else "linear")
        return _Profile(tuple(plan), seconds)


def _run_all(
    kernel: Kernel,
    x: torch.Tensor,
    weights: list[tuple[torch.Tensor, torch.Tensor | None]],
    packs: list[torch.Tensor | None],
) -> None:
    for (weight, bias), packed in zip(weights, packs, strict=True):
        _apply(kernel, x, weight, bias, packed)


__all__ = ["Kernel", "KERNELS", "SmallBatchLinears"]
