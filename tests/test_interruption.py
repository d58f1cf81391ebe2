"""Ctrl-C (SIGINT) during `dspark train`, `dspark data` and `dspark quickstart` leaves a checkpoint or cache
to resume from and says how (exit code 130); resuming continues where the run stopped."""

import json
import signal

import pytest
from conftest import make_chat_tokenizer, make_tiny_target

import dspark_hf.reference.onpolicy
import dspark_hf.reference.quickstart
import dspark_hf.reference.target
import dspark_hf.training.workflow
from dspark_hf import DSparkForCausalLM
from dspark_hf.cli import main
from dspark_hf.training import data
from dspark_hf.training.trainer import DSparkTrainer


def interrupted(argv: list[str], capfd) -> str:
    """The last stderr line of a command that was interrupted (exit code 130)."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as raised:
        main(argv)
    err = capfd.readouterr().err
    assert raised.value.code == 130, err
    assert "Traceback" not in err
    return err.splitlines()[-1]


@pytest.fixture
def tiny_target(tmp_path):
    tokenizer = make_chat_tokenizer()
    # Spare ids past the tokenizer's: one becomes the drafter's mask token.
    target = make_tiny_target(vocab_size=len(tokenizer) + 4, eos_token_id=tokenizer.eos_token_id)
    target.save_pretrained(tmp_path / "target")
    tokenizer.save_pretrained(tmp_path / "target")
    return target, tokenizer


def test_ctrl_c_in_dspark_train_saves_a_checkpoint_that_resumes(tiny_target, tmp_path, monkeypatch, capfd,
                                                                single_thread):  # fmt: skip
    rows = [{"prompt": f"What is {i} + {i}?", "response": f"The answer is {2 * i}."} for i in range(6)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "drafter"
    argv = ["train", "--target", str(tmp_path / "target"), "--dataset", str(tmp_path / "rows.jsonl"),
            "--output_dir", str(output), "--max_steps", "4", "--num_hidden_layers", "1", "--block_size", "3",
            "--num_anchors", "4", "--per_device_train_batch_size", "2", "--report_to", "none"]  # fmt: skip
    steps, pressed = [], []
    compute_loss = DSparkTrainer.compute_loss
    handler = signal.getsignal(signal.SIGINT)  # the default one, or SIG_IGN in a background job

    def ctrl_c_in_the_second_step(self, *args, **kwargs):
        steps.append(self.state.global_step)
        if self.state.global_step == 1 and not pressed:
            pressed.append(True)
            signal.raise_signal(signal.SIGINT)
        return compute_loss(self, *args, **kwargs)

    monkeypatch.setattr(DSparkTrainer, "compute_loss", ctrl_c_in_the_second_step)
    message = interrupted(argv, capfd)
    checkpoint = output / "checkpoint-2"
    assert (
        message
        == f"dspark train: interrupted; saved {checkpoint}; resume with: dspark {' '.join(argv)} --resume"
    )
    assert checkpoint.is_dir() and not (output / "model.safetensors").exists()  # stopped after that step

    steps.clear()
    main([*argv, "--resume"])
    assert steps == [2, 3]  # the steps after the checkpoint, no more
    assert DSparkForCausalLM.from_pretrained(output).config.block_size == 3
    assert signal.getsignal(signal.SIGINT) == handler  # the handler is put back


def test_ctrl_c_in_dspark_data_keeps_the_finished_answers(tiny_target, tmp_path, monkeypatch, capfd):
    prompts = ["hello there", "What is 2 + 2?", "how are you?"]
    monkeypatch.setattr(
        dspark_hf.reference.onpolicy,
        "training_prompt_pool",
        lambda limit: [{"prompt": p} for p in prompts][:limit],
    )
    monkeypatch.setattr(dspark_hf.reference.target, "load_reference_target", lambda **kwargs: tiny_target)
    decode = data.decode_shrinking_batch

    def ctrl_c_after_one_answer(model, input_ids, *args, on_finished, **kwargs):
        on_finished(0, [5, 6, 7])
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "decode_shrinking_batch", ctrl_c_after_one_answer)
    cache = tmp_path / "answers.jsonl"
    argv = [
        "data",
        "--output",
        str(cache),
        "--num_prompts",
        "3",
        "--sampled",
        "false",
        "--max_new_tokens",
        "4",
    ]
    message = interrupted(argv, capfd)
    assert message == (
        f"dspark data: interrupted; the answers finished so far are in {cache}; "
        f"resume with the same command: dspark {' '.join(argv)}"
    )
    assert len(cache.read_text().splitlines()) == 1

    monkeypatch.setattr(data, "decode_shrinking_batch", decode)
    main(argv)
    assert json.loads(capfd.readouterr().out)["answers"] == 3
    assert len(cache.read_text().splitlines()) == 3  # the saved answer was kept, the others added


def test_ctrl_c_in_dspark_quickstart_says_how_to_resume(tmp_path, monkeypatch, capfd):
    output = tmp_path / "quickstart"
    calls = []

    def interrupted_while_training(options):
        calls.append(options)
        (output / "checkpoints" / "checkpoint-3").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(dspark_hf.reference.quickstart, "run_quickstart", interrupted_while_training)
    argv = ["quickstart", "--output_dir", str(output)]
    message = interrupted(argv, capfd)
    checkpoint = output / "checkpoints" / "checkpoint-3"
    resume = f"dspark {' '.join(argv)} --resume"
    assert message == f"dspark quickstart: interrupted; saved {checkpoint}; resume with: {resume}"
    assert not calls[0].resume
    monkeypatch.setattr(dspark_hf.reference.quickstart, "run_quickstart", calls.append)
    main([*argv, "--resume"])
    assert calls[1].resume


def test_ctrl_c_elsewhere_exits_130_in_one_line(monkeypatch, capfd):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dspark_hf.training.workflow, "calibrate_drafter", ctrl_c)
    assert interrupted(["calibrate", "drafter"], capfd) == "dspark calibrate: interrupted."
