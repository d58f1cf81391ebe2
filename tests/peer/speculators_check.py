"""Check dspark_hf's speculators format against the peer itself, speculators 0.9.0's DSpark model.

speculators pins transformers <= 5.19 and dspark_hf needs >= 5.23, so the check runs in three steps in two
virtual environments (`tests/peer/speculators_check.sh` drives them):

1. `export` (dspark_hf's environment): a tiny Llama target, one random drafter per case (vanilla, gated, rnn
   head, with and without a confidence head, plus draft sub-vocabulary cases and one without a Markov
   head), each exported with
   `export_speculators`; fixed random inputs (context features, sequence, anchors) and dspark_hf's logits and
   confidence logits on them.
2. `peer` (speculators' environment): for each export, speculators' config validates, its `DSparkDraftModel`
   loads the folder with no missing or unexpected keys, and its own training forward (anchored blocks, flex
   mask rules, Markov and confidence heads), run on the same inputs, gives logits equal to ours. Then a
   drafter that speculators itself initialises and saves, with its outputs on the same inputs.
3. `import` (dspark_hf's environment): dspark_hf loads each speculators save and reproduces its outputs;
   the report goes to `tests/peer/speculators_check.json`.

Where the implementations differ in convention, the report's `semantic_differences` says how.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CASES = [
    {
        "name": f"{head}_{'conf' if conf else 'noconf'}",
        "markov_head_type": head,
        "enable_confidence_head": conf,
    }
    for head in ("vanilla", "gated", "rnn")
    for conf in (True, False)
]
CASES += [
    {
        "name": "vanilla_conf_subvocab",
        "markov_head_type": "vanilla",
        "enable_confidence_head": True,
        "sub": True,
    },
    {"name": "rnn_conf_subvocab", "markov_head_type": "rnn", "enable_confidence_head": True, "sub": True},
    # markov_rank = 0, the DFlash ablation: no Markov head, the confidence head reads the hidden state only
    {
        "name": "no_markov_conf",
        "markov_head_type": "vanilla",
        "enable_confidence_head": True,
        "markov_rank": 0,
    },
]
VOCAB, HIDDEN, TARGET_LAYERS, BLOCK, SEQ = 96, 32, 4, 4, 24
ANCHORS = [3, 9, 15]  # every anchor opens a block of BLOCK positions inside the sequence
TOLERANCE = 1e-4  # float32


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ------------------------------------------------------------------------------------------ step 1: export
def export(work: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    import dspark_hf

    torch.manual_seed(0)
    target = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=TARGET_LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
        )  # fmt: skip
    ).eval()
    target.save_pretrained(work / "target")
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB - 1, (1, SEQ), generator=gen)
    for case in CASES:
        drafter = dspark_hf.DSparkForCausalLM.from_target(
            target, num_hidden_layers=2, block_size=BLOCK, markov_rank=case.get("markov_rank", 8),
            target_layer_ids=[-1, 1, 3],
            mask_token_id=VOCAB - 1, markov_head_type=case["markov_head_type"],
            enable_confidence_head=case["enable_confidence_head"],
            target_model_name_or_path=str(work / "target"),
        ).eval()  # fmt: skip
        with torch.no_grad():
            for name, param in drafter.named_parameters():
                if name not in ("embed_tokens.weight", "lm_head.weight"):
                    param.copy_(
                        torch.randn(param.shape, generator=gen) * 0.2 + (1.0 if "norm" in name else 0)
                    )
        vocab_ids = None
        if case.get("sub"):
            vocab_ids = torch.randperm(VOCAB - 1, generator=gen)[:40].sort().values
            drafter.set_draft_vocab(vocab_ids)
        folder = work / case["name"]
        dspark_hf.export_speculators(drafter, folder / "export")
        features = torch.randn(1, SEQ, drafter.config.num_features * HIDDEN, generator=gen)
        inputs = {
            "input_ids": input_ids,
            "features": features,
            "verifier_last_hidden_states": torch.randn(1, SEQ, HIDDEN, generator=gen),
            "anchors": torch.tensor(ANCHORS),
        }
        if vocab_ids is not None:
            inputs["vocab_ids"] = vocab_ids
        logits, confidence = dspark_outputs(drafter, inputs)
        save_file(inputs, folder / "inputs.safetensors")
        save_file(_outputs(logits, confidence), folder / "dspark_outputs.safetensors")
    print(f"exported {len(CASES)} cases to {work}")


def dspark_outputs(drafter, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dspark_hf's logits [A*B, K] (K = draft vocabulary) and confidence logits [A*B], block by block."""
    block_size, mask = drafter.config.block_size, drafter.config.mask_token_id
    ids, logits, confidence = inputs["input_ids"], [], []
    for p in inputs["anchors"].tolist():
        block = torch.full((1, block_size), mask)
        block[0, 0] = ids[0, p]
        positions = torch.arange(p + block_size).unsqueeze(0)
        with torch.no_grad():
            prev = ids[:, p : p + block_size]
            out = drafter(
                block, inputs["features"][:, :p], positions, prev, vocab_ids=inputs.get("vocab_ids")
            )
        logits.append(out.logits[0])
        if out.confidence_logits is not None:
            confidence.append(out.confidence_logits[0])
    return torch.cat(logits), torch.cat(confidence) if confidence else None


def _outputs(logits: torch.Tensor, confidence: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {
        "logits": logits.contiguous(),
        **({"confidence": confidence.contiguous()} if confidence is not None else {}),
    }


# --------------------------------------------------------------------------------------------- step 2: peer
def peer_outputs(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """speculators' own training forward on the inputs; its logits and confidence logits are captured where
    it hands them to its loss. The loss mask marks exactly the anchors, so they are the blocks it drafts."""
    import speculators.models.dspark.core as core

    captured = {}

    def capture(logits, targets, confidence_logits, *args, **kwargs):
        captured.update(logits=logits, confidence=confidence_logits)
        return torch.zeros(()), {}

    original, core.compute_metrics = core.compute_metrics, capture
    try:
        ids = inputs["input_ids"]
        loss_mask = torch.zeros_like(ids)
        loss_mask[0, inputs["anchors"]] = 1
        with torch.no_grad():
            model(hidden_states=inputs["features"], input_ids=ids, loss_mask=loss_mask,
                  verifier_last_hidden_states=inputs["verifier_last_hidden_states"],
                  document_ids=torch.zeros_like(ids), max_anchors=len(inputs["anchors"]))  # fmt: skip
    finally:
        core.compute_metrics = original
    confidence = captured["confidence"]
    return captured["logits"][0], None if confidence is None else confidence[0]


def _load_peer(folder: Path):
    """speculators' config and model for `folder`, eager attention (the CPU path of its mask rules), and
    the keys its loader would report missing or unexpected."""
    from speculators.models.dspark import DSparkDraftModel, DSparkSpeculatorConfig

    config = DSparkSpeculatorConfig.from_pretrained(folder)  # pydantic validation
    config.transformer_layer_config._attn_implementation = "eager"
    model = DSparkDraftModel.from_pretrained(folder, config=config).eval()
    stored = set(load_file(folder / "model.safetensors"))
    expected = set(model.state_dict())
    ignored = set(model._keys_to_ignore_on_load_missing)
    nan = [name for name, t in model.state_dict().items() if t.is_floating_point() and bool(t.isnan().any())]
    return config, model, sorted(expected - stored - ignored), sorted(stored - expected), nan


def peer(work: Path) -> None:
    from importlib.metadata import version

    from speculators.models.dspark import DSparkDraftModel

    report = {"speculators_version": version("speculators"), "transformers_version": version("transformers"),
              "cases": {}}  # fmt: skip
    for case in CASES:
        folder = work / case["name"]
        inputs = load_file(folder / "inputs.safetensors")
        ours = load_file(folder / "dspark_outputs.safetensors")
        config, model, missing, unexpected, nan = _load_peer(folder / "export")
        logits, confidence = peer_outputs(model, inputs)
        entry = {
            "config_validates": True,
            "missing_keys": missing,
            "unexpected_keys": unexpected,
            "nan_tensors_after_load": nan,
            "aux_hidden_state_layer_ids": config.aux_hidden_state_layer_ids,
            "draft_vocab_size": config.draft_vocab_size,
            "export_logits_max_abs_diff": _max_diff(logits, ours["logits"]),
            "export_confidence_max_abs_diff": (
                None if confidence is None else _max_diff(confidence, ours["confidence"])
            ),
            "confidence_head_presence_matches": (confidence is None) == ("confidence" not in ours),
        }
        # (3) a drafter that speculators initialises and saves itself
        torch.manual_seed(2)
        fresh = DSparkDraftModel(config)
        if config.draft_vocab_size != config.transformer_layer_config.vocab_size:
            stored = load_file(folder / "export" / "model.safetensors")
            fresh.load_vocab_mappings(stored["t2d"], stored["d2t"])
        fresh.load_verifier_weights()
        with torch.no_grad():
            for param in fresh.parameters():
                if param.requires_grad:
                    param.add_(torch.randn(param.shape) * 0.2)
        fresh.save_pretrained(folder / "speculators_saved")
        logits, confidence = peer_outputs(fresh.eval(), inputs)
        save_file(_outputs(logits, confidence), folder / "speculators_outputs.safetensors")
        saved_config = json.loads((folder / "speculators_saved" / "config.json").read_text())
        entry["speculators_saved_keys_omitted"] = sorted(
            set(fresh.state_dict()) - set(load_file(folder / "speculators_saved" / "model.safetensors"))
        )
        entry["speculators_saved_config_keeps_extra_keys"] = all(
            k in saved_config for k in ("num_target_layers", "dspark_bonus_anchor")
        )
        report["cases"][case["name"]] = entry
        print(case["name"], {k: v for k, v in entry.items() if "diff" in k})
    (work / "peer_report.json").write_text(json.dumps(report, indent=2) + "\n")


# ------------------------------------------------------------------------------------------- step 3: import
SEMANTIC_DIFFERENCES = [
    "Layer ids: speculators' aux_hidden_state_layer_ids count the embedding output as layer 0 (transformers' "
    "hidden_states index), dspark_hf's target_layer_ids as -1; the export writes ours + 1 and the import "
    "subtracts 1 (see aux_hidden_state_layer_ids per case: [-1, 1, 3] -> [0, 2, 4]).",
    "Saved tensors: speculators never saves embed_tokens (and lm_head only for a reduced vocabulary); it "
    "reloads them from the verifier, so dspark_hf's import needs the verifier (verifier=, default the "
    "checkpoint's speculators_config.verifier.name_or_path) (see speculators_saved_keys_omitted).",
    "Target depth: speculators records no num_target_layers; dspark_hf writes it as an extra key, which "
    "speculators' config keeps (extra='allow'); without it the import assumes the deepest layer read + 1.",
    "Block convention: both predict the token at anchor + k + 1 from slot k when sample_from_anchor is true "
    "(speculators' DSpark default, written explicitly with dspark_bonus_anchor: false); checkpoints with "
    "sample_from_anchor false or dspark_bonus_anchor true (anchor as bonus token) are refused on import.",
    "Draft sub-vocabulary: both formats store only the draft rows of lm_head and markov_w2 with EAGLE-3 d2t "
    "offsets and t2d mask; dspark_hf's rows outside the draft vocabulary (used only to draft a prompt's own "
    "tokens) are lost on export, so extend_draft_vocab_with_prompt is off after import.",
    "Context features: identical semantics; speculators' training forward lets a block attend to the context "
    "positions before its anchor and to its own block, as dspark_hf's forward with the context cut at the "
    "anchor (the equal logits above are measured that way).",
]


def import_back(work: Path, output: Path) -> None:
    import dspark_hf

    report = json.loads((work / "peer_report.json").read_text())
    ok = True
    for case in CASES:
        folder, entry = work / case["name"], report["cases"][case["name"]]
        inputs = load_file(folder / "inputs.safetensors")
        theirs = load_file(folder / "speculators_outputs.safetensors")
        drafter = dspark_hf.DSparkForCausalLM.from_pretrained(
            folder / "speculators_saved", verifier=work / "target"
        )
        logits, confidence = dspark_outputs(drafter.eval(), inputs)
        entry["import_logits_max_abs_diff"] = _max_diff(logits, theirs["logits"])
        entry["import_confidence_max_abs_diff"] = (
            None if confidence is None else _max_diff(confidence, theirs["confidence"])
        )
        diffs = [v for k, v in entry.items() if k.endswith("max_abs_diff") and v is not None]
        entry["passed"] = (
            not entry["missing_keys"] and not entry["unexpected_keys"] and not entry["nan_tensors_after_load"]
            and entry["confidence_head_presence_matches"] and max(diffs) <= TOLERANCE
        )  # fmt: skip
        ok &= entry["passed"]
    report.update(
        tolerance=TOLERANCE,
        passed=ok,
        max_abs_diff=max(
            v
            for e in report["cases"].values()
            for k, v in e.items()
            if k.endswith("max_abs_diff") and v is not None
        ),
        semantic_differences=SEMANTIC_DIFFERENCES,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    for name, entry in report["cases"].items():
        print(f"{name:24s} passed={entry['passed']}  max diffs: "
              + ", ".join(f"{k.removesuffix('_max_abs_diff')}={v:.1e}" for k, v in entry.items()
                          if k.endswith("max_abs_diff") and v is not None))  # fmt: skip
    print(f"all passed: {ok} -> {output}")
    if not ok:
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("step", choices=["export", "peer", "import"])
    parser.add_argument("--work", type=Path, required=True, help="Folder shared by the three steps.")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "speculators_check.json")
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    {"export": export, "peer": peer, "import": lambda work: import_back(work, args.output)}[args.step](
        args.work
    )


if __name__ == "__main__":
    main()
