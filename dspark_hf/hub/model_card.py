"""Model cards and Hub publishing of a drafter model (the mixin behind `push_to_hub`).

A drafter repo has to explain itself: which target it accelerates, how to load it without
`trust_remote_code`, its configuration and what it measured. The card is rendered from
`hub_templates/model_card.md`, which ships inside the wheel. Training details and measured results are also
stored in the card's YAML metadata (key `dspark`), so that re-publishing a folder re-renders its card without
losing them.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, HfApi, ModelCard, ModelCardData
from transformers import PreTrainedModel

from ..heads import MARKOV_HEADS
from ..version import __version__

MODEL_CARD_TEMPLATE = Path(__file__).parent.parent / "hub_templates" / "model_card.md"
CARD_METADATA_KEY = "dspark"
CARD_TAGS = ("speculative-decoding", "dspark")
# All a drafter repo needs; anything else in a folder (optimizer states, pickled training args) stays local.
HUB_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "README.md",
)
# Hub repo ids look like `org/name`; a value that is a local path is never a Hub id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_id(value: Any) -> str | None:
    if isinstance(value, str) and _HUB_ID.match(value) and not os.path.exists(value):
        return value
    return None


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(v) for v in value)
    return str(value)


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return str(n)


def _label(key: str) -> str:
    text = key.replace("_", " ")
    return text[:1].upper() + text[1:]


def _plain(data: dict | None) -> dict | None:
    """JSON-plain copy (numpy/torch scalars become numbers or strings), so it can live in YAML metadata."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"Expected a dict, got {type(data).__name__}: {data!r}.")
    return json.loads(json.dumps(data, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def _results_context(results: dict | None) -> dict[str, Any]:
    """Table rows from `{"<dataset>": {"tau": ..., "speedup": ...}, "command": "...", "<setting>": value}`."""
    rows, setup = [], []
    for name, value in (results or {}).items():
        if name == "command":
            continue
        if isinstance(value, dict):
            if "tau" not in value:
                raise ValueError(
                    f"results[{name!r}] must hold a 'tau' value (tokens per target step), got {value}."
                )
            speedup = value.get("speedup")
            rows.append(
                {
                    "dataset": name,
                    "tau": f"{float(value['tau']):.2f}",
                    "speedup": "not measured" if speedup is None else f"{float(speedup):.2f}x",
                }
            )
        else:
            setup.append((_label(name), _format_value(value)))
    if results and not rows:
        raise ValueError(
            f"results hold no dataset entry of the form {{'<dataset>': {{'tau': ...}}}}: {results}."
        )
    return {"results_rows": rows, "results_setup": setup, "results_command": (results or {}).get("command")}


def _training_context(training_info: dict | None) -> dict[str, Any]:
    info = dict(training_info or {})
    metrics = info.pop("final_metrics", None) or {}
    if not isinstance(metrics, dict):
        raise ValueError(
            f"training_info['final_metrics'] must be a dict of metric -> value, got {metrics!r}."
        )
    return {
        "training_rows": [(_label(k), _format_value(v)) for k, v in info.items()],
        "final_metrics": [(k, _format_value(v)) for k, v in metrics.items()],
    }


def _check_card_inputs(training_info: dict | None, results: dict | None) -> None:
    """Raise the card's ValueErrors before anything is sent to the Hub."""
    _results_context(_plain(results))
    _training_context(_plain(training_info))


def _config_rows(model: PreTrainedModel) -> list[tuple[str, str]]:
    config = model.config
    copied = {
        id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()
    }
    own = sum(p.numel() for p in model.parameters() if id(p) not in copied)
    shared = sum(p.numel() for p in model.parameters() if id(p) in copied)
    if config.markov_rank:
        head_type = config.markov_head_type
        head = f"{head_type} ({MARKOV_HEADS[head_type].description}), rank {config.markov_rank}"
    else:
        head = "none (markov_rank = 0: parallel DFlash drafter)"
    if not config.enable_confidence_head:
        confidence = "no"
    else:
        reads = "hidden state + Markov embedding" if config.confidence_head_with_markov else "hidden state"
        calibrated = (
            ", calibrated by sequential temperature scaling" if config.confidence_temperatures else ""
        )
        confidence = f"yes ({reads}{calibrated})"
    return [
        ("Block size (tokens drafted per round)", str(config.block_size)),
        ("Draft layers", str(config.num_hidden_layers)),
        ("Sequential head", head),
        ("Confidence head", confidence),
        ("Target layers read", f"{config.target_layer_ids} of {config.num_target_layers}"),
        ("Hidden size", str(config.hidden_size)),
        ("Mask token id", str(config.mask_token_id)),
        ("Parameters", f"{_count(own)} trained + {_count(shared)} copied from the target (frozen)"),
        ("Weights dtype", str(model.dtype).removeprefix("torch.")),
    ]


def render_model_card(
    model: PreTrainedModel,
    training_info: dict | None = None,
    results: dict | None = None,
    *,
    repo_id: str | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
) -> str:
    """The README.md text of `model`'s repo.

    Args:
        model: the drafter (its config and parameter counts fill the card).
        training_info: e.g. `{"dataset": ..., "steps": ..., "epochs": ..., "learning_rate": ...,
            "final_metrics": {...}}`; every key is listed, Hub dataset ids also go to the YAML `datasets`.
        results: `{"<dataset>": {"tau": float, "speedup": float}, "command": "<what measured them>"}`; other
            scalar keys (e.g. `"temperature"`, `"hardware"`) are listed as the measurement setup.
        repo_id: the Hub id the quick-start loads; defaults to the model's `name_or_path`.
        license: licence id for the YAML metadata; `"other"` when unknown (the target's licence applies).
        tags: extra Hub tags besides `speculative-decoding` and `dspark`.
    """
    config = model.config
    training_info, results = _plain(training_info), _plain(results)
    base_model = _hub_id(config.target_model_name_or_path)
    repo_id = repo_id or model.name_or_path or "<drafter repo id>"
    datasets = (training_info or {}).get("dataset")
    datasets = [d for d in (datasets if isinstance(datasets, (list, tuple)) else [datasets]) if _hub_id(d)]
    recorded = {k: v for k, v in (("training", training_info), ("results", results)) if v}
    card_data = ModelCardData(
        library_name="dspark_hf",
        base_model=base_model,
        license=license or "other",
        tags=list(dict.fromkeys([*CARD_TAGS, *(tags or []), *(model.model_tags or [])])),
        datasets=datasets or None,
        **({CARD_METADATA_KEY: recorded} if recorded else {}),
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        model_name=f"DSpark drafter for {base_model}" if base_model else repo_id.rstrip("/").split("/")[-1],
        repo_id=repo_id,
        push_repo_id=_hub_id(repo_id) or "<org>/<name>",
        target_id=config.target_model_name_or_path or "<target model id>",
        block_size=config.block_size,
        num_layers=config.num_hidden_layers,
        target_layer_ids=config.target_layer_ids,
        markov_rank=config.markov_rank,
        head_type=config.markov_head_type,
        confidence_head=config.enable_confidence_head,
        config_rows=_config_rows(model),
        license_known=license is not None,
        library_version=__version__,
        **_results_context(results),
        **_training_context(training_info),
    )
    return str(card)


def write_model_card(
    model: PreTrainedModel,
    output_dir: str | os.PathLike,
    training_info: dict | None = None,
    results: dict | None = None,
    *,
    repo_id: str | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
) -> Path:
    """Render the card and write it to `output_dir/README.md`.

    Arguments are those of `render_model_card`; `repo_id` defaults to `output_dir`, so that the quick-start of
    a local folder loads that folder.
    """
    path = Path(output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    card = render_model_card(
        model, training_info, results, repo_id=repo_id or str(output_dir), license=license, tags=tags
    )
    path.write_text(card, encoding="utf-8")
    return path


def read_card_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """What a folder's card recorded: `{"training_info", "results", "license"}` (None when absent)."""
    path = Path(folder) / "README.md"
    data = ModelCard.load(path).data.to_dict() if path.is_file() else {}
    recorded = data.get(CARD_METADATA_KEY) or {}
    license = data.get("license")
    return {
        "training_info": recorded.get("training"),
        "results": recorded.get("results"),
        "license": None if license == "other" else license,
    }


def _create_repo(api: HfApi, repo_id: str, private: bool | None, revision: str | None) -> str:
    """Create the repo (and branch) if needed; returns the full `namespace/name` id."""
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return repo_id


class DSparkHubMixin:
    """`save_pretrained` also writes the DSpark model card; `push_to_hub` publishes it.

    transformers' `push_to_hub` would replace that card with its generic one whenever the repo has no README
    yet, so publishing saves to a temporary folder, renders our card there and uploads the folder.
    """

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        *args: Any,
        push_to_hub: bool = False,
        training_info: dict | None = None,
        results: dict | None = None,
        license: str | None = None,
        **kwargs: Any,
    ) -> None:
        """`PreTrainedModel.save_pretrained`, plus README.md rendered from the DSpark card template.

        `training_info`, `results` and `license` fill the card (see `render_model_card`). With `push_to_hub`,
        the folder's drafter files and card are then uploaded to `repo_id` (default: the folder's name).
        """
        hub = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "private", "create_pr") if k in kwargs}
        super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        if not is_main_process:
            return
        repo_id, api = hub.get("repo_id"), None
        if push_to_hub:
            _check_card_inputs(training_info, results)
            api = HfApi(token=kwargs.get("token"))
            repo_id = _create_repo(
                api, repo_id or Path(save_directory).resolve().name, hub.get("private"), None
            )
        write_model_card(self, save_directory, training_info, results, repo_id=repo_id, license=license)
        if api is not None:
            api.upload_folder(
                repo_id=repo_id,
                folder_path=save_directory,
                allow_patterns=list(HUB_FILE_PATTERNS),
                commit_message=hub.get("commit_message") or "Upload DSpark drafter",
                create_pr=hub.get("create_pr", False),
            )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
        training_info: dict | None = None,
        results: dict | None = None,
        license: str | None = None,
    ) -> CommitInfo:
        """Upload the drafter (config, safetensors weights) with its DSpark model card in one commit.

        Arguments are those of transformers' `push_to_hub`, plus `training_info`, `results` and `license` for
        the card (see `render_model_card`).
        """
        _check_card_inputs(training_info, results)
        api = HfApi(token=token)
        repo_id = _create_repo(api, repo_id, private, revision)
        with tempfile.TemporaryDirectory() as tmp_dir:
            super().save_pretrained(tmp_dir, max_shard_size=max_shard_size)
            write_model_card(
                self,
                tmp_dir,
                training_info,
                results,
                repo_id=repo_id,
                license=license,
                tags=tags,
            )
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp_dir,
                allow_patterns=list(HUB_FILE_PATTERNS),
                commit_message=commit_message or "Upload DSpark drafter",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )


__all__ = [
    "DSparkHubMixin",
    "render_model_card",
    "write_model_card",
    "read_card_metadata",
    "MODEL_CARD_TEMPLATE",
]
