"""Model cards, Hub publishing and trust-free loading by Hub id.

The Hugging Face Hub is unreachable here, so publishing runs against `HubStandIn`, an in-memory stand-in
of the Hub's HTTP API installed at huggingface_hub's HTTP boundary (`set_client_factory` with an httpx
mock transport): every `HfApi` call our code makes (create repo, validate the card's YAML, preupload,
commit) and the download calls of `snapshot_download` run huggingface_hub's real client code and reach the
stand-in instead of the network. The stand-in marks every file as a "regular" upload, so contents travel
inline in the commit payload; the real Hub routes weights through its LFS/Xet storage, a transport this
package does not touch.
"""

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx2
import pytest
import torch
import yaml
from conftest import make_tiny_drafter, make_tiny_target
from huggingface_hub import snapshot_download
from huggingface_hub.utils import _http
from safetensors.torch import load, load_file, save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoModel, LlamaForCausalLM, PreTrainedTokenizerFast

from dspark_hf import DSparkForCausalLM
from dspark_hf.cli import main
from dspark_hf.hub.model_card import read_card_metadata, render_model_card, write_model_card

TARGET_ID, DRAFTER_ID = "test-org/tiny-target", "test-org/tiny-dspark"
TRAINING_INFO = {
    "dataset": ["mlabonne/open-perfectblend", "/local/regenerated.jsonl"],
    "epochs": 2,
    "steps": 1200,
    "learning_rate": 6e-4,
    "final_metrics": {"loss": 0.8125, "acceptance": 0.61},
}
RESULTS = {
    "gsm8k": {"tau": 3.125, "speedup": 1.4},
    "mt-bench": {"tau": 2.5},
    "temperature": 0.0,
    "command": "dspark bench test-org/tiny-dspark --datasets gsm8k mt-bench",
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class HubStandIn:
    """In-memory Hub: repos, commits of inline files, repo info, tree listing and file resolution."""

    repo_route = re.compile(
        r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<op>preupload|commit|revision|tree)/[^/]+$"
    )
    resolve_route = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")

    def __init__(self):
        self.repos: dict[str, dict] = {}

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path, method = request.url.path, request.method
        if method == "POST" and path == "/api/repos/create":
            body = json.loads(request.content)
            repo_id = f"{body['organization']}/{body['name']}"
            if repo_id in self.repos:
                return httpx2.Response(409, json={"error": "You already created this model repo"})
            self.repos[repo_id] = {"visibility": body.get("visibility"), "files": {}, "sha": "0" * 40}
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{repo_id}"})
        if method == "POST" and path == "/api/validate-yaml":
            content = json.loads(request.content)["content"]
            try:
                yaml.safe_load(content.split("---")[1])
            except yaml.YAMLError as err:
                return httpx2.Response(400, json={"errors": [{"message": str(err)}]})
            return httpx2.Response(200, json={"warnings": []})
        if match := self.repo_route.match(path):
            repo = self.repos.get(match["repo"])
            if repo is None:
                return httpx2.Response(404, json={"error": "Repository not found"})
            return getattr(self, f"_{match['op']}")(match["repo"], repo, request)
        if (match := self.resolve_route.match(path)) and match["repo"] in self.repos:
            repo = self.repos[match["repo"]]
            content = repo["files"].get(match["file"])
            if content is None:
                return httpx2.Response(404, json={"error": "Entry not found"})
            headers = {"X-Repo-Commit": repo["sha"], "ETag": f'"{self._blob_id(content)}"'}
            headers["Content-Length"] = str(len(content))
            return httpx2.Response(200, headers=headers, content=b"" if method == "HEAD" else content)
        return httpx2.Response(501, json={"error": f"stand-in does not implement {method} {path}"})

    @staticmethod
    def _blob_id(content: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()

    def _preupload(self, repo_id, repo, request):
        files = json.loads(request.content)["files"]
        modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
        return httpx2.Response(200, json={"files": modes})

    def _commit(self, repo_id, repo, request):
        lines = [json.loads(line) for line in request.content.decode().splitlines()]
        for line in lines[1:]:  # the first line is the commit header
            if line["key"] != "file":
                return httpx2.Response(
                    400, json={"error": f"stand-in accepts inline files only: {line['key']}"}
                )
            repo["files"][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        repo["sha"] = hashlib.sha1(json.dumps(lines, sort_keys=True).encode()).hexdigest()
        url = f"https://huggingface.co/{repo_id}/commit/{repo['sha']}"
        return httpx2.Response(200, json={"commitUrl": url, "commitOid": repo["sha"], "pullRequestUrl": None})

    def _revision(self, repo_id, repo, request):
        siblings = [{"rfilename": name} for name in repo["files"]]
        return httpx2.Response(200, json={"id": repo_id, "sha": repo["sha"], "siblings": siblings})

    def _tree(self, repo_id, repo, request):
        entries = [
            {"type": "file", "path": name, "size": len(content), "oid": self._blob_id(content)}
            for name, content in repo["files"].items()
        ]
        return httpx2.Response(200, json=entries)


@pytest.fixture
def hub():
    stand_in = HubStandIn()
    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(stand_in)))
    yield stand_in
    _http.set_client_factory(_http.default_client_factory)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    """A tiny random Llama target with a word-level tokenizer and a chat template, saved like a Hub repo."""
    folder = tmp_path_factory.mktemp("target")
    tokens = [
        "<unk>",
        "<eos>",
        "<|user|>",
        "<|assistant|>",
        *"explain speculative decoding in two sentences".split(),
    ]
    tokens += [f"word{i}" for i in range(64 - len(tokens))]  # every id the target can emit decodes to text
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tokenizer.save_pretrained(folder)
    target = make_tiny_target(hidden_size=64, num_hidden_layers=6, bos_token_id=None, eos_token_id=None,
                              pad_token_id=1)  # fmt: skip
    target.save_pretrained(folder)
    return folder


@pytest.fixture
def drafter(target_dir):
    torch.manual_seed(1)
    target = LlamaForCausalLM.from_pretrained(target_dir)
    return make_tiny_drafter(
        target, num_hidden_layers=2, markov_rank=16, block_size=4, target_model_name_or_path=TARGET_ID
    ).eval()


def _inputs(model: DSparkForCausalLM) -> dict[str, torch.Tensor]:
    config, context = model.config, 5
    generator = torch.Generator().manual_seed(2)
    block = torch.full((1, config.block_size), config.mask_token_id)
    block[0, 0] = 7
    return {
        "input_ids": block,
        "target_hidden_states": torch.randn(
            1, context, config.num_features * config.hidden_size, generator=generator
        ),
        "position_ids": torch.arange(context + config.block_size).unsqueeze(0),
        "prev_token_ids": torch.randint(0, config.vocab_size, (1, config.block_size), generator=generator),
    }


def _outputs(model: DSparkForCausalLM, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    return {"logits": out.logits, "confidence_logits": out.confidence_logits}


def _split_card(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def _quickstart(body: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert len(blocks) == 1, "the card must hold exactly one python block, the quick-start"
    return blocks[0]


def test_card_metadata_and_body_for_a_real_drafter(drafter):
    card = render_model_card(drafter, TRAINING_INFO, RESULTS, repo_id=DRAFTER_ID, license="apache-2.0")
    meta, body = _split_card(card)
    assert meta["library_name"] == "dspark_hf"
    assert meta["base_model"] == TARGET_ID
    assert {"speculative-decoding", "dspark"} <= set(meta["tags"])
    assert meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["mlabonne/open-perfectblend"]  # local paths are not Hub datasets
    assert meta["dspark"] == {"training": TRAINING_INFO, "results": RESULTS}

    config = drafter.config
    assert "{{ " not in body and "{%" not in body  # nothing left unrendered
    assert body.startswith(f"\n# DSpark drafter for {TARGET_ID}\n")
    for row in [
        f"| Block size (tokens drafted per round) | {config.block_size} |",
        f"| Draft layers | {config.num_hidden_layers} |",
        "| Sequential head | vanilla (low-rank token transition), rank 16 |",
        "| Confidence head | yes (hidden state + Markov embedding) |",
        f"| Target layers read | {config.target_layer_ids} of 6 |",
        "| gsm8k | 3.12 | 1.40x |",
        "| mt-bench | 2.50 | not measured |",
        "- **Temperature:** 0",
        f"```bash\n{RESULTS['command']}\n```",
        "- **Dataset:** mlabonne/open-perfectblend, /local/regenerated.jsonl",
        "- **Learning rate:** 0.0006",
        "| acceptance | 0.61 |",
        "Released under `apache-2.0`.",
        "title  = {DSpark: Confidence-Scheduled Speculative Decoding with Semi-Autoregressive Generation}",
        "author = {{DeepSeek-AI} and {Peking University}}",
    ]:
        assert row in body, row
    code = _quickstart(body)
    assert code.startswith("import dspark_hf")
    assert f'AutoModel.from_pretrained("{DRAFTER_ID}"' in code and "drafter.attach_target(target)" in code
    assert "assistant_model=drafter" in code


def test_card_of_a_local_folder_suggests_a_push_to_a_hub_id_not_to_the_folder(drafter, tmp_path):
    folder = tmp_path / "outputs" / "drafter"
    write_model_card(drafter, folder)
    body = (folder / "README.md").read_text()
    assert "dspark push <this folder> <org>/<name> --results results.json" in body
    assert f'AutoModel.from_pretrained("{folder}"' in body


def test_card_without_results_or_training_and_bad_results(drafter):
    drafter.config.target_model_name_or_path = None
    meta, body = _split_card(render_model_card(drafter, repo_id=DRAFTER_ID))
    assert "base_model" not in meta and "dspark" not in meta and meta["license"] == "other"
    assert "No measurements recorded yet" in body and "No training details recorded." in body
    assert f"dspark push <this folder> {DRAFTER_ID} --results" in body
    assert "replace `<target model id>`" in body
    with pytest.raises(ValueError, match="must hold a 'tau' value"):
        render_model_card(drafter, results={"gsm8k": {"speedup": 1.2}})
    with pytest.raises(ValueError, match="hold no dataset entry"):
        render_model_card(drafter, results={"command": "dspark bench"})


def test_quickstart_runs_as_written_against_saved_folders(drafter, target_dir, tmp_path, capsys):
    drafter_dir = tmp_path / "drafter"
    drafter.save_pretrained(drafter_dir)
    code = _quickstart(_split_card(render_model_card(drafter, repo_id=DRAFTER_ID))[1])
    assert code.count(f'"{TARGET_ID}"') == 2 and code.count(f'"{DRAFTER_ID}"') == 1
    code = code.replace(f'"{TARGET_ID}"', repr(str(target_dir))).replace(
        f'"{DRAFTER_ID}"', repr(str(drafter_dir))
    )
    namespace: dict = {}
    exec(compile(code, "model_card_quickstart", "exec"), namespace)

    outputs, inputs, target = namespace["outputs"], namespace["inputs"], namespace["target"]
    assert namespace["drafter"].last_stats.rounds > 0
    assert outputs.shape[1] == inputs["input_ids"].shape[1] + 128
    plain = target.generate(**inputs, max_new_tokens=128)
    assert torch.equal(outputs, plain), "assisted decoding must reproduce the target's greedy output"
    assert capsys.readouterr().out.strip()


def test_save_pretrained_writes_the_card(drafter, tmp_path):
    folder = tmp_path / "drafter"
    drafter.save_pretrained(folder, training_info=TRAINING_INFO, results=RESULTS)
    meta, body = _split_card((folder / "README.md").read_text())
    assert meta["library_name"] == "dspark_hf" and meta["base_model"] == TARGET_ID
    assert f'AutoModel.from_pretrained("{folder}"' in _quickstart(body)
    assert read_card_metadata(folder) == {"training_info": TRAINING_INFO, "results": RESULTS, "license": None}


def _assert_published_drafter(hub: HubStandIn, repo_id: str, reference: DSparkForCausalLM) -> dict:
    files = hub.repos[repo_id]["files"]
    expected = {"config.json", "model.safetensors", "README.md"}
    if reference.can_generate():  # transformers also saves generation_config.json for generative models
        expected.add("generation_config.json")
    assert set(files) == expected
    assert not any(name.endswith(PICKLE_SUFFIXES) for name in files)
    meta, body = _split_card(files["README.md"].decode())
    assert meta["library_name"] == "dspark_hf" and "transformers model that has been pushed" not in body
    assert f'AutoModel.from_pretrained("{repo_id}"' in _quickstart(body)
    return meta


def test_push_to_hub_publishes_card_and_weights_that_reload_identically(hub, drafter, tmp_path):
    commit = drafter.push_to_hub(DRAFTER_ID, training_info=TRAINING_INFO, results=RESULTS)
    assert commit.oid == hub.repos[DRAFTER_ID]["sha"]
    meta = _assert_published_drafter(hub, DRAFTER_ID, drafter)
    assert meta["dspark"]["results"] == RESULTS

    cache = tmp_path / "hf_cache"
    snapshot = snapshot_download(DRAFTER_ID, cache_dir=cache)
    for name, content in hub.repos[DRAFTER_ID]["files"].items():
        assert (Path(snapshot) / name).read_bytes() == content
    inputs = _inputs(drafter)
    expected = _outputs(drafter, inputs)
    reloaded = AutoModel.from_pretrained(snapshot).eval()
    assert isinstance(reloaded, DSparkForCausalLM)
    assert all(torch.equal(_outputs(reloaded, inputs)[k], v) for k, v in expected.items())

    # A fresh process, offline, loads the drafter by its Hub id from the populated cache, trust-free.
    save_file(inputs, tmp_path / "inputs.safetensors")
    script = textwrap.dedent(f"""
        import dspark_hf, torch
        from safetensors.torch import load, load_file, save_file
        from transformers import AutoModel
        model = AutoModel.from_pretrained({DRAFTER_ID!r}).eval()
        assert type(model).__name__ == "DSparkForCausalLM"
        torch.set_num_threads({torch.get_num_threads()})  # the thread count decides the BLAS summation order
        with torch.no_grad():
            # Owned copies: load_file maps the file, leaving tensors unaligned (BLAS rounds differently).
            inputs = {{k: v.clone() for k, v in load_file({str(tmp_path / "inputs.safetensors")!r}).items()}}
            out = model(**inputs)
        save_file({{"logits": out.logits, "confidence_logits": out.confidence_logits}},
                  {str(tmp_path / "offline.safetensors")!r})
    """)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_ENDPOINT": "http://127.0.0.1:9",
    }
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    offline = load_file(tmp_path / "offline.safetensors")
    assert all(torch.equal(offline[k], v) for k, v in expected.items())


def test_cli_push_keeps_recorded_training_info_and_uploads_no_pickles(hub, drafter, tmp_path, capsys):
    folder = tmp_path / "run"
    drafter.save_pretrained(folder, training_info=TRAINING_INFO, license="apache-2.0")
    torch.save({"lr": 6e-4}, folder / "training_args.bin")
    (folder / "optimizer.pt").write_bytes(b"not for the Hub")
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps({"gsm8k": {"speedup": 1.3}}))
    with pytest.raises(SystemExit, match="dspark push: .*must hold a 'tau' value"):
        main(["push", str(folder), "test-org/cli-push", "--results", str(results_file)])
    assert hub.repos == {}, "invalid results must be refused before anything reaches the Hub"

    results_file.write_text(json.dumps(RESULTS))
    main(["push", str(folder), "test-org/cli-push", "--private", "--results", str(results_file)])
    assert "Published" in capsys.readouterr().out
    assert hub.repos["test-org/cli-push"]["visibility"] == "private"
    meta = _assert_published_drafter(hub, "test-org/cli-push", drafter)
    assert meta["dspark"] == {"training": TRAINING_INFO, "results": RESULTS}
    assert meta["license"] == "apache-2.0"
    published = load_file(
        Path(snapshot_download("test-org/cli-push", cache_dir=tmp_path / "c")) / "model.safetensors"
    )
    assert published.keys() == drafter.state_dict().keys()
    assert all(torch.equal(published[k], v) for k, v in drafter.state_dict().items())


def test_cli_push_of_a_deepspec_folder_publishes_the_native_layout(hub, capsys):
    fixture = Path(__file__).parent / "fixtures" / "deepspec_vanilla_conf"
    main(["push", str(fixture), "test-org/from-deepspec"])
    files = hub.repos["test-org/from-deepspec"]["files"]
    assert json.loads(files["config.json"])["model_type"] == "dspark"
    fixture_weights = load_file(fixture / "model.safetensors")
    published = load(files["model.safetensors"])
    assert published.keys() == fixture_weights.keys()
    assert all(torch.equal(published[k], v) for k, v in fixture_weights.items())


def test_save_pretrained_with_push_to_hub_uploads_our_card(hub, drafter, tmp_path):
    folder = tmp_path / "local"
    drafter.save_pretrained(folder, push_to_hub=True, repo_id="test-org/saved-and-pushed", results=RESULTS)
    _assert_published_drafter(hub, "test-org/saved-and-pushed", drafter)
    assert hub.repos["test-org/saved-and-pushed"]["files"]["README.md"] == (folder / "README.md").read_bytes()
