"""examples/gpu_smoke.py at its tiny sizes on the CPU: every section runs and reports what it measured."""

import json

import pytest
import torch
from conftest import load_script


@pytest.fixture(scope="module")
def smoke():
    return load_script("examples/gpu_smoke.py")


def test_tiny_smoke_run_covers_every_section(smoke, tmp_path, single_thread):
    report = smoke.main(["--tiny", "--output_dir", str(tmp_path)])
    assert json.loads((tmp_path / "gpu_smoke.json").read_text()) == json.loads(json.dumps(report))

    batch = report["shrinking_batch"]
    assert batch["first_row_ended_early"]
    assert batch["answer_lengths"][0] < max(batch["answer_lengths"][1:])

    drafting = report["drafting"]
    new = report["options"]["max_new_tokens"]
    for mode in ("greedy", "sampling", "threshold", "scheduling", "draft_vocab", "lookup_step_aside"):
        assert 0 < drafting[mode]["new_tokens"] <= new, mode
        assert drafting[mode]["rounds"] > 0, mode
    # float32 master weights under bf16 autocast on the CPU: greedy drafting is checked exactly elsewhere;
    # here every greedy mode must report where it left plain decoding (None: nowhere).
    assert all("first_divergence_from_plain" in drafting[m] for m in ("greedy", "threshold", "scheduling"))
    assert set(drafting["lookup_step_aside"]["sources"]) <= {"dspark", "lookup", "plain"}

    training = report["training"]
    assert training["steps"] == 2 and len(training["losses"]) == 2
    assert training["parameter_dtypes"] == ["torch.float32"]
    assert training["reload_exact"] and training["draft_vocab_after_reload"]
    assert not any(tmp_path.glob("tmp*")), "the training scratch folder is removed"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device runs the full sizes")
def test_full_sizes_need_a_gpu(smoke, tmp_path):
    with pytest.raises(SystemExit, match="no CUDA device"):
        smoke.main(["--output_dir", str(tmp_path)])
