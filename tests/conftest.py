"""Shared fixtures and the factories of tiny targets and drafters that the test files build on."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from dspark_hf import DSparkForCausalLM

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a test assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TARGET_CLASSES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}


ROOT = Path(__file__).resolve().parents[1]


def load_script(relative_path: str) -> ModuleType:
    """A script of the repository (benchmarks/, examples/: not packages) imported as a module, registered
    under its file name, where its dataclasses look their module up."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models are dominated by thread hand-off on a shared machine; one thread is ~30x faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tiny_target(
    kind: str = "llama",
    vocab_size: int = 64,
    hidden_size: int = 32,
    num_hidden_layers: int = 4,
    *,
    seed: int | None = 0,
    lm_head_scale: float | None = None,
    **config,
) -> PreTrainedModel:
    """A random tiny Llama or Qwen3 target in eval mode, seeded with `seed` (None: the current RNG state).

    4 query and 2 key/value heads, an MLP twice as wide as the model; `config` adds or overrides config
    fields. `lm_head_scale` multiplies the LM head, for peaked next-token distributions like a trained LM's.
    """
    config_class, model_class = TARGET_CLASSES[kind]
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    if kind == "qwen3":
        fields["head_dim"] = hidden_size // 4
    if seed is not None:
        torch.manual_seed(seed)
    target = model_class(config_class(**{**fields, **config})).eval()
    if lm_head_scale is not None:
        with torch.no_grad():
            target.lm_head.weight.mul_(lm_head_scale)
    return target


def make_tiny_drafter(target: PreTrainedModel, *, seed: int | None = None, **overrides) -> DSparkForCausalLM:
    """A fresh one-layer drafter for `target` with a rank-8 Markov head; `overrides` go to `from_target`
    (config fields, `tokenizer`). `seed` seeds its initialisation (None: the current RNG state)."""
    if seed is not None:
        torch.manual_seed(seed)
    return DSparkForCausalLM.from_target(target, **{"num_hidden_layers": 1, "markov_rank": 8, **overrides})


def make_chat_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer (about 300 tokens) with a ChatML template, trained in memory."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["hello there, how are you?", "I am fine. What is 2 + 2?", "The answer is 4.\nBye!"] * 5
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )
