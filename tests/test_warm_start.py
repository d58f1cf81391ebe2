import pytest
import torch
from conftest import make_tiny_drafter, make_tiny_target

from dspark_hf import DSparkForCausalLM
from dspark_hf.warm_start import PROBE_LENGTH, qk_norm_scale

COPIED = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("num_hidden_layers", [1, 2])
def test_warm_start_copies_the_targets_last_layers_bit_identically(kind, num_hidden_layers):
    target = make_tiny_target(kind, num_hidden_layers=6)
    drafter = make_tiny_drafter(target, num_hidden_layers=num_hidden_layers, layer_init="target")
    first = 6 - num_hidden_layers
    assert first - 1 in drafter.config.target_layer_ids  # the feeding layer is captured
    for draft_layer, source in zip(drafter.layers, target.model.layers[first:], strict=True):
        for name in COPIED:
            assert torch.equal(
                getattr(draft_layer.self_attn, name).weight, getattr(source.self_attn, name).weight
            )
        for name, tensor in source.mlp.state_dict().items():
            assert torch.equal(draft_layer.mlp.state_dict()[name], tensor), name
        assert torch.equal(draft_layer.input_layernorm.weight, source.input_layernorm.weight)
        assert torch.equal(
            draft_layer.post_attention_layernorm.weight, source.post_attention_layernorm.weight
        )
        if kind == "qwen3":
            assert torch.equal(draft_layer.self_attn.q_norm.weight, source.self_attn.q_norm.weight)
            assert torch.equal(draft_layer.self_attn.k_norm.weight, source.self_attn.k_norm.weight)
    assert torch.equal(drafter.norm.weight, target.model.norm.weight)
    assert torch.equal(drafter.hidden_norm.weight, target.model.layers[first].input_layernorm.weight)
    slot = drafter.config.target_layer_ids.index(first - 1)
    hidden = drafter.config.hidden_size
    expected_fc = torch.zeros_like(drafter.fc.weight)
    expected_fc[:, slot * hidden : (slot + 1) * hidden] = torch.eye(hidden)
    assert torch.equal(drafter.fc.weight, expected_fc)
    assert not drafter.markov_head.markov_w2.weight.any()
    assert not drafter.confidence_head.proj.weight.any() and not drafter.confidence_head.proj.bias.any()
    assert torch.equal(drafter.embed_tokens.weight, target.model.embed_tokens.weight)


def test_llama_targets_get_q_k_norms_at_the_targets_query_and_key_scale():
    target = make_tiny_target("llama", num_hidden_layers=4)
    drafter = make_tiny_drafter(target, num_hidden_layers=1, layer_init="target")
    queries = {}
    target.model.layers[3].self_attn.q_proj.register_forward_hook(lambda m, a, out: queries.update(q=out))
    with torch.no_grad():
        target(torch.arange(PROBE_LENGTH)[None] % 64)
    heads = queries["q"].view(1, PROBE_LENGTH, -1, 8)
    rms = heads.pow(2).mean(-1).sqrt().mean()
    scale = qk_norm_scale(target, [3])[3][0]
    assert scale == pytest.approx(float(rms), rel=0.2)  # same statistic, other probe ids
    assert torch.all(
        drafter.layers[0].self_attn.q_norm.weight == drafter.layers[0].self_attn.q_norm.weight[0]
    )
    assert float(drafter.layers[0].self_attn.q_norm.weight[0]) == pytest.approx(scale)


def test_warm_start_refuses_layer_ids_without_the_feeding_layer_and_too_many_layers():
    target = make_tiny_target(num_hidden_layers=4)
    with pytest.raises(ValueError, match="must include 2"):
        make_tiny_drafter(target, layer_init="target", target_layer_ids=[0, 1])
    with pytest.raises(ValueError, match="num_hidden_layers <= 4"):
        make_tiny_drafter(target, num_hidden_layers=5, layer_init="target")
    with pytest.raises(ValueError, match="layer_init must be one of"):
        make_tiny_drafter(target, layer_init="copy")


def test_a_warm_started_drafter_exports_and_reloads(tmp_path):
    from dspark_hf import export_deepspec, export_speculators

    target = make_tiny_target(num_hidden_layers=4)
    drafter = make_tiny_drafter(target, num_hidden_layers=2, layer_init="target").eval()
    export_deepspec(drafter, tmp_path / "deepspec")
    export_speculators(drafter, tmp_path / "speculators", verifier_name_or_path="tiny")
    inputs = dict(
        input_ids=torch.randint(0, 64, (1, 7)),
        target_hidden_states=torch.randn(1, 5, drafter.config.num_features * 32),
        position_ids=torch.arange(12)[None],
        prev_token_ids=torch.randint(0, 64, (1, 7)),
    )
    expected = drafter(**inputs).logits
    for folder in ("deepspec", "speculators"):
        reloaded = DSparkForCausalLM.from_pretrained(tmp_path / folder, verifier=target).eval()
        torch.testing.assert_close(reloaded(**inputs).logits, expected)
