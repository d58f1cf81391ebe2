"""Assisted generation with a DSpark drafter: `target.generate(ids, assistant_model=drafter)`.

By default a tiny random Llama target and a freshly initialised drafter are built, so the script runs anywhere
in seconds; an untrained drafter is rarely accepted, so expect tau close to 1. Pass `--target` and `--drafter`
(local folders) to run a real pair. Either way the script checks that greedy assisted decoding reproduces the
target's own greedy output token for token and prints the drafting statistics::

    python examples/generate.py
    python examples/generate.py --do-sample --confidence-threshold 0.3
    python examples/generate.py --target path/to/target --drafter path/to/drafter --prompt "What is 7 * 6?"
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from dspark_hf import DSparkForCausalLM


def tiny_random_pair(seed: int) -> tuple[LlamaForCausalLM, DSparkForCausalLM]:
    torch.manual_seed(seed)
    target = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    return target, DSparkForCausalLM.from_target(target, num_hidden_layers=2, markov_rank=16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="Local folder of the target causal LM (default: tiny random Llama).")
    parser.add_argument("--drafter", help="Local folder of a DSpark drafter trained for --target.")
    parser.add_argument("--prompt", default="Write a haiku about speculative decoding.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--do-sample", action="store_true", help="Sample (temperature 1) instead of greedy.")
    parser.add_argument("--confidence-threshold", type=float, default=0.0, help="0 keeps full blocks.")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest for tiny models)."
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if (args.target is None) != (args.drafter is None):
        parser.error("--target and --drafter go together.")
    torch.set_num_threads(args.threads)

    if args.target is None:
        target, drafter = tiny_random_pair(args.seed)
        input_ids = torch.randint(0, target.config.vocab_size, (1, 16))
        decode = None
    else:
        target = AutoModelForCausalLM.from_pretrained(args.target)
        drafter = DSparkForCausalLM.from_pretrained(args.drafter)
        tokenizer = AutoTokenizer.from_pretrained(args.target)
        messages = [{"role": "user", "content": args.prompt}]
        input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        input_ids = input_ids if isinstance(input_ids, torch.Tensor) else input_ids["input_ids"]
        decode = tokenizer.decode
    target.eval()
    drafter.eval().attach_target(target)
    drafter.generation_config.confidence_threshold = args.confidence_threshold

    options = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    plain = target.generate(input_ids, **options)
    plain_time = time.perf_counter() - start
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    assisted = target.generate(input_ids, assistant_model=drafter, **options)
    assisted_time = time.perf_counter() - start

    stats = drafter.last_stats
    new_tokens = assisted.shape[1] - input_ids.shape[1]
    print(f"target alone:   {plain_time:.2f} s for {plain.shape[1] - input_ids.shape[1]} tokens")
    print(
        f"with drafter:   {assisted_time:.2f} s for {new_tokens} tokens "
        f"(drafting {stats.draft_time_s:.2f} s, the rest {stats.other_time_s:.2f} s)"
    )
    print(f"rounds {stats.rounds}, tau {stats.tau:.2f} tokens per target forward")
    print("conditional acceptance per block position:", [round(c, 2) for c in stats.conditional_acceptance])
    if not args.do_sample:
        print("greedy output identical to the target's:", torch.equal(plain, assisted))
    if decode is not None:
        print(decode(assisted[0, input_ids.shape[1] :], skip_special_tokens=True))


if __name__ == "__main__":
    main()
