"""DSparkTrainer on a tiny random target (CPU). Run as a script, this file is the DDP worker of
the tests launched with torchrun (`python test_trainer.py ddp|budget OUTPUT_DIR RESULT`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script, make_tiny_drafter, make_tiny_target
from datasets import Dataset
from transformers import TrainingArguments

from dspark_hf import DSparkForCausalLM
from dspark_hf.generation.target_tap import LayerFeatures
from dspark_hf.training.arguments import DSparkTrainingArguments
from dspark_hf.training.target_cache import row_key
from dspark_hf.training.trainer import (
    DSparkDataCollator,
    DSparkTrainer,
    anchor_seeds,
    build_blocks,
    check_fsdp_plugin,
    place_target,
    sample_anchors,
)

VOCAB, PROMPT, RESPONSE, BLOCK = 48, 4, 20, 4


def make_target(seed=0, vocab_size=VOCAB, hidden_size=32):
    return make_tiny_target(vocab_size=vocab_size, hidden_size=hidden_size, seed=seed, lm_head_scale=100,
                            intermediate_size=64, max_position_embeddings=128)  # fmt: skip


def make_drafter(target, seed=1, **overrides):
    return make_tiny_drafter(
        target, seed=seed, **{"block_size": BLOCK, "target_layer_ids": [0, 2], **overrides}
    )


@torch.no_grad()
def make_rows(target, num_rows, seed=2):
    """The target's own greedy answers to random prompts, the loss mask on the answer."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (num_rows, PROMPT), generator=generator)
    for _ in range(RESPONSE):
        ids = torch.cat([ids, target(ids).logits[:, -1:].argmax(-1)], dim=1)
    mask = [0] * PROMPT + [1] * RESPONSE
    # Uneven lengths exercise padding.
    return [
        {"input_ids": row[: len(row) - i % 3], "loss_mask": mask[: len(row) - i % 3]}
        for i, row in enumerate(ids.tolist())
    ]


def make_args(output_dir, **overrides):
    defaults = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "max_steps": 3,
        "learning_rate": 1e-2,
        "warmup_steps": 0,
        "logging_steps": 1,
        "num_anchors": 8,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    defaults.update(overrides)
    return DSparkTrainingArguments(**defaults)


def train_losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ---- blocks ------------------------------------------------------------------------------------------------


def test_anchor_sampling_follows_deepspec_rules():
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1, 1, 1], [0, 1, 0, 1, 0, 1, 1, 0, 0, 0]]).bool()
    anchors, keep = sample_anchors(loss_mask, num_anchors=3, seeds=[0, 1])
    assert anchors.shape == keep.shape == (2, 3)
    # Row 0 has candidates {2, 3, 6, 7, 8}: 3 distinct sorted ones are drawn. Row 1 has only {5}.
    assert keep[0].all() and anchors[0].tolist() == sorted(set(anchors[0].tolist()))
    assert set(anchors[0].tolist()) <= {2, 3, 6, 7, 8}
    assert keep[1].tolist() == [True, False, False] and anchors[1].tolist() == [5, 0, 0]
    # All candidates are taken when there are fewer than num_anchors; seeds make draws reproducible.
    assert sample_anchors(loss_mask, 99, [0, 1])[0][0].tolist() == [2, 3, 6, 7, 8]
    assert torch.equal(sample_anchors(loss_mask, 3, [0, 1])[0], anchors)
    draws = {tuple(sample_anchors(loss_mask, 3, [s, 1])[0][0].tolist()) for s in range(20)}
    assert len(draws) > 3


def test_anchor_seeds_ignore_padding_and_position_in_batch():
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    seeds = anchor_seeds(ids, mask, seed=0, step=3)
    assert anchor_seeds(ids[:1, :3], mask[:1, :3], seed=0, step=3) == seeds[:1]
    assert anchor_seeds(ids.flip(0), mask.flip(0), seed=0, step=3) == seeds[::-1]
    assert anchor_seeds(ids, mask, seed=0, step=4) != seeds


def test_build_blocks_layout():
    input_ids = torch.arange(100, 110)[None]
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1, 1, 1]]).bool()
    anchors, keep = torch.tensor([[3, 6, 0]]), torch.tensor([[True, True, False]])
    blocks = build_blocks(input_ids, loss_mask, anchors, keep, block_size=3, mask_token_id=1)
    assert blocks.input_ids.tolist() == [[103, 1, 1, 106, 1, 1, 1, 1, 1]]
    assert blocks.position_ids[0, 10:].tolist() == [3, 4, 5, 6, 7, 8, 0, 1, 2]
    assert blocks.position_ids[0, :10].tolist() == list(range(10))
    assert blocks.labels[0, :2].tolist() == [[104, 105, 106], [107, 108, 109]]
    # Anchor 3: label 105 (pos 5) is outside the response and cuts the block; padding anchors learn nothing.
    assert blocks.label_mask[0].tolist() == [[True, False, False], [True, True, True], [False, False, False]]
    assert blocks.prev_token_ids[0, :6].tolist() == [103, 104, 105, 106, 107, 108]
    mask = blocks.attention_mask[0, 0]
    assert mask.shape == (9, 19)
    for query, (anchor, block) in enumerate([(3, 0)] * 3 + [(6, 1)] * 3 + [(0, 2)] * 3):
        expected = [k < anchor for k in range(10)] + [k // 3 == block for k in range(9)]
        assert mask[query].tolist() == expected


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn"])
def test_packed_forward_equals_blocks_drafted_one_by_one(head):
    target = make_target()
    drafter = make_drafter(target, markov_head_type=head).eval()
    rows = make_rows(target, 2)
    batch = DSparkDataCollator(pad_token_id=0)(rows)
    anchors, keep = sample_anchors(batch["loss_mask"], 5, seeds=[3, 4])
    blocks = build_blocks(
        batch["input_ids"], batch["loss_mask"], anchors, keep, BLOCK, drafter.config.mask_token_id
    )
    with torch.no_grad():
        hidden = target(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        features = torch.cat([hidden.hidden_states[i + 1] for i in drafter.config.target_layer_ids], dim=-1)
        packed = drafter(
            blocks.input_ids, features, blocks.position_ids, blocks.prev_token_ids, blocks.attention_mask
        )
        assert torch.isfinite(packed.logits).all()
        for row in range(2):
            for j, anchor in enumerate(anchors[row].tolist()):
                if not keep[row, j]:
                    continue
                span = slice(j * BLOCK, (j + 1) * BLOCK)
                single = drafter(
                    blocks.input_ids[row : row + 1, span],
                    features[row : row + 1, :anchor],
                    torch.arange(anchor + BLOCK)[None],
                    blocks.prev_token_ids[row : row + 1, span],
                )
                torch.testing.assert_close(packed.logits[row, span], single.logits[0], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(packed.confidence_logits[row, span], single.confidence_logits[0])


def test_target_features_are_decoder_layer_outputs(tmp_path):
    """Feature i = output of decoder layer i (the last layer's before the final norm, as generation captures
    it), -1 = embeddings; plus the final-norm last hidden state."""
    target = make_target()
    drafter = make_tiny_drafter(target, target_layer_ids=[-1, 1, 3])
    rows = make_rows(target, 2)
    trainer = DSparkTrainer(model=drafter, target_model=target, args=make_args(tmp_path), train_dataset=rows)
    batch = DSparkDataCollator(pad_token_id=0)(rows)
    features, last = trainer._target_states(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        tied = target(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        target.config.tie_last_hidden_states = False
        raw = target(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    expected = torch.cat([raw.hidden_states[0], raw.hidden_states[2], raw.hidden_states[4]], dim=-1)
    torch.testing.assert_close(features, expected)
    torch.testing.assert_close(last, tied.hidden_states[-1])
    assert not torch.allclose(raw.hidden_states[4], tied.hidden_states[4])


def test_features_of_a_split_target_arrive_on_one_device():
    """Layers of a target split over devices yield their outputs on different devices: every captured
    feature goes to the requested one (the drafter's), here "meta", before they are concatenated."""
    target = make_target()
    with LayerFeatures(target, [-1, 1, 3], device="meta") as capture, torch.no_grad():
        target(torch.randint(0, VOCAB, (2, 5)))
    assert [f.device.type for f in capture.features] == ["meta"] * 3
    assert capture.concatenated().shape == (2, 5, 3 * 32)


def test_collator_pads_right_and_checks_lengths():
    batch = DSparkDataCollator(pad_token_id=7, pad_to_multiple_of=4)(
        [
            {"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1], "text": "ignored"},
            {"input_ids": [4], "loss_mask": [1]},
        ]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7], [4, 7, 7, 7]]
    assert batch["loss_mask"].tolist() == [[False, True, True, False], [True, False, False, False]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    with pytest.raises(ValueError, match="loss_mask"):
        DSparkDataCollator(pad_token_id=0)([{"input_ids": [1, 2], "loss_mask": [1]}])


# ---- training ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """40 steps on 4 sequences, logging every step; parameters before and after."""
    target = make_target()
    drafter = make_drafter(target)
    dataset = Dataset.from_list(make_rows(target, 4))
    before = {"target": snapshot(target), "drafter": snapshot(drafter)}
    trainer = DSparkTrainer(
        model=drafter,
        target_model=target,
        args=make_args(tmp_path_factory.mktemp("overfit"), max_steps=40),
        train_dataset=dataset,
        eval_dataset=dataset,
    )
    trainer.train()
    return trainer, target, before


def test_loss_falls(overfit):
    trainer, _, _ = overfit
    losses = train_losses(trainer)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_only_drafter_parameters_change(overfit):
    trainer, target, before = overfit
    for name, p in target.named_parameters():
        assert torch.equal(p, before["target"][name]), name
        assert not p.requires_grad
    drafter = trainer.model
    changed = {name for name, p in drafter.named_parameters() if not torch.equal(p, before["drafter"][name])}
    assert not any(name.startswith(("embed_tokens", "lm_head")) for name in changed)
    trainable = {name for name, p in drafter.named_parameters() if p.requires_grad}
    assert changed == trainable
    assert {"fc.weight", "markov_head.markov_w1.weight", "confidence_head.proj.weight"} <= changed


def test_overfitting_raises_expected_tau(overfit):
    trainer, _, _ = overfit
    taus = [entry["expected_tau"] for entry in trainer.state.log_history if "expected_tau" in entry]
    acceptance = [entry["acceptance_1"] for entry in trainer.state.log_history if "acceptance_1" in entry]
    assert 1.0 <= taus[0] <= 1 + BLOCK
    assert sum(taus[-5:]) / 5 > sum(taus[:5]) / 5 + 0.5
    assert acceptance[-1] > acceptance[0]


def test_evaluate_reports_metrics_and_is_repeatable(overfit):
    trainer, _, _ = overfit
    first, second = trainer.evaluate(), trainer.evaluate()
    for key in ("eval_loss", "eval_ce_loss", "eval_l1_loss", "eval_confidence_loss", "eval_expected_tau"):
        assert key in first
    assert [f"eval_acceptance_{k}" in first for k in range(1, BLOCK + 1)] == [True] * BLOCK
    assert (
        first["eval_loss"] == second["eval_loss"]
        and first["eval_expected_tau"] == second["eval_expected_tau"]
    )
    # The last training step's logged loss is close to the loss of the final model on the same data.
    assert first["eval_loss"] == pytest.approx(train_losses(trainer)[-1], rel=0.3)


def test_save_writes_drafter_and_card(overfit, tmp_path):
    from dspark_hf.hub.model_card import read_card_metadata

    trainer, _, _ = overfit
    trainer.save_model(str(tmp_path))
    reloaded = DSparkForCausalLM.from_pretrained(tmp_path)
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, reloaded.get_parameter(name)), name
    training = read_card_metadata(tmp_path)["training_info"]
    assert training["steps"] == 40 and training["num_anchors"] == 8
    assert "expected_tau" in training["final_metrics"]
    assert set(trainer.model.model_tags) >= {"dspark", "speculative-decoding"}


def test_gradient_accumulation_and_checkpointing_match_one_large_batch(tmp_path):
    """Batch 4 == batch 2 x 2 accumulation steps == with activation checkpointing: same losses, weights."""
    target = make_target()
    dataset = Dataset.from_list(make_rows(target, 4))
    runs = []
    for name, overrides in {
        "big": {},
        "accumulated": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
        "checkpointed": {"activation_checkpointing": True},
    }.items():
        trainer = DSparkTrainer(
            model=make_drafter(target),
            target_model=target,
            args=make_args(tmp_path / name, **overrides),
            train_dataset=dataset,
        )
        trainer.train()
        runs.append((train_losses(trainer), snapshot(trainer.model)))
    (losses, params), others = runs[0], runs[1:]
    for other_losses, other_params in others:
        assert other_losses == pytest.approx(losses, rel=1e-4)
        for name in params:
            torch.testing.assert_close(other_params[name], params[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target_dtype", [torch.float32, torch.bfloat16])
def test_bf16_mixed_precision_trains(tmp_path, target_dtype):
    target = make_target().to(target_dtype)
    trainer = DSparkTrainer(
        model=make_drafter(target),
        target_model=target,
        args=make_args(tmp_path, bf16=True, max_steps=2),
        train_dataset=Dataset.from_list(make_rows(target, 4)),
    )
    trainer.train()
    losses = train_losses(trainer)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_resume_from_checkpoint_continues_the_same_run(tmp_path):
    target = make_target()
    dataset = Dataset.from_list(make_rows(target, 8))
    args = {"max_steps": 6, "save_strategy": "steps", "save_steps": 3, "per_device_train_batch_size": 2}
    full = DSparkTrainer(
        model=make_drafter(target),
        target_model=target,
        args=make_args(tmp_path / "full", **args),
        train_dataset=dataset,
    )
    full.train()
    resumed = DSparkTrainer(
        model=make_drafter(target, seed=5),
        target_model=target,
        args=make_args(tmp_path / "resumed", **args),
        train_dataset=dataset,
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    # The resumed state carries the first 3 logs of the checkpoint.
    assert train_losses(resumed) == pytest.approx(train_losses(full), rel=1e-5)
    for name, p in full.model.named_parameters():
        torch.testing.assert_close(resumed.model.get_parameter(name), p)


def test_lora_trains_saves_a_small_adapter_and_merges(tmp_path):
    from peft import LoraConfig, PeftModel

    target = make_target()
    drafter = make_drafter(target)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type=None
    )
    trainer = DSparkTrainer(
        model=drafter,
        target_model=target,
        args=make_args(tmp_path / "run", max_steps=4),
        train_dataset=Dataset.from_list(make_rows(target, 4)),
        peft_config=lora,
    )
    trainer.train()
    adapted = trainer.model.eval()
    trainable = {name for name, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)

    trainer.save_model(str(tmp_path / "adapter"))
    adapter_file = tmp_path / "adapter" / "adapter_model.safetensors"
    full_bytes = sum(p.numel() * p.element_size() for p in adapted.parameters())
    assert adapter_file.stat().st_size < 0.1 * full_bytes

    inputs = {
        "input_ids": torch.randint(0, VOCAB, (1, BLOCK)),
        "target_hidden_states": torch.randn(1, 6, 2 * 32),
        "position_ids": torch.arange(6 + BLOCK)[None],
        "prev_token_ids": torch.randint(0, VOCAB, (1, BLOCK)),
    }
    base = make_drafter(target).eval()  # the same initial weights
    with torch.no_grad():
        expected = adapted(**inputs).logits
        assert not torch.allclose(base(**inputs).logits, expected, atol=1e-3)
        reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        torch.testing.assert_close(reloaded(**inputs).logits, expected)
        merged = reloaded.merge_and_unload()
        assert isinstance(merged, DSparkForCausalLM)
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-4, atol=1e-4)


def _train_a_few_steps(drafter, target, output_dir, **overrides):
    trainer = DSparkTrainer(
        model=drafter,
        target_model=target,
        args=make_args(output_dir, **overrides),
        train_dataset=Dataset.from_list(make_rows(target, 4)),
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("how", ["from_pretrained", "AutoModel", "from_pretrained+lora"])
def test_target_copies_stay_frozen_after_loading(tmp_path, how):
    from peft import LoraConfig
    from transformers import AutoModel

    target = make_target()
    make_drafter(target).save_pretrained(tmp_path / "saved")
    loader = AutoModel if how == "AutoModel" else DSparkForCausalLM
    drafter = loader.from_pretrained(tmp_path / "saved")
    assert not drafter.embed_tokens.weight.requires_grad and not drafter.lm_head.weight.requires_grad
    before = snapshot(drafter)
    peft_config = None
    if how.endswith("lora"):
        peft_config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type=None)
    trainer = DSparkTrainer(
        model=drafter,
        target_model=target,
        args=make_args(tmp_path / "run", max_steps=3),
        train_dataset=Dataset.from_list(make_rows(target, 4)),
        peft_config=peft_config,
    )
    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    for name in ("embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(drafter.get_parameter(name), before[name]), name
        assert id(drafter.get_parameter(name)) not in optimized, name
    assert optimized  # something did train


def test_time_budget_ends_training_with_the_final_learning_rate(tmp_path):
    target = make_target()
    trainer = _train_a_few_steps(
        make_drafter(target),
        target,
        tmp_path,
        max_steps=100_000,
        max_train_minutes=0.02,
        warmup_steps=0.1,
        per_device_train_batch_size=2,
    )
    steps = trainer.state.global_step
    assert 2 < steps < 100_000
    assert trainer.lr_scheduler.get_last_lr()[0] == 0.0  # cosine annealed to its end
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert max(rates) > 0.5 * 1e-2  # it did reach (nearly) the peak rate in between


def test_time_budget_needs_a_fractional_warmup(tmp_path):
    with pytest.raises(ValueError, match="fraction of the budget"):
        make_args(tmp_path, max_train_minutes=1.0, warmup_steps=10)


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("head", ["vanilla", "rnn"])
def test_draft_vocab_training_over_the_whole_vocabulary_equals_full_training(tmp_path, head):
    target = make_target()
    rows = make_rows(target, 3)
    batch = DSparkDataCollator(pad_token_id=0)(rows)
    batch["anchors"], batch["anchor_keep"] = sample_anchors(batch["loss_mask"], 6, seeds=[1, 2, 3])
    results = []
    for vocab in (None, torch.arange(VOCAB)):
        drafter = make_drafter(target, markov_head_type=head)
        if vocab is not None:
            drafter.set_draft_vocab(vocab)
        trainer = DSparkTrainer(
            model=drafter,
            target_model=target,
            args=make_args(tmp_path, max_steps=1),
            train_dataset=Dataset.from_list(rows),
        )
        results.append(_loss_and_grads(trainer, batch))
    (full_loss, full_grads), (vocab_loss, vocab_grads) = results
    torch.testing.assert_close(vocab_loss, full_loss)
    assert full_grads.keys() == vocab_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(vocab_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_draft_vocab_training_learns_over_the_draft_vocab_and_the_prompt_tokens(tmp_path):
    target = make_target()
    drafter = make_drafter(target)
    drafter.set_draft_vocab(torch.arange(0, VOCAB, 2))  # half the vocabulary
    trainer = _train_a_few_steps(drafter, target, tmp_path, max_steps=30)
    losses = train_losses(trainer)
    assert sum(losses[-5:]) < sum(losses[:5])
    # The step's vocabulary: the draft vocabulary plus the batch's prompt tokens (as at generation).
    batch = DSparkDataCollator(pad_token_id=0)(make_rows(target, 2))
    vocab = trainer._training_vocab(batch)
    assert torch.equal(
        vocab, torch.cat([drafter.draft_vocab_ids, batch["input_ids"][:, :PROMPT].flatten()]).unique()
    )


def test_ce_warmup_trains_cross_entropy_only_at_first(pair, tmp_path):
    target, drafter, dataset = pair
    trainer = DSparkTrainer(
        model=drafter,
        target_model=target,
        args=make_args(tmp_path, max_steps=10, ce_warmup_fraction=0.3),
        train_dataset=dataset,
    )
    trainer.state.max_steps = 10
    weights = []
    for step in (0, 2, 3, 9):
        trainer.state.global_step = step
        weights.append(trainer._distribution_weights(training=True))
    assert weights[:2] == [{"ce_weight": 1.0, "l1_weight": 0.0}] * 2
    assert weights[2:] == [{"ce_weight": 0.1, "l1_weight": 0.9}] * 2
    trainer.state.global_step = 0
    assert trainer._distribution_weights(training=False) == {"ce_weight": 0.1, "l1_weight": 0.9}


def test_markov_head_learning_rate_multiplier(tmp_path):
    target = make_target()
    trainer = _train_a_few_steps(make_drafter(target), target, tmp_path, markov_head_lr_multiplier=10.0)
    markov = {id(p) for p in trainer.model.markov_head.parameters()}
    rates = {
        (id(group["params"][0]) in markov, all(id(p) in markov for p in group["params"])): group["lr"]
        for group in trainer.optimizer.param_groups
    }
    assert set(rates) == {(False, False), (True, True)}  # markov parameters in groups of their own
    assert rates[(True, True)] == pytest.approx(10 * rates[(False, False)])
    grouped = [id(p) for group in trainer.optimizer.param_groups for p in group["params"]]
    trainable = [id(p) for p in trainer.model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)


def test_muon_updates_the_hidden_matrices_and_adamw_the_rest(tmp_path):
    from dspark_hf.training.muon_adamw import MuonAdamW, is_hidden_matrix

    target = make_target()
    drafter = make_drafter(target)
    before = snapshot(drafter)
    trainer = _train_a_few_steps(
        drafter,
        target,
        tmp_path,
        matrix_optimizer="muon",
        markov_head_lr_multiplier=10.0,
        save_strategy="steps",
        save_steps=2,
    )
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper around ours
    assert isinstance(optimizer, MuonAdamW)
    named = dict(trainer.model.named_parameters())
    muon = {id(p) for group in optimizer.muon.param_groups for p in group["params"]}
    adamw = {id(p) for group in optimizer.adamw.param_groups for p in group["params"]}
    assert muon == {id(p) for n, p in named.items() if p.requires_grad and is_hidden_matrix(n, p)}
    assert adamw == {id(p) for p in named.values() if p.requires_grad} - muon
    assert {id(p) for n, p in named.items() if n.startswith("markov_head.")} <= adamw
    # one schedule drives both halves, the Markov head still at its multiple of the rate
    rates = {group["initial_lr"] for group in optimizer.param_groups}
    assert len(rates) == 2 and max(rates) == pytest.approx(10 * min(rates))
    after = snapshot(trainer.model)
    for name in ("layers.0.self_attn.q_proj.weight", "fc.weight", "markov_head.markov_w2.weight"):
        assert not torch.equal(before[name], after[name]), name
    for name in ("embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(before[name], after[name]), name
    # a checkpoint's optimizer state (both halves) restores into a fresh trainer, which trains on
    resumed = DSparkTrainer(
        model=make_drafter(target),
        target_model=target,
        args=make_args(tmp_path / "resumed", matrix_optimizer="muon", max_steps=3),
        train_dataset=Dataset.from_list(make_rows(target, 4)),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 3
    restored = resumed.optimizer.optimizer.muon.state_dict()["state"]
    assert restored and all("momentum_buffer" in state for state in restored.values())


def test_detached_confidence_input_trains_the_head_only():
    target = make_target()
    drafter = make_drafter(target)
    inputs = {
        "input_ids": torch.randint(0, VOCAB, (1, BLOCK)),
        "target_hidden_states": torch.randn(1, 6, 2 * 32),
        "position_ids": torch.arange(6 + BLOCK)[None],
        "prev_token_ids": torch.randint(0, VOCAB, (1, BLOCK)),
    }
    for detach in (False, True):
        drafter.zero_grad()
        drafter(**inputs, detach_confidence_input=detach).confidence_logits.sum().backward()
        assert drafter.confidence_head.proj.weight.grad.abs().sum() > 0
        backbone = drafter.fc.weight.grad
        assert (backbone is None or backbone.abs().sum() == 0) == detach


# ---- bad input ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    target = make_target()
    return target, make_drafter(target), Dataset.from_list(make_rows(target, 2))


@pytest.mark.parametrize(
    "other_target, message",
    [({"vocab_size": 40}, "vocab_size"), ({"hidden_size": 16}, "hidden_size")],
)
def test_mismatched_target_is_refused(pair, tmp_path, other_target, message):
    target, drafter, dataset = pair
    with pytest.raises(ValueError, match=message):
        DSparkTrainer(
            model=make_drafter(make_target(**other_target)),
            target_model=target,
            args=make_args(tmp_path),
            train_dataset=dataset,
        )


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"input_ids": [1, 2, 3, 4], "loss_mask": [0, 0, 0, 0]}], "no assistant tokens"),
        ([{"input_ids": [1, 2, 3, 4], "loss_mask": [0, 1, 0, 1]}], "no assistant tokens"),
        ([{"input_ids": [1, 2, 3, 4]}], "loss_mask"),
        ([], "empty"),
    ],
)
def test_dataset_without_assistant_tokens_is_refused(pair, tmp_path, rows, message):
    target, drafter, dataset = pair
    with pytest.raises(ValueError, match=message):
        DSparkTrainer(model=drafter, target_model=target, args=make_args(tmp_path), train_dataset=rows)
    with pytest.raises(ValueError, match=message):
        DSparkTrainer(
            model=drafter,
            target_model=target,
            args=make_args(tmp_path),
            train_dataset=dataset,
            eval_dataset=rows,
        )


def test_bad_arguments_are_refused(pair, tmp_path):
    from peft import LoraConfig

    target, drafter, dataset = pair
    with pytest.raises(ValueError, match="num_anchors"):
        make_args(tmp_path, num_anchors=0)
    with pytest.raises(ValueError, match="remove_unused_columns"):
        make_args(tmp_path, remove_unused_columns=True)
    with pytest.raises(TypeError, match="DSparkTrainingArguments"):
        DSparkTrainer(model=drafter, target_model=target, args=TrainingArguments(str(tmp_path)))
    for config, message in [
        (LoraConfig(target_modules="all-linear"), "explicit"),
        (LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM"), "task_type"),
        (LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]), "frozen"),
    ]:
        with pytest.raises(ValueError, match=message):
            DSparkTrainer(
                model=make_drafter(target),
                target_model=target,
                args=make_args(tmp_path),
                train_dataset=dataset,
                peft_config=config,
            )


# ---- devices and launchers --------------------------------------------------------------------------------


def test_the_trainer_places_the_target_where_accelerate_does_not(pair, tmp_path, monkeypatch):
    """Under FSDP accelerate places no model prepared for evaluation; the trainer places the target on the
    accelerator's device itself, unless a device map splits it over several devices."""
    from accelerate import Accelerator

    target, drafter, dataset = pair
    prepare_model = Accelerator.prepare_model

    def prepare_without_placement(self, model, device_placement=None, evaluation_mode=False):
        return prepare_model(self, model, device_placement=False, evaluation_mode=evaluation_mode)

    placed = []
    monkeypatch.setattr(Accelerator, "prepare_model", prepare_without_placement)
    monkeypatch.setattr(
        "dspark_hf.training.trainer.place_target",
        lambda model, device: placed.append(device) or place_target(model, device),
    )
    trainer = DSparkTrainer(
        model=drafter, target_model=target, args=make_args(tmp_path), train_dataset=dataset
    )
    assert placed == [trainer.accelerator.device]

    moved = place_target(make_target(), torch.device("meta"))
    assert {p.device.type for p in moved.parameters()} == {"meta"}
    split = make_target()
    split.hf_device_map = {"model.embed_tokens": 0, "model.layers": 0, "model.norm": 1, "lm_head": 1}
    assert place_target(split, torch.device("meta")) is split
    assert {p.device.type for p in split.parameters()} == {"cpu"}


def test_several_gpus_in_one_process_are_refused(pair, tmp_path):
    """n_gpu > 1 without a launcher would wrap the drafter in nn.DataParallel."""
    target, drafter, dataset = pair
    args = make_args(tmp_path)
    args._n_gpu = 2
    with pytest.raises(ValueError, match="torchrun --nproc_per_node=2"):
        DSparkTrainer(model=drafter, target_model=target, args=args, train_dataset=dataset)


def test_fsdp1_without_original_parameters_is_refused():
    from accelerate.utils import FullyShardedDataParallelPlugin

    with pytest.raises(ValueError, match="use_orig_params"):
        check_fsdp_plugin(FullyShardedDataParallelPlugin(fsdp_version=1, use_orig_params=False))
    check_fsdp_plugin(FullyShardedDataParallelPlugin(fsdp_version=1, use_orig_params=True))
    check_fsdp_plugin(FullyShardedDataParallelPlugin(fsdp_version=2))
    check_fsdp_plugin(None)


def test_a_bf16_step_builds_no_float32_tensor_of_all_block_positions(tmp_path, monkeypatch):
    """Neither accelerate's float32 copy of the drafter's outputs nor the target's probabilities at every
    block position [anchors x block, vocab]: the float32 vocabulary-sized tensors of a bf16 step are the
    loss's chunks and the target's distinct positions."""
    tracker_module = load_script("benchmarks/training_memory.py")
    vocab, chunk_rows = 1000, 4
    monkeypatch.setattr("dspark_hf.training.loss._CHUNK_ELEMENTS", chunk_rows * vocab)
    target = make_target(vocab_size=vocab).to(torch.bfloat16)
    rows = make_rows(target, 2)
    trainer = DSparkTrainer(
        model=make_drafter(target, dtype=torch.float32),
        target_model=target,
        args=make_args(tmp_path, bf16=True, max_steps=1, num_anchors=16, per_device_train_batch_size=2),
        train_dataset=Dataset.from_list(rows),
    )
    with tracker_module.VocabularyTensorTracker({vocab}) as tracker:
        trainer.train()
    draft_rows = 2 * 16 * BLOCK
    supervised = sum(sum(row["loss_mask"]) for row in rows)
    assert supervised < draft_rows  # overlapping blocks share target positions
    float32_rows = [tracker_module.rows(t) for t in tracker.created if t.dtype == torch.float32]
    assert float32_rows and max(float32_rows) <= supervised, float32_rows


def test_bf16_training_holds_the_frozen_copies_in_bf16_and_saves_exactly(tmp_path):
    """A bf16 target's embedding and LM head copies lose nothing in bf16: they are held so while training
    (the trainable weights stay float32 masters), checkpoints reload exactly, and training ends with them
    back in float32, unchanged."""
    from transformers import TrainerCallback

    target = make_target().to(torch.bfloat16)
    drafter = make_drafter(target, dtype=torch.float32)
    seen = []

    class RecordDtypes(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append((model.embed_tokens.weight.dtype, model.lm_head.weight.dtype, model.fc.weight.dtype))

    trainer = DSparkTrainer(
        model=drafter,
        target_model=target,
        args=make_args(tmp_path, bf16=True, max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=Dataset.from_list(make_rows(target, 4)),
        callbacks=[RecordDtypes()],
    )
    trainer.train()
    assert seen == [(torch.bfloat16, torch.bfloat16, torch.float32)] * 2
    assert {p.dtype for p in drafter.parameters()} == {torch.float32}
    torch.testing.assert_close(drafter.lm_head.weight, target.lm_head.weight.float(), rtol=0, atol=0)
    reloaded = DSparkForCausalLM.from_pretrained(tmp_path / "checkpoint-2")
    assert reloaded.dtype == torch.float32
    for name, p in drafter.named_parameters():
        assert torch.equal(reloaded.get_parameter(name), p), name


def test_dspark_train_builds_float32_master_weights_for_a_bf16_target():
    from dspark_hf.training.workflow import build_drafter

    drafter = build_drafter(make_target().to(torch.bfloat16), None, num_hidden_layers=1)
    assert {p.dtype for p in drafter.parameters()} == {torch.float32}


def test_dspark_train_command(tmp_path):
    """`dspark train` end to end on a tiny target that uses the reference chat tokenizer."""
    from transformers import AutoTokenizer

    from dspark_hf.cli import main
    from dspark_hf.reference.target import default_cache_dir

    if not (default_cache_dir() / "tokenizer_config.json").is_file():
        pytest.skip("the reference target's tokenizer is not cached")
    tokenizer = AutoTokenizer.from_pretrained(default_cache_dir())
    target = make_target(vocab_size=len(tokenizer))
    target.save_pretrained(tmp_path / "target")
    tokenizer.save_pretrained(tmp_path / "target")
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(6)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "drafter"
    common = ["--target", str(tmp_path / "target"), "--dataset", str(tmp_path / "rows.jsonl")]
    common += ["--output-dir", str(output), "--per-device-train-batch-size", "2"]
    common += ["--num-anchors", "4", "--seed", "0"]
    main(["train", *common, "--max-steps", "2", "--num-layers", "1", "--block-size", "3", "--eval-rows", "2"])
    drafter = DSparkForCausalLM.from_pretrained(output)
    assert drafter.config.num_hidden_layers == 1 and drafter.config.block_size == 3
    assert (output / "checkpoint-2").is_dir() and (output / "tokenizer.json").is_file()
    # Continue the run from its last checkpoint.
    main(["train", *common, "--max-steps", "3", "--num-layers", "1", "--block-size", "3", "--resume"])
    assert (output / "checkpoint-3").is_dir()
    with pytest.raises(SystemExit, match="--dataset"):
        main(["train", "--target", str(tmp_path / "target")])


# ---- scale-out ---------------------------------------------------------------------------------------------

DDP_STEPS = 3


def run_reference(output_dir, **overrides):
    """The run both sides of the DDP comparison make: 4 rows, so each step sees every row."""
    target = make_target()
    trainer = DSparkTrainer(
        model=make_drafter(target),
        target_model=target,
        args=make_args(output_dir, max_steps=DDP_STEPS, **overrides),
        train_dataset=Dataset.from_list(make_rows(target, 4)),
    )
    trainer.train()
    return trainer


def torchrun(*arguments: str) -> None:
    """Run `arguments` (a script or `-m module` and its arguments) in 2 CPU processes with torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # rendezvous on a free port chosen by torchrun itself
        "--nproc_per_node=2",
        *arguments,
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in completed.stderr.splitlines() if "find_unused_parameters" not in line]
    assert completed.returncode == 0, "\n".join(errors[-60:])


def test_ddp_matches_single_process(tmp_path):
    """2 CPU processes (gloo) x batch 2 give the losses and weights of 1 process x batch 4."""
    result = tmp_path / "ddp.json"
    torchrun(__file__, "ddp", str(tmp_path / "ddp"), str(result))
    ddp = json.loads(result.read_text())
    assert ddp["world_size"] == 2

    single = run_reference(tmp_path / "single")
    assert ddp["losses"] == pytest.approx(train_losses(single), rel=1e-4)
    for name, p in single.model.named_parameters():
        assert ddp["checksums"][name] == pytest.approx(p.double().sum().item(), rel=1e-4, abs=1e-5), name


def _ddp_worker(output_dir: str, result: str) -> None:
    trainer = run_reference(output_dir, per_device_train_batch_size=2, ddp_backend="gloo")
    if trainer.is_world_process_zero():
        checksums = {name: p.double().sum().item() for name, p in trainer.model.named_parameters()}
        Path(result).write_text(
            json.dumps(
                {
                    "world_size": trainer.args.world_size,
                    "losses": train_losses(trainer),
                    "checksums": checksums,
                }
            )
        )
    trainer.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()
    # The results are written: skip interpreter finalisation, where torch's CPU threads occasionally abort
    # ("terminate called without an active exception") or hang the process on a loaded machine.
    os._exit(0)


def test_processes_with_skewed_clocks_end_a_time_budget_together(tmp_path):
    """One process's clock runs three times as fast: both still stop on the same step, having applied the
    same learning rates (the main process's clock), the last one the schedule's end."""
    result = tmp_path / "budget.json"
    torchrun(__file__, "budget", str(tmp_path / "budget"), str(result))
    ranks = [json.loads(Path(f"{result}.{rank}").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["steps"] > 2 and ranks[0]["final_rate"] == 0.0


def test_dspark_train_under_torchrun_regenerates_each_answer_once(tmp_path):
    """README's multi-process command on 2 CPU processes (gloo): the main process answers the prompts, the
    other waits and reads its answers, and the run trains and saves a drafter."""
    from transformers import AutoTokenizer

    from dspark_hf.reference.target import default_cache_dir

    if not (default_cache_dir() / "tokenizer_config.json").is_file():
        pytest.skip("the reference target's tokenizer is not cached")
    tokenizer = AutoTokenizer.from_pretrained(default_cache_dir())
    make_target(vocab_size=len(tokenizer)).save_pretrained(tmp_path / "target")
    tokenizer.save_pretrained(tmp_path / "target")
    prompts = [f"What is {i} plus {i}?" for i in range(6)]
    rows = [{"prompt": prompt, "response": "unused"} for prompt in prompts]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "drafter"
    torchrun("-m", "dspark_hf.cli", "train", "--target", str(tmp_path / "target"),
             "--dataset", str(tmp_path / "rows.jsonl"), "--regenerate", "--max_new_tokens", "6",
             "--output_dir", str(output), "--per_device_train_batch_size", "1", "--num_anchors", "4",
             "--max_steps", "2", "--num_hidden_layers", "1", "--block_size", "3", "--save_strategy", "no",
             "--ddp_backend", "gloo", "--use_cpu")  # fmt: skip
    answered = [
        json.loads(line)["prompt"] for line in (output / "regenerated.jsonl").read_text().splitlines()
    ]
    assert sorted(answered) == sorted(prompts)
    assert DSparkForCausalLM.from_pretrained(output).config.num_hidden_layers == 1


def _budget_worker(output_dir: str, result: str) -> None:
    import types

    from dspark_hf.training import time_budget

    rank = int(os.environ["RANK"])
    if rank == 1:
        clock = time_budget.time.perf_counter
        time_budget.time = types.SimpleNamespace(perf_counter=lambda: 3 * clock())
    target = make_target()
    trainer = DSparkTrainer(
        model=make_drafter(target),
        target_model=target,
        args=make_args(
            output_dir,
            max_steps=100_000,
            max_train_minutes=0.01,
            warmup_steps=0.1,
            per_device_train_batch_size=2,
            ddp_backend="gloo",
        ),  # fmt: skip
        train_dataset=Dataset.from_list(make_rows(target, 4)),
    )
    trainer.train()
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    final_rate = trainer.lr_scheduler.get_last_lr()[0]
    summary = {"steps": trainer.state.global_step, "rates": rates, "final_rate": final_rate}
    Path(f"{result}.{rank}").write_text(json.dumps(summary))
    trainer.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    {"ddp": _ddp_worker, "budget": _budget_worker}[sys.argv[1]](*sys.argv[2:4])


def test_build_drafter_applies_the_recipe_over_the_shape(tmp_path):
    from dspark_hf.training.workflow import build_drafter

    target = make_target()
    drafter = build_drafter(target, None, "dflash", num_hidden_layers=1, markov_rank=8, block_size=3)
    config = drafter.config
    assert (config.num_hidden_layers, config.block_size, config.markov_rank) == (1, 3, 0)
    assert drafter.markov_head is None and drafter.confidence_head is None
    drafter.save_pretrained(tmp_path / "saved")
    assert build_drafter(target, None, drafter=str(tmp_path / "saved")).config.markov_rank == 0


def _cache_trainer(target, tmp_path, cache_dir, **overrides):
    return DSparkTrainer(
        model=make_drafter(target),
        target_model=target,
        args=make_args(tmp_path, target_cache_dir=str(cache_dir), **overrides),
        train_dataset=Dataset.from_list(make_rows(target, 4)),
    )


def test_target_cache_gives_the_online_loss_and_gradients(tmp_path):
    target = make_target()
    batch = DSparkDataCollator(pad_token_id=0)(make_rows(target, 3))  # uneven lengths: padded rows
    batch["anchors"], batch["anchor_keep"] = sample_anchors(batch["loss_mask"], 6, seeds=[1, 2, 3])
    online = DSparkTrainer(
        model=make_drafter(target), target_model=target, args=make_args(tmp_path / "online")
    )
    cached = _cache_trainer(target, tmp_path / "cached", tmp_path / "cache")
    expected_loss, expected_grads = _loss_and_grads(online, batch)
    for attempt in ("first pass: computed and stored", "second pass: read from disk"):
        loss, grads = _loss_and_grads(cached, batch)
        torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0, msg=attempt)
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=0, msg=f"{attempt}: {name}")
    assert (cached._target_cache.misses, cached._target_cache.hits) == (3, 3)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3


def test_target_cache_serves_later_epochs_and_skips_the_target(tmp_path):
    target = make_target()
    calls = []
    target.model.register_forward_hook(lambda *args: calls.append(1))
    trainer = _cache_trainer(target, tmp_path, tmp_path / "cache", num_train_epochs=3, max_steps=-1)
    calls.clear()  # making the rows ran the target
    trainer.train()
    cache = trainer._target_cache
    assert (cache.misses, cache.hits) == (4, 8) and len(calls) == 1  # one target forward, in epoch 1
    assert trainer.state.log_history[-1]["target_cache_gb"] > 0
    resumed = _cache_trainer(target, tmp_path / "again", tmp_path / "cache")
    calls.clear()
    resumed.train()
    assert resumed._target_cache.misses == 0 and not calls  # a new run reads the same entries


def test_target_cache_refuses_another_target_or_other_layers_and_ignores_partial_entries(tmp_path):
    target = make_target()
    trainer = _cache_trainer(target, tmp_path, tmp_path / "cache")
    trainer.train()
    with pytest.raises(ValueError, match="another target weights or config"):
        _cache_trainer(make_target(seed=5), tmp_path, tmp_path / "cache")
    with pytest.raises(ValueError, match="another target_layer_ids"):
        DSparkTrainer(
            model=make_drafter(target, target_layer_ids=[0, 1]),
            target_model=target,
            args=make_args(tmp_path, target_cache_dir=str(tmp_path / "cache")),
            train_dataset=None,
        )
    # A write interrupted before its rename leaves a temporary file, which is never read.
    row = torch.tensor([5, 6, 7])
    entry = tmp_path / "cache" / f"{row_key(row)}.safetensors.tmp-123"
    entry.write_bytes(b"half an entry")
    assert trainer._target_cache.get(row) is None


def test_target_cache_stays_within_its_size_bound(tmp_path):
    target = make_target()
    trainer = _cache_trainer(target, tmp_path, tmp_path / "cache", target_cache_max_gb=1e-9)
    trainer.train()
    assert not list((tmp_path / "cache").glob("*.safetensors")) and trainer._target_cache.hits == 0
