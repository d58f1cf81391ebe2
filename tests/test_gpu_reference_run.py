"""examples/gpu_reference_run.py: its `--smoke` run on the CPU takes every step of the GPU run at a tiny size
(the real drafter, a few prompts and steps), and without a GPU the full run is refused in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script
from safetensors.torch import load_file

from dspark_hf import DSparkForCausalLM
from dspark_hf.reference.target import default_cache_dir, load_reference_target
from dspark_hf.training.data import reference_training_rows

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "examples" / "gpu_reference_run.py"
MAX_SHARD_BYTES = 16 * 2**20

pytestmark = pytest.mark.skipif(
    not (default_cache_dir() / "config.json").is_file(),
    reason="the reference target is not prepared yet (dspark_hf.reference.target)",
)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """The output folder of one `--smoke` run, on the CPU whatever devices the machine has."""
    output = tmp_path_factory.mktemp("gpu_smoke")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--output_dir", str(output), "--smoke"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return output


@pytest.fixture(scope="module")
def summary(smoke_run) -> dict:
    return json.loads((smoke_run / "summary.json").read_text())


def test_the_smoke_run_answers_the_first_distinct_training_prompts(smoke_run, summary):
    answers = [json.loads(line) for line in (smoke_run / "regenerated.jsonl").read_text().splitlines()]
    prompts = list(dict.fromkeys(row["prompt"] for row in reference_training_rows("train")))[:4]
    assert [answer["prompt"] for answer in answers] == prompts
    assert all(answer["sampling"] == "greedy" and answer["response"].strip() for answer in answers)
    regeneration = summary["regeneration"]
    assert summary["rows_regenerated"] == regeneration["rows"] == regeneration["generated_now"] == 4
    assert regeneration["answer_tokens"] > 0 and regeneration["answer_tokens_per_s"] > 0


def test_the_smoke_run_trains_its_steps_with_the_target_cache(smoke_run, summary):
    training = summary["training"]
    assert training["steps"] == training["last_logged"]["step"] == 2
    assert training["steps_per_s"] > 0 and training["tokens_per_s"] > 0 and training["input_tokens"] > 0
    assert training["target_cache"]["target_cache_misses"] == 4  # 2 steps x 2 rows, each stored once
    assert len(list((smoke_run / "target-cache").glob("*.safetensors"))) == 4
    assert summary["device"] == "cpu" and summary["dtype"]["saved_drafter"] == "bfloat16"
    assert summary["elapsed_s"] > training["runtime_s"] > 0


def test_the_drafter_is_saved_in_small_shards_that_reload_exactly(smoke_run, summary):
    folder = smoke_run / "drafter"
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 1
    assert summary["drafter"]["shards"] == {path.name: path.stat().st_size for path in shards}
    assert all(path.stat().st_size <= MAX_SHARD_BYTES for path in shards)
    stored = {name: tensor for path in shards for name, tensor in load_file(path).items()}
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(stored)
    assert "embed_tokens.weight" not in stored and "lm_head.weight" not in stored
    assert all(t.dtype == torch.bfloat16 for t in stored.values() if t.is_floating_point())
    # Trained: the warm start zeroes Markov W2, which the 2 steps moved.
    assert stored["markov_head.markov_w2.weight"].abs().sum() > 0

    target, _ = load_reference_target(dtype=torch.bfloat16)
    reloaded = DSparkForCausalLM.from_pretrained(folder, verifier=target, dtype=torch.bfloat16).state_dict()
    assert set(reloaded) == set(stored) | {"embed_tokens.weight", "lm_head.weight"}
    assert all(torch.equal(reloaded[name], tensor) for name, tensor in stored.items())
    assert torch.equal(reloaded["embed_tokens.weight"], target.get_input_embeddings().weight)
    assert torch.equal(reloaded["lm_head.weight"], target.get_output_embeddings().weight)
    assert summary["drafter"]["reloads_exactly"] is True


def test_without_a_gpu_the_full_run_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    module = load_script("examples/gpu_reference_run.py")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as raised:
        module.main(["--output_dir", str(tmp_path / "run"), "--minutes", "6"])
    assert raised.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--smoke" in lines[0]
    assert not (tmp_path / "run").exists()
