"""Frequency-ranked draft sub-vocabularies: selection, storage with the drafter, export."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dspark_hf import DSparkConfig, DSparkForCausalLM, export_deepspec
from dspark_hf.training.draft_vocab import frequency_ranked_vocab


def test_frequency_ranked_vocab_counts_only_masked_tokens_and_keeps_forced_ids():
    sequences = [[5, 5, 5, 1, 2, 2], [7, 7, 7, 7, 2, 9]]
    masks = [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]]
    ids = frequency_ranked_vocab(sequences, size=2, loss_masks=masks, always_include=[0])
    assert ids.tolist() == [0, 2]  # 2 is the most frequent supervised token; 5 and 7 are never supervised
    assert frequency_ranked_vocab(sequences, size=2).tolist() == [5, 7]
    with pytest.raises(ValueError, match="size"):
        frequency_ranked_vocab(sequences, size=0)


def tiny_drafter() -> DSparkForCausalLM:
    config = DSparkConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_target_layers=4,
                          target_layer_ids=[0, 2], block_size=3, markov_rank=4)  # fmt: skip
    return DSparkForCausalLM(config)


def test_draft_vocab_is_saved_reloaded_and_exported_as_draft_rows(tmp_path):
    drafter = tiny_drafter()
    drafter.set_draft_vocab([9, 3, 3, 40])
    assert drafter.config.draft_vocab_size == 3 and drafter.draft_vocab_ids.tolist() == [3, 9, 40]
    drafter.save_pretrained(tmp_path / "native")
    reloaded = DSparkForCausalLM.from_pretrained(tmp_path / "native")
    assert reloaded.draft_vocab_ids.tolist() == [3, 9, 40]

    export_deepspec(reloaded, tmp_path / "deepspec")  # EAGLE-3 style, see test_speculators_format.py
    exported = load_file(tmp_path / "deepspec" / "model.safetensors")
    assert "draft_vocab_ids" not in exported and exported["d2t"].tolist() == [3, 8, 38]
    assert json.loads((tmp_path / "deepspec" / "config.json").read_text())["draft_vocab_size"] == 3

    reloaded.set_draft_vocab(None)
    assert reloaded.config.draft_vocab_size is None and "draft_vocab_ids" not in reloaded.state_dict()


def test_invalid_draft_vocab_is_refused():
    drafter = tiny_drafter()
    with pytest.raises(ValueError, match="draft vocabulary"):
        drafter.set_draft_vocab([1, 64])
    with pytest.raises(ValueError, match="draft_vocab_size"):
        DSparkConfig(vocab_size=64, hidden_size=16, num_attention_heads=2, head_dim=8, num_target_layers=4,
                     target_layer_ids=[0], draft_vocab_size=65)  # fmt: skip
    assert torch.is_tensor(frequency_ranked_vocab([[1]], size=1))
