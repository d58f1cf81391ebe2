"""What verifying k tokens costs: T(k) / T(1) of the reference target's forward with its KV cache, stock
`nn.Linear` against `dspark_hf.generation.small_batch_linear.SmallBatchLinears`, float32 and bfloat16, side
by side.

A decoding step is memory-bound: the weights are read once for any small k, so at the limit T(8) ~ T(1).
Per dtype and thread count, the cache is prefilled once with `--context-length` random tokens; every timed
forward over k new tokens starts from that length (the cache is cropped back), with k and the two runtimes
interleaved within each repeat so that load drifts hit all alike. Medians over `--repeats`.

With `--identity-prompts N`, it also checks, on N prompts per dataset (float32, first thread count), that
greedy assisted generation inside `SmallBatchLinears` (DSpark with `--drafter`, or a freshly initialised
drafter, and prompt lookup, both verifying up to 8 tokens per forward) is token-identical to plain decoding
inside it, and how plain decoding inside it compares with stock plain decoding.

    python benchmarks/verify_cost.py --threads 1 2 --identity-prompts 3 --name verify_cost
    python benchmarks/verify_cost.py --threads 1 --repeats 3 --output-dir /tmp/vc   # quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache

from dspark_hf.generation.small_batch_linear import SmallBatchLinears
from dspark_hf.generation.target_tap import cache_keyword
from dspark_hf.modeling_dspark import DSparkForCausalLM
from dspark_hf.reference.benchmarking import ForwardLog, encode_chat_prompt, json_safe
from dspark_hf.reference.target import load_reference_target
from dspark_hf.training.data import load_prompts

TOKEN_COUNTS = (1, 2, 4, 8)
RUNTIMES = ("stock", "small_batch_linears")
DATASETS = ("gsm8k", "mt-bench", "humaneval")


def cpu_info() -> dict:
    """The CPU model and the instruction-set flags that decide which matmul kernels are fast."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = fields.get("flags", "").split()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
    return {
        "cpu": fields.get("model name", platform.processor() or platform.machine()),
        "cpu_count": os.cpu_count(),
        "flags": [flag for flag in wanted if flag in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


@torch.inference_mode()
def measure(dtype: torch.dtype, threads: int, context_length: int, repeats: int, seed: int) -> dict:
    torch.set_num_threads(threads)
    target, _ = load_reference_target(dtype=dtype)
    fast = SmallBatchLinears(target, max_rows=max(TOKEN_COUNTS))
    start = time.perf_counter()
    with fast:
        pass
    setup_seconds = time.perf_counter() - start

    generator = torch.Generator().manual_seed(seed)
    vocab_size = target.config.vocab_size
    context = torch.randint(vocab_size, (1, context_length), generator=generator)
    new_tokens = torch.randint(vocab_size, (1, max(TOKEN_COUNTS)), generator=generator)
    cache_kwarg = cache_keyword(target)
    cache = DynamicCache(config=target.config)
    target(context, use_cache=True, **{cache_kwarg: cache})
    samples = {runtime: {k: [] for k in TOKEN_COUNTS} for runtime in RUNTIMES}
    for repeat in range(repeats + 1):  # the first round warms up
        order = RUNTIMES if repeat % 2 else RUNTIMES[::-1]
        for runtime in order:
            if runtime == "small_batch_linears":
                fast.__enter__()
            try:
                for k in TOKEN_COUNTS:
                    begin = time.perf_counter()
                    target(new_tokens[:, :k], use_cache=True, **{cache_kwarg: cache})
                    elapsed = time.perf_counter() - begin
                    cache.crop(-k)
                    if repeat:
                        samples[runtime][k].append(elapsed)
            finally:
                if runtime == "small_batch_linears":
                    fast.__exit__(None, None, None)
    result = {"threads": threads, "dtype": str(dtype).removeprefix("torch."), "setup_seconds": setup_seconds}
    for runtime in RUNTIMES:
        ms = {k: 1000 * statistics.median(samples[runtime][k]) for k in TOKEN_COUNTS}
        result[runtime] = {
            "T_ms": {str(k): ms[k] for k in TOKEN_COUNTS},
            "T_over_T1": {str(k): ms[k] / ms[1] for k in TOKEN_COUNTS},
        }
    result["kernels"] = fast.report()
    return result


@torch.inference_mode()
def greedy_identity(prompts_per_set: int, max_new_tokens: int, drafter_path: str | None, seed: int) -> dict:
    """Greedy outputs of plain decoding, DSpark and prompt lookup inside `SmallBatchLinears` (float32), each
    compared token by token with plain decoding inside it; plain inside it also against stock plain."""
    target, tokenizer = load_reference_target()
    if drafter_path is None:
        torch.manual_seed(seed)
        drafter = DSparkForCausalLM.from_target(target, num_hidden_layers=1, tokenizer=tokenizer).eval()
    else:
        drafter = DSparkForCausalLM.from_pretrained(drafter_path, dtype=torch.float32).eval()
    drafter.attach_target(target)
    generate = dict(do_sample=False, max_new_tokens=max_new_tokens)
    assisted = {"dspark": dict(assistant_model=drafter), "prompt_lookup": dict(prompt_lookup_num_tokens=7)}
    fast = SmallBatchLinears(target, max_rows=max(TOKEN_COUNTS))
    rows = []
    for dataset in DATASETS:
        for index, prompt in enumerate(load_prompts(dataset, "eval", prompts_per_set)):
            ids = encode_chat_prompt(tokenizer, prompt)
            mask = torch.ones_like(ids)
            stock = target.generate(ids, attention_mask=mask, **generate)
            row = {"dataset": dataset, "prompt_index": index}
            with fast:
                plain = target.generate(ids, attention_mask=mask, **generate)
                row["plain_equals_stock_plain"] = torch.equal(plain, stock)
                for method, options in assisted.items():
                    with ForwardLog(target) as forwards:
                        out = target.generate(ids, attention_mask=mask, **generate, **options)
                    row[f"{method}_identical"] = torch.equal(out, plain)
                    row[f"{method}_max_verified_tokens"] = max(tokens for _, tokens in forwards.calls[1:])
            rows.append(row)
            print(json.dumps(row))
    drafter.detach_target()
    summary = {
        key: sum(row[key] for row in rows)
        for key in ("plain_equals_stock_plain", "dspark_identical", "prompt_lookup_identical")
    }
    return {
        "prompts": len(rows),
        "max_new_tokens": max_new_tokens,
        "drafter": drafter_path or "freshly initialised (1 layer)",
        "identical_counts": summary,
        "per_prompt": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--context-length", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--identity-prompts", type=int, default=0, help="prompts per dataset (0: skip)")
    parser.add_argument("--identity-tokens", type=int, default=96)
    parser.add_argument("--drafter", help="DSpark drafter folder for the identity check")
    parser.add_argument("--name", default="verify_cost")
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    report = {
        "machine": {
            **cpu_info(),
            "load_average_at_start": list(os.getloadavg()),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
        "settings": vars(args),
        "runs": [],
    }
    for threads in args.threads:
        for dtype in args.dtypes:
            run = measure(getattr(torch, dtype), threads, args.context_length, args.repeats, args.seed)
            report["runs"].append(run)
            for runtime in RUNTIMES:
                times = run[runtime]["T_ms"]
                ratio = run[runtime]["T_over_T1"]["8"]
                cells = "  ".join(f"T({k}) {times[str(k)]:6.1f}" for k in TOKEN_COUNTS)
                print(f"{threads} thread(s) {dtype:8s} {runtime:19s} {cells} ms   T(8)/T(1) {ratio:.2f}")
    if args.identity_prompts:
        torch.set_num_threads(args.threads[0])
        report["greedy_identity"] = greedy_identity(
            args.identity_prompts, args.identity_tokens, args.drafter, args.seed
        )
        print("identical outputs:", report["greedy_identity"]["identical_counts"])
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    path = Path(args.output_dir) / f"{args.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(report), indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
