"""`dspark convert` and the DeepSpec <-> native conversion it runs, on the DeepSpec fixture."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, PreTrainedConfig

import dspark_hf
from dspark_hf.cli import main
from dspark_hf.formats.convert import convert_checkpoint
from dspark_hf.formats.registry import detect_layout

FIXTURE = Path(__file__).parent / "fixtures" / "deepspec_vanilla_conf"
# The exporter writes Qwen3's sliding-window field as the drafter's depth (DSpark never uses sliding windows),
# and stamps the running transformers version.
REWRITTEN_FIELDS = {"max_window_layers", "transformers_version"}


def _fixture_copy(tmp_path: Path, **config_updates) -> Path:
    folder = tmp_path / "deepspec"
    shutil.copytree(FIXTURE, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(config_updates)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_round_trip_deepspec_native_deepspec_is_identical(tmp_path, capsys):
    native, back = tmp_path / "native", tmp_path / "back"
    main(["convert", str(FIXTURE), str(native)])
    assert detect_layout(native) == "native"
    assert json.loads((native / "config.json").read_text())["model_type"] == "dspark"
    assert (native / "README.md").is_file()

    main(["convert", str(native), str(back)])
    assert detect_layout(back) == "deepspec"
    original, returned = load_file(FIXTURE / "model.safetensors"), load_file(back / "model.safetensors")
    assert returned.keys() == original.keys()
    for name, tensor in original.items():
        assert returned[name].dtype == tensor.dtype and torch.equal(returned[name], tensor), name

    original_config = json.loads((FIXTURE / "config.json").read_text())
    returned_config = json.loads((back / "config.json").read_text())
    for field, value in original_config.items():
        if field not in REWRITTEN_FIELDS:
            assert returned_config[field] == value, field
    added = set(returned_config) - set(original_config)
    assert added <= set(PreTrainedConfig().to_dict()), f"non-generic fields added on export: {added}"

    printed = capsys.readouterr().out
    spec = {"method": "dspark", "model": str(back), "num_speculative_tokens": original_config["block_size"]}
    assert f"--speculative-config '{json.dumps(spec)}'" in printed
    assert f"--speculative-algorithm DSPARK --speculative-draft-model-path {back}" in printed
    assert f"--speculative-dspark-block-size {original_config['block_size']}" in printed
    assert f'AutoModel.from_pretrained("{native}")' in printed


def test_converted_native_folder_loads_through_auto_model_with_identical_outputs(tmp_path):
    native = convert_checkpoint(FIXTURE, tmp_path / "native")
    model = AutoModel.from_pretrained(native).eval()
    assert isinstance(model, dspark_hf.DSparkForCausalLM)
    ref = load_file(FIXTURE / "reference_outputs.safetensors")
    with torch.no_grad():
        out = model(
            ref["block_input_ids"], ref["context_features"], ref["position_ids"], ref["prev_token_ids"]
        )
    reference = dspark_hf.DSparkForCausalLM.from_pretrained(FIXTURE).eval()
    with torch.no_grad():
        expected = reference(
            ref["block_input_ids"], ref["context_features"], ref["position_ids"], ref["prev_token_ids"]
        )
    assert torch.equal(out.logits, expected.logits)
    assert torch.equal(out.confidence_logits, expected.confidence_logits)


def test_explicit_direction_and_same_layout_refused(tmp_path):
    with pytest.raises(ValueError, match="already a deepspec-layout checkpoint"):
        convert_checkpoint(FIXTURE, tmp_path / "out", to="deepspec")
    with pytest.raises(ValueError, match="to must be one of"):
        convert_checkpoint(FIXTURE, tmp_path / "out", to="gguf")
    with pytest.raises(ValueError, match="must differ"):
        convert_checkpoint(_fixture_copy(tmp_path), tmp_path / "deepspec", to="native")


def test_gemma4_deepspec_checkpoint_is_refused_as_not_supported_yet(tmp_path, capsys):
    folder = _fixture_copy(tmp_path, model_type="gemma4_text", architectures=["Gemma4DSparkModel"])
    with pytest.raises(ValueError, match="Gemma4DSparkModel are not supported yet"):
        convert_checkpoint(folder, tmp_path / "out")
    with pytest.raises(SystemExit, match="dspark convert: .*not supported yet"):
        main(["convert", str(folder), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_non_dspark_folder_is_refused(tmp_path):
    folder = _fixture_copy(tmp_path, architectures=["Qwen3ForCausalLM"])
    with pytest.raises(ValueError, match="Not a DSpark checkpoint"):
        convert_checkpoint(folder, tmp_path / "out")
    with pytest.raises(ValueError, match="missing does not exist"):
        convert_checkpoint(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no config.json"):
        convert_checkpoint(tmp_path / "empty", tmp_path / "out")


def test_folder_with_only_pickled_weights_is_refused(tmp_path):
    native = convert_checkpoint(FIXTURE, tmp_path / "native")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(native / "config.json", pickled)
    torch.save(load_file(native / "model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"only pickled weights \(\['pytorch_model.bin'\]\)"):
        dspark_hf.DSparkForCausalLM.from_pretrained(pickled)
    with pytest.raises(ValueError, match="only pickled weights"):
        AutoModel.from_pretrained(pickled)
    with pytest.raises(ValueError, match="only pickled weights"):
        convert_checkpoint(pickled, tmp_path / "out")


def test_serving_notes_flag_what_engines_do_not_serve(tmp_path, capsys):
    model = dspark_hf.DSparkForCausalLM.from_pretrained(FIXTURE)
    cases = [
        ({"markov_head_type": "gated"}, "the gated Markov head is not served"),
        (
            {"markov_rank": 0, "enable_confidence_head": False},
            "vLLM's DSpark drafter always builds a Markov head",
        ),
    ]
    for i, (overrides, note) in enumerate(cases):
        config = dspark_hf.DSparkConfig(**{**model.config.to_dict(), **overrides})
        folder = tmp_path / f"native_{i}"
        dspark_hf.DSparkForCausalLM(config).save_pretrained(folder)
        main(["convert", str(folder), str(folder.with_name(folder.name + "_ds"))])
        notes = capsys.readouterr().out.split("\nNote: ")[1:]
        assert len(notes) == 1 and note in notes[0], notes
