"""Every `dspark` command against bad input: one line on stderr that names the problem, the exit code of the
convention (2 bad input, 1 a check that found faults), no traceback, nothing written, no file changed.

The commands run in-process on tiny models saved to a temporary folder, so nothing here loads the reference
target or trains.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_chat_tokenizer, make_tiny_drafter, make_tiny_target

from dspark_hf import DSparkForCausalLM
from dspark_hf.cli import main
from dspark_hf.errors import InputError, is_local_path
from dspark_hf.training.data import read_jsonl

FIXTURE = Path(__file__).parent / "fixtures" / "deepspec_vanilla_conf"
PROGRESS_BAR = re.compile(r"^[\w ]+: +\d+%\|.*\| \d+/\d+ \[")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Good and bad folders and files, shared by every case (and checked to stay unchanged)."""
    root = tmp_path_factory.mktemp("world")
    tokenizer = make_chat_tokenizer()
    for name, hidden_size in (("target", 32), ("other_target", 48)):
        target = make_tiny_target(vocab_size=len(tokenizer), hidden_size=hidden_size)
        target.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        make_tiny_drafter(target, seed=0).save_pretrained(root / f"{name}_drafter")
    (root / "empty").mkdir()
    shutil.copytree(root / "target_drafter", root / "bad_json")
    (root / "bad_json" / "config.json").write_text('{"model_type": "dspark"\n"block_size": 4}\n')
    shutil.copytree(root / "target_drafter", root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(FIXTURE, root / "deepspec")
    rows = ['{"prompt": "What is 2 + 2?", "response": "The answer is 4."}'] * 4
    (root / "rows.jsonl").write_text("\n".join(rows) + "\n")
    (root / "empty.jsonl").write_text("\n")
    (root / "bad.jsonl").write_text(rows[0] + '\n{"prompt": "hello", "response": \n')
    prompts_only = '{"messages": [{"role": "user", "content": "hello there"}]}'
    (root / "prompts_only.jsonl").write_text((prompts_only + "\n") * 3)
    (root / "bad.json").write_text('{"gsm8k": {"tau": 2.0,}}')
    (root / "list.json").write_text("[1, 2]")
    (root / "a_file").write_text("not a folder")
    return root


def report_lines(err: str) -> list[str]:
    """The lines of stderr, less the progress bars of models that loaded before the bad input was found."""
    lines = [line.split("\r")[-1] for line in err.splitlines()]
    return [line for line in lines if line and not PROGRESS_BAR.match(line)]


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


# In the cases' arguments, @ stands for the world folder and OUT for an output folder that must not appear.
CASES = {
    "convert": [
        (["convert", "@/missing", "OUT"], 2, r"drafter folder \S+/missing does not exist"),
        (["convert", "@/empty", "OUT"], 2, r"drafter folder \S+/empty holds no config\.json"),
        (["convert", "@/bad_json", "OUT"], 2, r"bad_json/config\.json is not valid JSON: Expecting ','"),
        (["convert", "@/truncated", "OUT"], 2, r"truncated/model\.safetensors is not a complete safetensors"),
        (["convert", "@/target", "OUT"], 2, r"Not a DSpark checkpoint: model_type='llama'"),
        (["convert", "@/target_drafter", "OUT", "--to", "gguf"], 2, r"--format/--to: invalid choice"),
        (["convert", "@/deepspec", "OUT", "--verifier", "@/missing"], 2, r"verifier \S+/missing does not"),
        (["convert", "@/target_drafter", "@/target_drafter"], 2, "destination must differ"),
    ],
    "check": [
        (["check", "@/missing", "@/target_drafter"], 2, r"target \S+/missing does not exist"),
        (["check", "@/empty", "@/target_drafter"], 2, r"target \S+/empty holds no config\.json"),
        (["check", "@/target", "@/missing"], 2, r"drafter folder \S+/missing does not exist"),
        (["check", "@/target", "@/bad_json"], 2, r"bad_json/config\.json is not valid JSON"),
        (["check", "@/target", "@/truncated"], 2, r"model\.safetensors is not a complete safetensors"),
        (["check", "@/target", "@/target"], 2, r"Not a DSpark checkpoint"),
        (["check", "@/target", "@/target_drafter", "--max_new_tokens", "x"], 2, r"invalid int value: 'x'"),
        (["check", "@/target", "@/other_target_drafter"], 1, r"structural fault: .*hidden_size"),
    ],
    "push": [
        (["push", "@/missing", "org/name"], 2, r"drafter folder \S+/missing does not exist"),
        (["push", "@/empty", "org/name"], 2, r"holds no config\.json"),
        (["push", "@/bad_json", "org/name"], 2, r"config\.json is not valid JSON"),
        (["push", "@/truncated", "org/name"], 2, r"not a complete safetensors file"),
        (["push", "@/target_drafter", "org//name"], 2, r"repo id 'org//name' is not a Hub repo id"),
        (["push", "@/target_drafter", "org/name", "--results", "@/missing.json"], 2,
         r"--results file \S+/missing\.json does not exist"),
        (["push", "@/target_drafter", "org/name", "--results", "@/bad.json"], 2,
         r"bad\.json is not valid JSON: Expecting property name"),
        (["push", "@/target_drafter", "org/name", "--results", "@/list.json"], 2,
         r"holds a JSON list; expected an object"),
        (["push", "@/target_drafter", "org/name", "--private", "maybe"], 2, r"argument --private"),
    ],
    "calibrate": [
        (["calibrate", "@/missing"], 2, r"drafter folder \S+/missing does not exist"),
        (["calibrate", "@/empty"], 2, r"holds no config\.json"),
        (["calibrate", "@/bad_json"], 2, r"config\.json is not valid JSON"),
        (["calibrate", "@/truncated"], 2, r"not a complete safetensors file"),
        (["calibrate", "@/deepspec"], 2, r"deepspec layout.*--output_dir"),
        (["calibrate", "@/target_drafter", "--max_new_tokens", "x"], 2, r"invalid int value: 'x'"),
        (["calibrate", "@/target_drafter", "--prompts_per_set", "0"], 2, r"--prompts_per_set must be >= 1"),
        (["calibrate", "@/target_drafter", "--target", "@/missing", "--output_dir", "OUT"], 2,
         r"target \S+/missing does not exist"),
        (["calibrate", "@/target_drafter", "--target", "@/other_target", "--output_dir", "OUT"], 2,
         r"The drafter does not fit the target"),
    ],
    "train": [
        (["train", "--target", "@/target", "--dataset", "@/missing.jsonl"], 2,
         r"--dataset \S+/missing\.jsonl does not exist"),
        (["train", "--target", "@/target", "--dataset", "@/empty.jsonl"], 2, r"empty\.jsonl holds no rows"),
        (["train", "--target", "@/target", "--dataset", "@/bad.jsonl"], 2,
         r"bad\.jsonl line 2 is not valid JSON"),
        (["train", "--target", "@/target", "--dataset", "@/prompts_only.jsonl"], 2,
         r"prompts_only\.jsonl: Row 0: Conversation has no assistant message"),
        (["train", "--target", "@/missing", "--dataset", "@/rows.jsonl"], 2, r"target \S+/missing does not"),
        (["train", "--target", "@/empty", "--dataset", "@/rows.jsonl"], 2, r"empty holds no config\.json"),
        (["train", "--target", "@/target", "--dataset", "@/rows.jsonl", "--drafter", "@/truncated"], 2,
         r"not a complete safetensors file"),
        (["train", "--target", "@/target", "--dataset", "@/rows.jsonl", "--drafter",
          "@/other_target_drafter"], 2, r"The drafter does not fit the target"),
        (["train", "--target", "@/target", "--dataset", "@/rows.jsonl", "--resume"], 2,
         r"--resume: \S+ holds no checkpoint to resume from"),
        (["train", "--max_steps", "many"], 2, r"argument --max_steps.*invalid int value: 'many'"),
    ],
    "quickstart": [
        (["quickstart", "--max_steps", "3.5"], 2, r"invalid int value: '3\.5'"),
        (["quickstart", "--bf16", "maybe"], 2, r"argument --bf16"),
        (["quickstart", "--recipe", "eagle"], 2, r"argument --recipe: invalid choice: 'eagle'"),
        (["quickstart", "--markov_head_type", "lstm"], 2, r"invalid choice: 'lstm'"),
        (["quickstart", "--num_hidden_layers", "0"], 2, r"--num_hidden_layers must be > 0"),
        (["quickstart", "--max_train_minutes", "0"], 2, r"--max_train_minutes must be > 0"),
        (["quickstart", "--output_dir", "@/a_file"], 2, r"--output_dir \S+/a_file is a file"),
    ],
    "data": [
        (["data", "--batch_size", "x"], 2, r"argument --batch_size/--batch-size: invalid int value: 'x'"),
        (["data", "--dtype", "float16"], 2, r"--dtype must be one of .*'float16'"),
        (["data", "--chunk_size", "0"], 2, r"--chunk_size must be >= 1"),
        (["data", "--num_prompts", "-1"], 2, r"--num_prompts must be >= 0"),
        (["data", "--output", "@/empty"], 2, r"--output \S+/empty is a folder"),
        (["data", "--output", "@/missing.jsonl", "--num_prompts", "0", "--vendor_to", "OUT/a.jsonl.gz"], 2,
         r"answer cache \S+/missing\.jsonl does not exist"),
        (["data", "--output", "@/bad.jsonl", "--num_prompts", "0", "--vendor_to", "OUT/a.jsonl.gz"], 2,
         r"bad\.jsonl line 2 is not valid JSON"),
    ],
}  # fmt: skip
TABLE = [(command, *case) for command, cases in CASES.items() for case in cases]


def test_the_table_covers_every_subcommand_five_times():
    from dspark_hf.cli import _commands

    assert set(CASES) == set(_commands())
    assert min(len(cases) for cases in CASES.values()) >= 5


@pytest.mark.parametrize(
    "command, argv, code, message", TABLE, ids=[f"{c}-{i}" for c in CASES for i in range(len(CASES[c]))]
)
def test_bad_input_is_one_line(command, argv, code, message, world, tmp_path, capfd, single_thread):
    out = tmp_path / "out"
    argv = [arg.replace("@", str(world)).replace("OUT", str(out)) for arg in argv]
    before = snapshot(world)
    capfd.readouterr()
    with pytest.raises(SystemExit) as raised:
        main(argv)
    err = capfd.readouterr().err
    assert raised.value.code == code, err
    lines = report_lines(err)
    assert len(lines) == 1, err
    assert re.match(rf"dspark {command}: (error: )?.*{message}", lines[0]), lines[0]
    assert "Traceback" not in err
    assert not out.exists(), "nothing is written on bad input"
    assert snapshot(world) == before, "no existing file changes on bad input"


# ---- the switch that shows tracebacks, and the real process ------------------------------------------------


def test_debug_shows_the_traceback(world, monkeypatch):
    argv = ["convert", str(world / "bad_json"), str(world / "out")]
    with pytest.raises(InputError, match="config.json is not valid JSON"):
        main(["--debug", *argv])
    monkeypatch.setenv("DSPARK_DEBUG", "1")
    with pytest.raises(InputError):
        main(argv)


def test_the_process_exits_with_one_line(world):
    argv = [sys.executable, "-m", "dspark_hf.cli", "check", str(world / "target"), str(world / "missing")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"dspark check: drafter folder {world / 'missing'} does not exist."]


# ---- the loaders a user calls from Python ------------------------------------------------------------------


def test_loaders_name_a_missing_local_path_not_a_malformed_repo_id(world, tmp_path):
    from dspark_hf.formats.registry import load_config

    for path in (
        world / "missing",
        str(world / "missing"),
        "./missing-drafter",
        "~/missing/drafter",
        "a/b/c",
    ):
        with pytest.raises(InputError, match="does not exist"):
            DSparkForCausalLM.from_pretrained(path)
        with pytest.raises(InputError, match="does not exist"):
            load_config(path)
    with pytest.raises(InputError, match="verifier .* does not exist"):
        DSparkForCausalLM.from_pretrained(world / "deepspec", verifier=world / "missing")
    with pytest.raises(InputError, match=r"bad_json/config\.json is not valid JSON"):
        DSparkForCausalLM.from_pretrained(world / "bad_json")
    with pytest.raises(InputError, match=r"truncated/model\.safetensors is not a complete"):
        DSparkForCausalLM.from_pretrained(world / "truncated")
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(world / "target_drafter" / "config.json", config_only)
    with pytest.raises(InputError, match="holds no safetensors weights"):
        DSparkForCausalLM.from_pretrained(config_only)
    with pytest.raises(InputError, match=r"line 2 is not valid JSON"):
        read_jsonl(world / "bad.jsonl")


def test_hub_ids_stay_hub_ids(world, monkeypatch):
    """Only names that cannot be repo ids, or whose first folder exists here, are taken as local paths."""
    monkeypatch.chdir(world)
    for name in ("gpt2", "org/model", "HuggingFaceTB/SmolLM2-135M-Instruct", "missing/model"):
        assert not is_local_path(name)
    for name in ("target", "./model", "../model", "/abs/model", "~/model", "a/b/c", "empty/model", Path("x")):
        assert is_local_path(name)
