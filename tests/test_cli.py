"""The `dspark` command line: every subcommand's argument parsing, its errors and exit codes.

The workflows behind the commands have their own tests; here they are replaced by recorders where running them
would take longer than a few seconds, so what is checked is what the flags turn into.
"""

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

import dspark_hf.hub.push
import dspark_hf.reference.onpolicy
import dspark_hf.reference.quickstart
import dspark_hf.training.workflow
from dspark_hf.cli import main
from dspark_hf.formats.registry import detect_layout

FIXTURE = Path(__file__).parent / "fixtures" / "deepspec_vanilla_conf"
COMMANDS = ["train", "quickstart", "data", "calibrate", "convert", "check", "push"]


def exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as raised:
        main(argv)
    return raised.value.code


def refusal(argv: list[str], capsys) -> str:
    """The one line on stderr of a command refused as bad input (exit code 2)."""
    capsys.readouterr()
    assert exit_code(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def record(monkeypatch):
    """Replace `module.name` by a recorder of its arguments returning `result`; returns the calls list."""
    calls = []

    def install(module, name: str, result=None):
        def recorder(*args, **kwargs):
            calls.append((args, kwargs))
            return result

        monkeypatch.setattr(module, name, recorder)
        return calls

    return install


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    assert exit_code([command, "--help"]) == 0
    assert f"dspark {command}" in capsys.readouterr().out


def test_the_top_level_needs_a_known_subcommand(capsys):
    assert exit_code([]) == 2
    assert exit_code(["serve"]) == 2
    assert "invalid choice: 'serve'" in capsys.readouterr().err
    assert exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(command in out for command in COMMANDS)


# ---- dspark train ------------------------------------------------------------------------------------------


def test_train_help_lists_every_training_argument_with_its_default(capsys):
    exit_code(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--num_anchors", "--max_train_minutes", "--markov_head_lr_multiplier", "--learning_rate"):
        assert flag in out
    assert "--num-layers" in out and "--dataset_path" in out  # spellings kept as aliases
    assert "Maximum number of block anchors sampled per sequence. (default: 512)" in out
    assert "(default: dspark-drafter)" in out


def test_train_flags_become_the_script_and_training_arguments(record, tmp_path):
    calls = record(dspark_hf.training.workflow, "train_drafter", result={})
    rows = tmp_path / "rows.jsonl"
    main(["train", "--target", "t", "--dataset", str(rows), "--num-layers", "2", "--markov-head", "rnn",
          "--max-steps", "5", "--learning_rate", "1e-4", "--num_anchors", "8", "--resume"])  # fmt: skip
    (script_args, training_args), _ = calls[0]
    assert (script_args.target, script_args.dataset, script_args.resume) == ("t", str(rows), True)
    assert script_args.drafter_overrides() == {"num_hidden_layers": 2, "markov_head_type": "rnn"}
    assert (training_args.max_steps, training_args.learning_rate, training_args.num_anchors) == (5, 1e-4, 8)
    assert training_args.output_dir == "dspark-drafter"
    main(["train"])
    (script_args, training_args), _ = calls[1]
    assert script_args.target is None and script_args.drafter_overrides() == {}
    assert training_args.num_anchors == 512 and training_args.learning_rate == 6e-4


def test_the_readme_train_command_parses(record):
    """README's `dspark train` example uses flags that exist (README and `dspark train --help` agree)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = [block.split("```")[0] for block in readme.split("```bash")[1:]]
    command = next(block for block in blocks if block.lstrip().startswith("dspark train"))
    calls = record(dspark_hf.training.workflow, "train_drafter", result={})
    argv = shlex.split(command.replace("\\\n", " "))[1:]
    main([flag for flag in argv if flag != "--bf16"])  # bfloat16 needs a GPU here
    (script_args, training_args), _ = calls[0]
    assert script_args.target and script_args.dataset and training_args.output_dir != "dspark-drafter"


def test_train_recipe_sets_the_drafter_and_the_loss_weights(record):
    calls = record(dspark_hf.training.workflow, "train_drafter", result={})
    main(["train", "--recipe", "dflash", "--ce_weight", "0.5", "--max_steps", "1"])
    (script_args, training_args), _ = calls[0]
    assert script_args.recipe == "dflash" and training_args.max_steps == 1
    trained_with = dspark_hf.training.workflow.with_recipe(training_args, script_args.recipe)
    assert (trained_with.ce_weight, trained_with.l1_weight) == (1.0, 0.0)  # the recipe's win
    assert (trained_with.max_steps, trained_with.output_dir) == (1, training_args.output_dir)
    assert exit_code(["train", "--recipe", "eagle"]) == 2


def test_train_defaults_to_the_quickstart_data_and_checks_its_recipe(tmp_path):
    from dspark_hf.reference.quickstart import train_quickstart_drafter
    from dspark_hf.training.arguments import DSparkTrainingArguments
    from dspark_hf.training.data import reference_training_rows
    from dspark_hf.training.workflow import TrainScriptArguments, train_drafter, training_rows, with_recipe

    assert train_quickstart_drafter is not train_drafter
    rows = training_rows(TrainScriptArguments(), None, None, str(tmp_path))
    assert rows == reference_training_rows("train") and len(rows) > 2000
    args = DSparkTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert with_recipe(args, None) is args and with_recipe(args, "dflash_same_recipe") is args
    with pytest.raises(ValueError, match="--recipe dflash defines a new drafter"):
        TrainScriptArguments(recipe="dflash", drafter="folder")


def test_train_regenerates_in_batches_of_the_given_size(record, tmp_path):
    from dspark_hf.training.workflow import TrainScriptArguments, training_rows

    calls = record(dspark_hf.training.workflow, "regenerate_responses", result=[])
    rows = [{"prompt": "Hi", "response": "Hello"}, {"messages": [{"role": "user", "content": "Yo"}]}]
    script_args = TrainScriptArguments(regenerate=True, max_new_tokens=32, regenerate_batch_size=64)
    training_rows(script_args, None, None, str(tmp_path), rows)
    (prompts, *_), kwargs = calls[0]
    assert prompts == ["Hi", "Yo"] and kwargs == {"max_new_tokens": 32, "batch_size": 64}
    with pytest.raises(ValueError, match="--regenerate_batch_size must be >= 1"):
        TrainScriptArguments(regenerate_batch_size=0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--target", "t"], "--dataset is required with --target"),
        (["--drafter", "d", "--block_size", "3"], r"\['block_size'\] define a new drafter"),
        (["--num_anchors", "0"], "num_anchors must be >= 1"),
    ],
)
def test_train_refuses_inconsistent_arguments(record, argv, message, capsys):
    calls = record(dspark_hf.training.workflow, "train_drafter")
    assert re.match(f"dspark train: .*{message}", refusal(["train", *argv], capsys))
    assert calls == []


@pytest.mark.parametrize(
    "argv", [["--markov_head_type", "lstm"], ["--max_steps", "many"], ["--no-such-flag"], ["--bf16", "maybe"]]
)
def test_train_rejects_invalid_flags(argv):
    assert exit_code(["train", *argv]) == 2


# ---- dspark quickstart / data ------------------------------------------------------------------------------


def test_quickstart_flags_become_its_options(record, capsys):
    calls = record(dspark_hf.reference.quickstart, "run_quickstart")
    main(["quickstart", "--max-steps", "3", "--bf16", "true", "--recipe", "dflash"])
    (options,), _ = calls[0]
    assert (options.max_steps, options.bf16, options.recipe) == (3, True, "dflash")
    assert options.max_train_minutes == dspark_hf.reference.quickstart.QuickstartOptions.max_train_minutes
    assert exit_code(["quickstart", "--max-steps", "3.5"]) == 2
    assert exit_code(["quickstart", "--bf16", "maybe"]) == 2
    exit_code(["quickstart", "--help"])
    assert "(default: outputs/quickstart)" in " ".join(capsys.readouterr().out.split())


def test_data_flags_become_its_arguments(record, capsys):
    calls = record(dspark_hf.reference.onpolicy, "build_onpolicy_data")
    record(dspark_hf.reference.onpolicy, "onpolicy_summary", result={"rows": 0})
    main(["data", "--num-prompts", "4", "--sampled", "false", "--vendor-to", "vendored.jsonl.gz"])
    (options,), _ = calls[0]
    assert (options.num_prompts, options.sampled, options.vendor_to) == (4, False, "vendored.jsonl.gz")
    assert json.loads(capsys.readouterr().out) == {"rows": 0}
    assert exit_code(["data", "--batch-size", "x"]) == 2


# ---- dspark calibrate --------------------------------------------------------------------------------------


def test_calibrate_flags_become_the_workflow_arguments(record, tmp_path, capsys):
    report = dspark_hf.training.workflow.CalibrationReport(
        "table", 3, tmp_path / "config.json", [0.001, 0.002]
    )
    calls = record(dspark_hf.training.workflow, "calibrate_drafter", result=report)
    main(["calibrate", "drafter", "--prompts-per-set", "2", "--do-sample", "--profile-cost"])
    args, kwargs = calls[0]
    assert args == ("drafter", None) and kwargs["prompts_per_set"] == 2
    assert kwargs["do_sample"] and kwargs["profile_target_cost"] and kwargs["output_dir"] is None
    assert not kwargs["profile_small_batch_linears"]
    main(["calibrate", "drafter", "--profile-cost", "--small-batch-linears"])
    assert calls[1][1]["profile_small_batch_linears"]
    out = capsys.readouterr().out
    assert "3 rounds of sampling at temperature 1" in out and "(ms): 1.0, 2.0" in out
    assert exit_code(["calibrate"]) == 2  # the drafter folder is required
    assert exit_code(["calibrate", "drafter", "--max-new-tokens", "x"]) == 2


def test_calibrate_refuses_bad_folders_and_counts_before_loading_a_target(tmp_path, capsys):
    assert re.match(
        "dspark calibrate: .*deepspec layout.*--output_dir", refusal(["calibrate", str(FIXTURE)], capsys)
    )
    argv = ["calibrate", str(FIXTURE), "--output-dir", str(tmp_path / "out"), "--prompts-per-set", "0"]
    assert refusal(argv, capsys).startswith("dspark calibrate: --prompts_per_set must be >= 1")
    assert refusal(["calibrate", str(tmp_path)], capsys).startswith("dspark calibrate: ")  # no checkpoint


# ---- dspark convert / check / push -------------------------------------------------------------------------


def test_convert_end_to_end_and_its_errors(tmp_path, capsys):
    main(["convert", str(FIXTURE), str(tmp_path / "native"), "--to", "native"])
    assert detect_layout(tmp_path / "native") == "native"
    assert "Wrote the native-layout checkpoint" in capsys.readouterr().out
    assert exit_code(["convert", str(FIXTURE), str(tmp_path / "x"), "--format", "gguf"]) == 2
    assert exit_code(["convert", str(FIXTURE)]) == 2
    assert refusal(["convert", str(tmp_path / "missing"), str(tmp_path / "out")], capsys).startswith(
        "dspark convert: "
    )


def test_check_arguments():
    assert exit_code(["check", "target-only"]) == 2
    assert exit_code(["check", "target", "drafter", "--max-new-tokens", "x"]) == 2


def test_push_flags_become_the_publish_call(record, tmp_path, capsys):
    commit = type(
        "Commit", (), {"repo_url": type("Url", (), {"url": "https://hf.co/org/d"}), "commit_url": "c"}
    )
    calls = record(dspark_hf.hub.push, "push_folder", result=commit)
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"gsm8k": {"tau": 2.0, "speedup": 1.5}}))
    main(["push", "folder", "org/d", "--private", "--results", str(results)])
    args, kwargs = calls[0]
    assert args == ("folder", "org/d") and kwargs == {
        "private": True,
        "results": {"gsm8k": {"tau": 2.0, "speedup": 1.5}},
    }
    assert "Published folder to https://hf.co/org/d" in capsys.readouterr().out
    main(["push", "folder", "org/d"])
    assert calls[1][1] == {"private": None, "results": None}
    assert exit_code(["push", "folder"]) == 2


@pytest.mark.parametrize("native, expected", [(True, "auto"), (False, torch.float32)])
def test_train_loads_a_target_in_bfloat16_only_where_the_cpu_multiplies_it_natively(
    monkeypatch, native, expected
):
    from dspark_hf.training import workflow

    monkeypatch.setattr(workflow, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(workflow.torch.cuda, "is_available", lambda: False)
    assert workflow.target_load_dtype() == expected


def test_train_layer_init_flag_reaches_a_fresh_drafter(record):
    calls = record(dspark_hf.training.workflow, "train_drafter", result={})
    main(["train", "--layer_init", "target"])
    (script_args, _), _ = calls[0]
    assert script_args.layer_init == "target"
    assert exit_code(["train", "--layer_init", "copy"]) == 2
