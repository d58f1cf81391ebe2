"""`SmallBatchLinears`: the same products by other kernels, only inside its `with` block."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import make_tiny_drafter, make_tiny_target
from torch import nn

from dspark_hf.generation import small_batch_linear
from dspark_hf.generation.small_batch_linear import KERNELS, SmallBatchLinears, _apply, _available, _pack
from dspark_hf.reference.benchmarking import ForwardLog

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPES = [torch.float32, torch.bfloat16]
# bfloat16 products of 64 terms agree to a few units of the last place of an output of size ~8.
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=0.1, rtol=0.02)}


def every_kernel_plan(monkeypatch) -> None:
    """Make every profile choose the kernels in turn over the row counts (each available kernel is used)."""

    def profile(self, key, group):
        kernels = [k for k in self.kernels if _available(k, key[3])]
        plan = tuple(itertools.islice(itertools.cycle(kernels), self.max_rows))
        return small_batch_linear._Profile(plan, {k: [1.0] * self.max_rows for k in kernels})

    monkeypatch.setattr(SmallBatchLinears, "_profile", profile)
    monkeypatch.setattr(small_batch_linear, "_PROFILES", {})


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_computes_the_linear_product(kernel, dtype, bias):
    if not _available(kernel, dtype):
        pytest.skip(f"{kernel} does not run {dtype} on this build or CPU")
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=generator).to(dtype)
    bias_vector = torch.randn(48, generator=generator).to(dtype) if bias else None
    for rows in range(1, 9):
        x = torch.randn(rows, 64, generator=generator).to(dtype)
        out = _apply(kernel, x, weight, bias_vector, _pack(kernel, weight, rows))
        expected = torch.nn.functional.linear(
            x.double(), weight.double(), None if not bias else bias_vector.double()
        )
        assert out.shape == (rows, 48) and out.dtype == dtype
        torch.testing.assert_close(out.double(), expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_routes_small_inputs_and_restores_the_model_exactly(monkeypatch, dtype):
    every_kernel_plan(monkeypatch)
    target = make_tiny_target(hidden_size=64).to(dtype)
    linears = [m for m in target.modules() if isinstance(m, nn.Linear)]
    parameters = {name: (p, p.detach().clone()) for name, p in target.named_parameters()}
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = [target(ids[:, :rows]).logits for rows in (1, 3, 8, 12)]
        with SmallBatchLinears(target) as fast:
            assert all("forward" in m.__dict__ for m in linears)
            inside = [target(ids[:, :rows]).logits for rows in (1, 3, 8, 12)]
        after = [target(ids[:, :rows]).logits for rows in (1, 3, 8, 12)]
    assert all("forward" not in m.__dict__ for m in linears)
    for name, parameter in target.named_parameters():
        original, copy = parameters[name]
        assert parameter is original and torch.equal(parameter, copy)
    for stock, routed, restored in zip(before, inside, after, strict=True):
        assert torch.equal(stock, restored)
        torch.testing.assert_close(routed.float(), stock.float(), **TOLERANCE[dtype])
    used = {kernel for plan in fast.report().values() for kernel in plan["plan"]}
    assert used == {k for k in KERNELS if _available(k, dtype)}


def test_autograd_and_large_inputs_take_the_stock_path(monkeypatch):
    every_kernel_plan(monkeypatch)
    layer = nn.Sequential(nn.Linear(16, 8))
    x = torch.randn(3, 16, requires_grad=True)
    with SmallBatchLinears(layer, max_rows=4):
        layer(x).sum().backward()  # the packed kernels have no backward; the stock path must be taken
        with torch.no_grad():
            large = layer(torch.randn(5, 16))
    assert x.grad is not None and large.shape == (5, 8)


def test_a_weight_changed_in_place_is_packed_anew(monkeypatch):
    every_kernel_plan(monkeypatch)
    layer = nn.Sequential(nn.Linear(32, 24, bias=False))
    fast = SmallBatchLinears(layer)
    x = torch.randn(2, 32)  # row count 2: the second kernel of the cycle, a packed one
    with torch.no_grad():
        with fast:
            first = layer(x)
        layer[0].weight.mul_(2.0)
        with fast:
            second = layer(x)
    torch.testing.assert_close(second, 2.0 * first)


def test_profile_picks_the_stock_kernel_unless_another_clearly_wins():
    layer = nn.Sequential(nn.Linear(32, 24, bias=False))
    with SmallBatchLinears(layer, max_rows=3, repeats=2) as fast:
        (report,) = fast.report().values()
    for rows, kernel in enumerate(report["plan"]):
        milliseconds = report["milliseconds"]
        best = min(ms[rows] for ms in milliseconds.values())
        assert milliseconds[kernel][rows] == best or kernel == "linear"
        if kernel != "linear":
            assert best < (1 - small_batch_linear.MIN_GAIN) * milliseconds["linear"][rows]


def test_options_are_validated():
    layer = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="Unknown kernels"):
        SmallBatchLinears(layer, kernels=["blas"])
    with pytest.raises(ValueError, match="max_rows"):
        SmallBatchLinears(layer, max_rows=0)
    fast = SmallBatchLinears(layer)
    with fast, pytest.raises(RuntimeError, match="already active"):
        fast.__enter__()


def test_greedy_assisted_generation_is_identical_to_plain_decoding_under_the_runtime(monkeypatch):
    every_kernel_plan(monkeypatch)
    target = make_tiny_target(vocab_size=64, hidden_size=64, lm_head_scale=8.0, max_position_embeddings=256)
    drafter = make_tiny_drafter(target, seed=1, block_size=5).eval().attach_target(target)
    generator = torch.Generator().manual_seed(0)
    verified_rows = set()
    with SmallBatchLinears(target):
        for length in (1, 9, 23):
            ids = torch.randint(0, 64, (1, length), generator=generator)
            plain = target.generate(ids, do_sample=False, max_new_tokens=40)
            with ForwardLog(target) as forwards:
                assisted = target.generate(ids, assistant_model=drafter, do_sample=False, max_new_tokens=40)
            assert torch.equal(assisted, plain), f"prompt of length {length} diverged"
            verified_rows.update(tokens for _, tokens in forwards.calls[1:])
    assert max(verified_rows) > 1  # verification forwards over several tokens did run
