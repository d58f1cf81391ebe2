"""The drafter as a transformers model: Auto registration, save/load, DeepSpec reproduction and export."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_drafter, make_tiny_target
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    LlamaConfig,
    Qwen3Config,
)

import dspark_hf
from dspark_hf import DSparkConfig, DSparkForCausalLM, export_deepspec
from dspark_hf.context_cache import DSparkContextCache
from dspark_hf.formats.weights import TARGET_COPY_WEIGHTS, omits_target_copies

FIXTURE = Path(__file__).parent / "fixtures" / "deepspec_vanilla_conf"


def tiny_config(**overrides) -> DSparkConfig:
    fields = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_target_layers=4,
        target_layer_ids=[0, 2],
        block_size=4,
        markov_rank=8,
    )
    fields.update(overrides)
    return DSparkConfig(**fields)


def random_inputs(config: DSparkConfig, context: int = 6, batch: int = 1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    block = torch.full((batch, config.block_size), config.mask_token_id)
    block[:, 0] = torch.randint(0, config.vocab_size, (batch,), generator=gen)
    features = torch.randn(batch, context, config.num_features * config.hidden_size, generator=gen)
    positions = torch.arange(context + config.block_size).expand(batch, -1)
    prev = torch.randint(0, config.vocab_size, (batch, config.block_size), generator=gen)
    prev[:, 0] = block[:, 0]
    return block, features, positions, prev


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn"])
def test_forward_shapes_for_every_head(head):
    config = tiny_config(markov_head_type=head)
    model = DSparkForCausalLM(config).eval()
    block, features, positions, prev = random_inputs(config, batch=2)
    out = model(block, features, positions, prev_token_ids=prev)
    assert out.last_hidden_state.shape == (2, 4, 32)
    assert out.base_logits.shape == out.logits.shape == (2, 4, 128)
    assert out.confidence_logits.shape == (2, 4)
    assert not torch.equal(out.logits, out.base_logits)
    # Training reads the logits alone; the base logits are then not kept.
    lean = model(block, features, positions, prev_token_ids=prev, return_base_logits=False)
    assert lean.base_logits is None and torch.equal(lean.logits, out.logits)


def test_markov_step_matches_teacher_forced_block():
    """The sequential step function (used when drafting) reproduces the teacher-forced bias token by token."""
    for head in ["vanilla", "gated", "rnn"]:
        model = DSparkForCausalLM(tiny_config(markov_head_type=head)).eval()
        block, features, positions, prev = random_inputs(model.config)
        with torch.no_grad():
            out = model(block, features, positions, prev_token_ids=prev)
            hidden = out.last_hidden_state[0]
            state = model.markov_head.init_state(hidden[0])
            for k in range(block.shape[1]):
                bias, state = model.markov_head.step(prev[0, k], hidden[k], state)
                torch.testing.assert_close(out.base_logits[0, k] + bias, out.logits[0, k])


def test_dflash_ablation_has_no_heads_but_base_logits():
    model = DSparkForCausalLM(tiny_config(markov_rank=0, enable_confidence_head=False))
    assert model.markov_head is None and model.confidence_head is None
    block, features, positions, _ = random_inputs(model.config)
    out = model(block, features, positions)
    assert torch.equal(out.logits, out.base_logits)
    assert out.confidence_logits is None


def test_context_cache_gives_the_same_block_as_a_full_forward():
    model = DSparkForCausalLM(tiny_config()).eval()
    block, features, positions, prev = random_inputs(model.config, context=7)
    with torch.no_grad():
        full = model(block, features, positions, prev_token_ids=prev)
        cache = DSparkContextCache(model.config.num_hidden_layers)
        block_pos = positions[:, 7:]
        # push the context in two chunks (as rounds of generation do), drafting a block after each
        model(block, features[:, :4], torch.cat([positions[:, :4], block_pos], 1), context_cache=cache)
        assert cache.get_seq_length() == 4
        cached = model(block, features[:, 4:], positions[:, 4:], prev_token_ids=prev, context_cache=cache)
    assert cache.get_seq_length() == 7
    torch.testing.assert_close(cached.logits, full.logits, rtol=1e-5, atol=1e-5)
    cache.crop(5)
    assert cache.get_seq_length() == 5


def test_packed_mask_equals_separate_blocks():
    """A boolean mask restricting a block to a context prefix equals a forward over that prefix alone."""
    model = DSparkForCausalLM(tiny_config()).eval()
    block, features, positions, prev = random_inputs(model.config, context=6)
    visible = 3
    mask = torch.zeros(1, 1, 4, 6 + 4, dtype=torch.bool)
    mask[..., :visible] = True
    mask[..., 6:] = True
    with torch.no_grad():
        masked = model(block, features, positions, prev_token_ids=prev, attention_mask=mask)
        alone = model(
            block,
            features[:, :visible],
            torch.cat([positions[:, :visible], positions[:, 6:]], 1),
            prev_token_ids=prev,
        )
    torch.testing.assert_close(masked.logits, alone.logits, rtol=1e-5, atol=1e-5)


def test_auto_classes_and_safetensors_round_trip(tmp_path):
    model = DSparkForCausalLM(tiny_config(markov_head_type="rnn")).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "dspark" and "auto_map" not in saved
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    assert isinstance(AutoConfig.from_pretrained(tmp_path), DSparkConfig)
    for auto in (AutoModel, AutoModelForCausalLM):
        loaded = auto.from_pretrained(tmp_path).eval()
        assert type(loaded) is DSparkForCausalLM
        inputs = random_inputs(model.config)
        with torch.no_grad():
            a, b = model(*inputs[:3], prev_token_ids=inputs[3]), loaded(*inputs[:3], prev_token_ids=inputs[3])
        assert torch.equal(a.logits, b.logits) and torch.equal(a.confidence_logits, b.confidence_logits)


def test_a_native_folder_without_the_target_copies_takes_them_from_the_verifier(tmp_path):
    """A drafter saved without its copies of the target's embedding and LM head (small files) reloads exactly
    with the target as verifier, and is refused without one rather than loaded with random copies."""
    target = make_tiny_target(tie_word_embeddings=True)  # one tensor for both copies
    drafter = make_tiny_drafter(target, seed=0).eval()
    state_dict = {k: v for k, v in drafter.state_dict().items() if k not in TARGET_COPY_WEIGHTS}
    drafter.save_pretrained(tmp_path, state_dict=state_dict, max_shard_size=8192)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1 and omits_target_copies(tmp_path)
    with pytest.raises(ValueError, match=r"omits \['embed_tokens.weight', 'lm_head.weight'\].*verifier="):
        DSparkForCausalLM.from_pretrained(tmp_path)
    reloaded = DSparkForCausalLM.from_pretrained(tmp_path, verifier=target).eval()
    expected, got = drafter.state_dict(), reloaded.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    drafter.save_pretrained(tmp_path / "full")
    assert not omits_target_copies(tmp_path / "full")


def test_pickled_checkpoint_is_refused(tmp_path):
    model = DSparkForCausalLM(tiny_config())
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors"):
        DSparkForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_reproduces_deepspec_reference_outputs(attn):
    model = DSparkForCausalLM.from_pretrained(FIXTURE, attn_implementation=attn).eval()
    assert model.config.model_type == "dspark" and model.config.markov_head_type == "vanilla"
    ref = load_file(FIXTURE / "reference_outputs.safetensors")
    with torch.no_grad():
        out = model(
            ref["block_input_ids"],
            ref["context_features"],
            ref["position_ids"],
            prev_token_ids=ref["prev_token_ids"],
        )
    for ours, theirs in [
        ("last_hidden_state", "block_hidden"),
        ("base_logits", "base_logits"),
        ("logits", "corrected_logits"),
        ("confidence_logits", "confidence_logits"),
    ]:
        assert (getattr(out, ours) - ref[theirs]).abs().max().item() < 1e-4, ours


def test_deepspec_rope_theta_style_config_loads(tmp_path):
    shutil.copy(FIXTURE / "model.safetensors", tmp_path)
    config = json.loads((FIXTURE / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = DSparkForCausalLM.from_pretrained(tmp_path)
    assert model.config.rope_parameters["rope_theta"] == 10000.0


def test_gemma4_deepspec_checkpoint_is_not_supported(tmp_path):
    config = json.loads((FIXTURE / "config.json").read_text())
    config.update(model_type="gemma4_text", architectures=["Gemma4DSparkModel"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(FIXTURE / "model.safetensors", tmp_path)
    with pytest.raises(ValueError, match="not supported yet"):
        DSparkForCausalLM.from_pretrained(tmp_path)


def test_export_deepspec_round_trip(tmp_path):
    model = DSparkForCausalLM.from_pretrained(FIXTURE).eval()
    export_deepspec(model, tmp_path)
    exported = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((FIXTURE / "config.json").read_text())
    assert exported["architectures"] == ["Qwen3DSparkModel"] and exported["model_type"] == "qwen3"
    for field in ["block_size", "target_layer_ids", "mask_token_id", "markov_rank", "markov_head_type",
                  "num_target_layers", "enable_confidence_head", "confidence_head_with_markov", "num_anchors",
                  "hidden_size", "num_hidden_layers", "layer_types", "rope_parameters"]:  # fmt: skip
        assert exported[field] == original[field], field
    ours, theirs = load_file(tmp_path / "model.safetensors"), load_file(FIXTURE / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    reloaded = DSparkForCausalLM.from_pretrained(tmp_path).eval()
    ref = load_file(FIXTURE / "reference_outputs.safetensors")
    args = (ref["block_input_ids"], ref["context_features"], ref["position_ids"])
    with torch.no_grad():
        assert torch.equal(model(*args, prev_token_ids=ref["prev_token_ids"]).logits,
                           reloaded(*args, prev_token_ids=ref["prev_token_ids"]).logits)  # fmt: skip


def test_parameter_names_equal_deepspec_for_every_head(tmp_path):
    fixture_keys = set(load_file(FIXTURE / "model.safetensors"))
    assert set(DSparkForCausalLM.from_pretrained(FIXTURE).state_dict()) == fixture_keys
    gated = set(DSparkForCausalLM(tiny_config(markov_head_type="gated")).state_dict())
    rnn = set(DSparkForCausalLM(tiny_config(markov_head_type="rnn")).state_dict())
    assert {"markov_head.gate_proj.weight", "markov_head.gate_proj.bias"} <= gated
    assert {"markov_head.joint_proj.weight", "markov_head.joint_proj.bias"} <= rnn


@pytest.mark.parametrize(
    "target_config",
    [
        LlamaConfig(
            vocab_size=96,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=36,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=3,
        ),  # fmt: skip
        Qwen3Config(
            vocab_size=96,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        ),  # fmt: skip
    ],
)
def test_from_target_config(target_config):
    config = DSparkConfig.from_target_config(target_config, block_size=5)
    assert config.hidden_size == 48 and config.vocab_size == 96 and config.block_size == 5
    assert config.num_target_layers == target_config.num_hidden_layers
    assert config.head_dim == getattr(target_config, "head_dim", 12)
    if target_config.num_hidden_layers == 36:
        assert config.target_layer_ids == [1, 9, 17, 25, 33]
        assert config.mask_token_id == 3  # the pad token
    else:
        assert config.mask_token_id == 95  # the last id when the target has no pad token
    ids = config.target_layer_ids
    assert all(0 <= i < target_config.num_hidden_layers for i in ids) and ids == sorted(set(ids))


def test_from_target_copies_frozen_embeddings_and_head():
    target = make_tiny_target()
    drafter = make_tiny_drafter(target, markov_rank=4)
    assert torch.equal(drafter.embed_tokens.weight, target.model.embed_tokens.weight)
    assert torch.equal(drafter.lm_head.weight, target.lm_head.weight)
    assert not drafter.embed_tokens.weight.requires_grad and not drafter.lm_head.weight.requires_grad
    assert drafter.fc.weight.requires_grad


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(target_layer_ids=[0, 9]), "target_layer_ids"),
        (dict(target_layer_ids=[2, 1]), "target_layer_ids"),
        (dict(markov_head_type="lstm"), "markov_head_type"),
        (dict(markov_rank=-1), "markov_rank"),
        (dict(block_size=1), "block_size"),
        (dict(mask_token_id=500), "mask_token_id"),
    ],
)
def test_invalid_config_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_package_registers_dspark():
    assert dspark_hf.DSparkConfig.model_type == "dspark"
    assert AutoConfig.for_model("dspark", vocab_size=16, hidden_size=8, num_attention_heads=2, head_dim=4,
                                num_target_layers=4, target_layer_ids=[0]).model_type == "dspark"  # fmt: skip
