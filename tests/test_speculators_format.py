"""speculators-format export and import, and the draft sub-vocabulary in both serving formats.

The check against speculators itself (its DSpark model loading our exports with equal outputs) needs its own
virtual environment: tests/peer/speculators_check.sh. These tests pin down our side of the format.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_drafter, make_tiny_target
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, PreTrainedModel

from dspark_hf import DSparkConfig, DSparkForCausalLM, export_deepspec, export_speculators
from dspark_hf.cli import main
from dspark_hf.formats.convert import convert_checkpoint
from dspark_hf.formats.registry import detect_layout, load_config

FIXTURE = Path(__file__).parent / "fixtures" / "deepspec_vanilla_conf"
DRAFT_IDS = [0, 3, 17, 40, 63, 90, 127]


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> tuple[PreTrainedModel, Path]:
    model = make_tiny_target(vocab_size=128, head_dim=8)
    folder = tmp_path_factory.mktemp("target")
    model.save_pretrained(folder)
    return model, folder


def make_drafter(target, head="vanilla", confidence=True, draft_ids=None) -> DSparkForCausalLM:
    model, folder = target
    drafter = make_tiny_drafter(
        model, block_size=4, markov_head_type=head, mask_token_id=127, target_layer_ids=[-1, 2],
        enable_confidence_head=confidence, target_model_name_or_path=str(folder),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in drafter.named_parameters():
            if name not in ("embed_tokens.weight", "lm_head.weight"):
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    if draft_ids is not None:
        drafter.set_draft_vocab(draft_ids)
    return drafter.eval()


def outputs(drafter, vocab_ids=None):
    gen = torch.Generator().manual_seed(2)
    block = torch.tensor([[5, 127, 127, 127]])
    features = torch.randn(1, 6, 2 * 32, generator=gen)
    prev = torch.tensor([[5, 9, 11, 13]])
    with torch.no_grad():
        out = drafter(block, features, torch.arange(10)[None], prev_token_ids=prev, vocab_ids=vocab_ids)
    return out.logits, out.confidence_logits


def assert_same_state(a: DSparkForCausalLM, b: DSparkForCausalLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn"])
@pytest.mark.parametrize("confidence", [True, False])
def test_native_speculators_native_round_trip_is_bit_exact(target, tmp_path, head, confidence):
    drafter = make_drafter(target, head, confidence)
    export_speculators(drafter, tmp_path / "spec")
    assert detect_layout(tmp_path / "spec") == "speculators"
    back = DSparkForCausalLM.from_pretrained(tmp_path / "spec", verifier=target[0])
    assert_same_state(drafter, back)
    fields = ["target_layer_ids", "num_target_layers", "block_size", "mask_token_id", "markov_rank",
              "markov_head_type", "enable_confidence_head", "confidence_head_with_markov", "rope_parameters",
              "target_model_name_or_path", "extend_draft_vocab_with_prompt"]  # fmt: skip
    for field in fields:
        assert getattr(back.config, field) == getattr(drafter.config, field), field
    for ours, theirs in zip(outputs(drafter), outputs(back)):
        assert (ours is None and theirs is None) or torch.equal(ours, theirs)


def test_speculators_config_and_tensors_follow_the_format(target, tmp_path):
    drafter = make_drafter(target)
    drafter.config.confidence_temperatures = [1.0, 1.5, 2.0, 2.5]
    export_speculators(drafter, tmp_path / "spec")
    config = json.loads((tmp_path / "spec" / "config.json").read_text())
    assert config["speculators_model_type"] == "dspark" and config["speculators_version"] == "0.9.0"
    assert config["architectures"] == ["DSparkSpeculator"]
    spec = config["speculators_config"]
    assert spec["algorithm"] == "dspark" and spec["default_proposal_method"] == "greedy"
    assert spec["proposal_methods"][0]["speculative_tokens"] == 4  # the anchor slot drafts too
    assert spec["verifier"] == {"name_or_path": str(target[1]), "architectures": ["LlamaForCausalLM"]}
    assert config["aux_hidden_state_layer_ids"] == [0, 3]  # ours + 1: speculators' layer 0 is the embedding
    assert config["sample_from_anchor"] is True and config["dspark_bonus_anchor"] is False
    assert config["draft_vocab_size"] == 128 and config["num_target_layers"] == 4
    assert config["transformer_layer_config"]["model_type"] == "qwen3"
    assert config["transformer_layer_config"]["num_hidden_layers"] == 1
    tensors = load_file(tmp_path / "spec" / "model.safetensors")
    assert "embed_tokens.weight" not in tensors and "lm_head.weight" not in tensors  # from the verifier
    assert set(tensors) == set(drafter.state_dict()) - {"embed_tokens.weight", "lm_head.weight"}
    # The verifier recorded in the checkpoint supplies the omitted weights; calibration survives.
    back = DSparkForCausalLM.from_pretrained(tmp_path / "spec")
    assert_same_state(drafter, back)
    assert back.config.confidence_temperatures == [1.0, 1.5, 2.0, 2.5]


def test_sub_vocabulary_is_exported_eagle3_style_and_restored(target, tmp_path):
    drafter = make_drafter(target, "rnn", draft_ids=DRAFT_IDS)
    export_speculators(drafter, tmp_path / "spec")
    config = json.loads((tmp_path / "spec" / "config.json").read_text())
    assert config["draft_vocab_size"] == len(DRAFT_IDS)
    tensors = load_file(tmp_path / "spec" / "model.safetensors")
    ids = torch.tensor(DRAFT_IDS)
    assert tensors["d2t"].dtype == torch.int64 and torch.equal(tensors["d2t"], ids - torch.arange(len(ids)))
    assert tensors["t2d"].dtype == torch.bool and tensors["t2d"].nonzero().flatten().tolist() == DRAFT_IDS
    assert torch.equal(tensors["lm_head.weight"], drafter.lm_head.weight[ids])
    assert torch.equal(tensors["markov_head.markov_w2.weight"], drafter.markov_head.markov_w2.weight[ids])
    assert "draft_vocab_ids" not in tensors and "embed_tokens.weight" not in tensors

    back = DSparkForCausalLM.from_pretrained(tmp_path / "spec", verifier=target[1])
    assert back.draft_vocab_ids.tolist() == DRAFT_IDS and back.config.draft_vocab_size == len(DRAFT_IDS)
    assert not back.config.extend_draft_vocab_with_prompt  # rows outside the draft vocabulary are not stored
    assert torch.equal(back.lm_head.weight, drafter.lm_head.weight)  # outside rows from the verifier
    w2 = back.markov_head.markov_w2.weight
    assert torch.equal(w2[ids], drafter.markov_head.markov_w2.weight[ids]) and not w2[1].any()
    for ours, theirs in zip(outputs(drafter, ids), outputs(back, ids)):
        assert torch.equal(ours, theirs)
    # ... and exports again to the same tensors.
    export_speculators(back, tmp_path / "again")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_deepspec_export_carries_the_sub_vocabulary(target, tmp_path):
    drafter = make_drafter(target, draft_ids=DRAFT_IDS)
    export_deepspec(drafter, tmp_path / "deepspec")
    config = json.loads((tmp_path / "deepspec" / "config.json").read_text())
    tensors = load_file(tmp_path / "deepspec" / "model.safetensors")
    assert config["draft_vocab_size"] == len(DRAFT_IDS) and tensors["lm_head.weight"].shape[0] == len(
        DRAFT_IDS
    )
    assert tensors["t2d"].nonzero().flatten().tolist() == DRAFT_IDS
    assert torch.equal(tensors["embed_tokens.weight"], drafter.embed_tokens.weight)  # DeepSpec keeps it
    back = DSparkForCausalLM.from_pretrained(tmp_path / "deepspec", verifier=target[0])
    assert back.draft_vocab_ids.tolist() == DRAFT_IDS and not back.config.extend_draft_vocab_with_prompt
    assert torch.equal(back.lm_head.weight, drafter.lm_head.weight)
    ids = torch.tensor(DRAFT_IDS)
    for ours, theirs in zip(outputs(drafter, ids), outputs(back, ids)):
        assert torch.equal(ours, theirs)


# What `AutoConfig.from_pretrained` gives for each folder in argv: the config's class, or the exception.
AUTO_CONFIG_OUTCOMES = """
import json, sys
from transformers import AutoConfig
outcomes = []
for folder in sys.argv[1:]:
    try:
        outcomes.append(type(AutoConfig.from_pretrained(folder)).__name__)
    except Exception as err:
        outcomes.append(f"{type(err).__name__}: {err}")
print(json.dumps(outcomes))
"""


def auto_config_outcomes(folders: list[Path], import_dspark_hf: bool) -> list[str]:
    script = ("import dspark_hf\n" if import_dspark_hf else "") + AUTO_CONFIG_OUTCOMES
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, folders)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(done.stdout.splitlines()[-1])


def test_foreign_layouts_load_explicitly_and_auto_config_is_left_alone(target, tmp_path):
    """DeepSpec's config.json names another model type (qwen3) and speculators' none, and transformers has no
    hook for them: `import dspark_hf` leaves `AutoConfig` as it is, and `DSparkForCausalLM.from_pretrained` /
    `load_config` load them."""
    export_speculators(make_drafter(target, "gated"), tmp_path / "spec")
    assert isinstance(load_config(tmp_path / "spec"), DSparkConfig)
    assert isinstance(load_config(FIXTURE), DSparkConfig)
    model = DSparkForCausalLM.from_pretrained(tmp_path / "spec")
    assert isinstance(model, DSparkForCausalLM) and model.config.markov_head_type == "gated"
    assert model.name_or_path == str(tmp_path / "spec")
    assert DSparkForCausalLM.from_pretrained(FIXTURE).name_or_path == str(FIXTURE)

    native = tmp_path / "native"
    make_drafter(target).save_pretrained(native)
    foreign = [FIXTURE, tmp_path / "spec", target[1]]
    with_package = auto_config_outcomes([*foreign, native], import_dspark_hf=True)
    assert with_package[:-1] == auto_config_outcomes(foreign, import_dspark_hf=False)
    assert with_package[0] == "Qwen3Config" and with_package[-1] == "DSparkConfig"
    assert not hasattr(AutoConfig.from_pretrained.__func__, "__wrapped__")


def _edit_config(folder: Path, **updates) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config.update(updates)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_unrepresentable_or_incomplete_checkpoints_are_refused(target, tmp_path):
    folder = export_speculators(make_drafter(target), tmp_path / "spec")
    with pytest.raises(ValueError, match="bonus token"):
        DSparkForCausalLM.from_pretrained(_edit_config(folder, sample_from_anchor=False))
    with pytest.raises(ValueError, match="bonus token"):
        DSparkForCausalLM.from_pretrained(
            _edit_config(folder, sample_from_anchor=True, dspark_bonus_anchor=True)
        )
    with pytest.raises(ValueError, match="speculators_model_type='dflash'"):
        DSparkForCausalLM.from_pretrained(_edit_config(folder, speculators_model_type="dflash"))
    spec = _edit_config(folder, speculators_model_type="dspark", dspark_bonus_anchor=False)
    config = json.loads((spec / "config.json").read_text())
    config["speculators_config"]["verifier"]["name_or_path"] = None
    (spec / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"omits \['embed_tokens.weight', 'lm_head.weight'\].*verifier="):
        DSparkForCausalLM.from_pretrained(spec)
    tensors = load_file(spec / "model.safetensors")
    tensors["d2t"] = torch.tensor([5, 0])  # target ids 5, 1: not increasing
    save_file(tensors, spec / "model.safetensors")
    with pytest.raises(ValueError, match="strictly increasing"):
        DSparkForCausalLM.from_pretrained(spec, verifier=target[0])


def test_dspark_convert_between_all_three_layouts(target, tmp_path, capsys):
    native = tmp_path / "native"
    make_drafter(target).save_pretrained(native)
    main(
        [
            "convert",
            str(native),
            str(tmp_path / "spec"),
            "--format",
            "speculators",
            "--verifier",
            str(target[1]),
        ]
    )
    printed = capsys.readouterr().out
    assert detect_layout(tmp_path / "spec") == "speculators"
    assert f"vllm serve {tmp_path / 'spec'}\n" in printed and "--format deepspec" in printed
    main(["convert", str(tmp_path / "spec"), str(tmp_path / "deepspec"), "--format", "deepspec"])
    assert "--speculative-algorithm DSPARK" in capsys.readouterr().out
    convert_checkpoint(tmp_path / "deepspec", tmp_path / "back")
    assert_same_state(
        DSparkForCausalLM.from_pretrained(native), DSparkForCausalLM.from_pretrained(tmp_path / "back")
    )
