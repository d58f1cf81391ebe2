"""`check_drafter` / `dspark check` on tiny targets, with negative controls for every fault it names."""

import copy
from collections import Counter

import pytest
import torch
from conftest import make_tiny_drafter, make_tiny_target
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from dspark_hf import DSparkForCausalLM, check_drafter
from dspark_hf.check import MIN_FIRST_POSITION_ACCEPTANCE
from dspark_hf.cli import main
from dspark_hf.training.arguments import DSparkTrainingArguments
from dspark_hf.training.trainer import DSparkTrainer

PROMPT, RESPONSE, BLOCK = 4, 20, 4


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in memory, with one special token that no text or template uses."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = ["the cat sat on the mat", "the dog ate the bone", "what is the answer? the answer is 4"] * 5
    trainer = trainers.BpeTrainer(
        vocab_size=120,
        special_tokens=["<|endoftext|>", "<|reserved|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def make_target(vocab_size: int, seed: int = 0, layers: int = 4) -> PreTrainedModel:
    target = make_tiny_target(vocab_size=vocab_size, num_hidden_layers=layers, seed=seed, lm_head_scale=100,
                              max_position_embeddings=128)  # fmt: skip
    with torch.no_grad():
        for (
            layer
        ) in target.model.layers:  # layers that change the residual stream, so features differ per layer
            layer.self_attn.o_proj.weight.mul_(10)
            layer.mlp.down_proj.weight.mul_(10)
    return target


def prompts(vocab_size: int, count: int, seed: int = 2) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab_size, (count, PROMPT), generator=generator).tolist()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, single_thread):
    """A tokenizer, its target, a drafter trained on the target's greedy answers to the probe prompts."""
    tokenizer = make_tokenizer()
    target = make_target(len(tokenizer))
    probe = prompts(len(tokenizer), 6)
    with torch.no_grad():
        ids = torch.tensor(probe)
        answers = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=RESPONSE, min_new_tokens=RESPONSE)  # fmt: skip
    rows = [{"input_ids": row, "loss_mask": [0] * PROMPT + [1] * RESPONSE} for row in answers.tolist()]
    drafter = make_tiny_drafter(
        target, seed=1, tokenizer=tokenizer, block_size=BLOCK, target_layer_ids=[0, 2]
    )
    assert drafter.config.mask_token_id == tokenizer.convert_tokens_to_ids("<|reserved|>")
    args = DSparkTrainingArguments(
        output_dir=str(tmp_path_factory.mktemp("run")), per_device_train_batch_size=6, max_steps=60,
        learning_rate=1e-2, warmup_steps=0, num_anchors=16, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True, seed=0, logging_steps=100,
    )  # fmt: skip
    DSparkTrainer(
        model=drafter, target_model=target, args=args, train_dataset=Dataset.from_list(rows)
    ).train()
    folder = tmp_path_factory.mktemp("check")
    target.save_pretrained(folder / "target")
    tokenizer.save_pretrained(folder / "target")
    drafter.eval().save_pretrained(folder / "drafter")
    return tokenizer, target, drafter, probe, folder


def test_trained_drafter_passes_and_shifted_layer_ids_lose_acceptance(setup):
    tokenizer, target, drafter, probe, _ = setup
    report = check_drafter(target, drafter, tokenizer, prompts=probe, max_new_tokens=RESPONSE)
    assert report.ok and not report.warnings, report.summary()
    assert report.num_blocks == len(probe) * (RESPONSE - BLOCK + 1) and len(report.acceptance) == BLOCK
    assert report.acceptance[0] > 0.7, report.summary()
    assert any("lm_head equal" in p for p in report.passed) and any(
        "mask_token_id" in p for p in report.passed
    )

    shifted = copy.deepcopy(drafter)
    shifted.config.target_layer_ids = [1, 3]  # the same weights reading the next layers: structurally fine
    shifted_report = check_drafter(target, shifted, tokenizer, prompts=probe, max_new_tokens=RESPONSE)
    assert shifted_report.ok, shifted_report.summary()
    acceptance, shifted_acceptance = torch.tensor(report.acceptance), torch.tensor(shifted_report.acceptance)
    assert shifted_acceptance[0] < acceptance[0] - 0.1, (acceptance, shifted_acceptance)
    assert shifted_acceptance.mean() < acceptance.mean() - 0.15, (acceptance, shifted_acceptance)


def test_foreign_lm_head_is_a_structural_fault(setup, capsys):
    tokenizer, target, drafter, probe, folder = setup
    foreign = copy.deepcopy(drafter)
    foreign.lm_head.weight.data.copy_(make_target(len(tokenizer), seed=5).lm_head.weight)
    report = check_drafter(target, foreign, tokenizer, prompts=probe)
    assert not report.ok and report.acceptance is None
    assert len(report.faults) == 1 and report.faults[0].startswith("lm_head differs from the target's")
    foreign.save_pretrained(folder / "foreign")
    with pytest.raises(SystemExit, match="dspark check: structural fault: lm_head differs"):
        main(["check", str(folder / "target"), str(folder / "foreign")])
    assert "FAULT: lm_head differs" in capsys.readouterr().out


def test_frequent_text_token_as_mask_is_a_structural_fault(setup):
    tokenizer, target, drafter, probe, folder = setup
    masked = copy.deepcopy(drafter)
    frequent = Counter(tokenizer("the cat sat on the mat, the dog ate the bone")["input_ids"]).most_common(1)
    masked.config.mask_token_id = frequent[0][0]
    report = check_drafter(target, masked, tokenizer, prompts=probe)
    token = tokenizer.convert_ids_to_tokens(frequent[0][0])
    assert len(report.faults) == 1 and f"is the ordinary text token {token!r}" in report.faults[0]
    masked.save_pretrained(folder / "masked")
    with pytest.raises(SystemExit, match="structural fault: mask_token_id .* ordinary text token"):
        main(["check", str(folder / "target"), str(folder / "masked")])
    eos = copy.deepcopy(drafter)
    eos.config.mask_token_id = tokenizer.eos_token_id
    assert (
        "tokenizer or chat template emits" in check_drafter(target, eos, tokenizer, prompts=probe).faults[0]
    )
    # Without a tokenizer, a mask id the target itself produces is caught on the probe.
    emitted = copy.deepcopy(drafter)
    emitted.config.mask_token_id = int(target.generate(torch.tensor(probe[:1]), do_sample=False)[0, -1])
    assert "occurs" in check_drafter(target, emitted, prompts=probe).faults[0]


def test_untrained_drafter_warns_but_passes(setup, capsys):
    tokenizer, target, _, probe, folder = setup
    untrained = make_tiny_drafter(
        target, seed=3, tokenizer=tokenizer, block_size=BLOCK, target_layer_ids=[0, 2]
    )
    with torch.no_grad():
        untrained.fc.weight.mul_(0)  # reads nothing of the context: drafts one token whatever the prefix
    report = check_drafter(target, untrained, tokenizer, prompts=probe)
    assert report.ok and report.acceptance[0] < MIN_FIRST_POSITION_ACCEPTANCE, report.summary()
    assert any("first-position acceptance" in w for w in report.warnings)
    untrained.save_pretrained(folder / "untrained")
    main(["check", str(folder / "target"), str(folder / "untrained"), "--max-new-tokens", "8"])  # exit 0
    assert "warning: probe: first-position acceptance" in capsys.readouterr().out


def test_sizes_and_layer_ids_outside_the_target_are_structural_faults(setup):
    tokenizer, target, drafter, probe, _ = setup
    deeper = make_target(len(tokenizer), layers=6)
    report = check_drafter(target, DSparkForCausalLM.from_target(deeper, target_layer_ids=[1, 5]), tokenizer)
    assert any("target_layer_ids [1, 5] are outside the target's layers [-1, 3]" in f for f in report.faults)
    report = check_drafter(deeper, drafter, tokenizer)
    assert any("built for a target with 4 layers, this one has 6" in f for f in report.faults)
    other = make_target(len(tokenizer) + 8)
    report = check_drafter(other, drafter, tokenizer)
    assert report.faults[0] == f"vocab_size: drafter {len(tokenizer)}, target {len(tokenizer) + 8}."
