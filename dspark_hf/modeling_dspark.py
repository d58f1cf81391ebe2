"""The DSpark drafter: Qwen3-style layers whose keys/values are [projected target context ; draft block]."""

from __future__ import annotations

import itertools
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from huggingface_hub import snapshot_download
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3Attention,
    Qwen3MLP,
    Qwen3RMSNorm,
    Qwen3RotaryEmbedding,
    eager_attention_forward,
    rotate_half,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import ModelOutput, logging

from .configuration_dspark import DSparkConfig
from .context_cache import DSparkContextCache
from .errors import InputError, check_model_source
from .formats.registry import NATIVE_LAYOUT, format_of, load_config, needs_translation
from .formats.weights import omits_target_copies, read_config_dict, write_native_folder
from .generation.drafting import DSparkGenerationMixin
from .heads import ConfidenceHead, build_markov_head
from .hub.model_card import DSparkHubMixin
from .warm_start import LAYER_INITS, LayerInit, feeding_layer_id, initialize_from_target, warm_start_layer_ids

logger = logging.get_logger(__name__)


def reserved_mask_token_id(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> int:
    """A token id that ordinary text and the chat template never produce, for the block's mask slots.

    A mask id that is a real token (e.g. the pad token, often the end-of-turn token) confuses the drafter's
    inputs with genuine context. In order of preference: the tokenizer's own mask token; the last added
    special token that is not BOS/EOS/PAD/UNK and not used by the chat template (as DeepSpec reserves one); an
    id past the tokenizer's vocabulary (embedding rows no text maps to). Raises a ValueError when none exists.
    """
    if tokenizer.mask_token_id is not None:
        return tokenizer.mask_token_id
    used = set(tokenizer.all_special_ids)
    if getattr(tokenizer, "chat_template", None):
        conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        used.update(tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False))
    candidates = [
        token_id
        for token_id, token in tokenizer.added_tokens_decoder.items()
        if token.special and token_id not in used and token_id < vocab_size
    ]
    if candidates:
        return max(candidates)
    if len(tokenizer) < vocab_size:
        return vocab_size - 1
    raise ValueError(
        "The tokenizer has no mask token, no unused special token and no spare vocabulary id; pass an "
        "explicit mask_token_id."
    )


@dataclass
class DSparkOutput(ModelOutput):
    """Outputs of a drafter forward over one or more blocks.

    last_hidden_state: [B, L, d] backbone output after the final norm.
    base_logits: [B, L, V] `lm_head(last_hidden_state)`, the parallel (DFlash) draft distribution.
    logits: [B, L, V] base logits plus the teacher-forced Markov bias; equal to base_logits without a Markov
        head, None when the head needs `prev_token_ids` and none were given.
    confidence_logits: [B, L] pre-sigmoid confidence, None without the head (or without `prev_token_ids`
        when the head reads the Markov embedding).
    context_cache: the context cache, when one was passed.
    """

    last_hidden_state: torch.Tensor | None = None
    base_logits: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    confidence_logits: torch.Tensor | None = None
    context_cache: DSparkContextCache | None = None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of [B, H, T, D] states with per-position cos/sin [B, T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class DSparkAttention(Qwen3Attention):
    """Qwen3 attention whose keys/values are the projected target context followed by the block itself.

    Context and block share k_proj/v_proj/k_norm; rotary positions continue the target's. Attention inside
    a block is bidirectional, so the module is not causal; packed training passes an explicit mask.
    """

    def __init__(self, config: DSparkConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.is_causal = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: DSparkContextCache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        bsz, q_len = hidden_states.shape[:2]
        ctx_len = context.shape[1]
        query = self.q_norm(self.q_proj(hidden_states).view(bsz, q_len, -1, self.head_dim)).transpose(1, 2)
        kv_input = torch.cat([context, hidden_states], dim=1)
        key = self.k_norm(self.k_proj(kv_input).view(bsz, ctx_len + q_len, -1, self.head_dim)).transpose(1, 2)
        value = self.v_proj(kv_input).view(bsz, ctx_len + q_len, -1, self.head_dim).transpose(1, 2)

        cos, sin = position_embeddings
        key = rotate(key, cos, sin)
        query = rotate(query, cos[:, -q_len:], sin[:, -q_len:])
        if cache is not None:
            ctx_key, ctx_value = cache.extend(self.layer_idx, key[:, :, :ctx_len], value[:, :, :ctx_len])
            key = torch.cat([ctx_key, key[:, :, ctx_len:]], dim=-2)
            value = torch.cat([ctx_value, value[:, :, ctx_len:]], dim=-2)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            is_causal=False,
            **kwargs,
        )
        attn_output = attn_output.reshape(bsz, q_len, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class DSparkDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DSparkConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DSparkAttention(config, layer_idx)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: DSparkContextCache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states, context, position_embeddings, attention_mask, cache, **kwargs
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class DSparkPreTrainedModel(PreTrainedModel):
    config_class = DSparkConfig
    config: DSparkConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DSparkDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True


class DSparkForCausalLM(DSparkGenerationMixin, DSparkHubMixin, DSparkPreTrainedModel):
    """The DSpark drafter.

    Parameter names equal DeepSpec's, so DeepSpec checkpoints load unchanged and export back by a pure config
    translation. `embed_tokens` and `lm_head` are copies of the target's and stay frozen.
    """

    def __init__(self, config: DSparkConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DSparkDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config)
        self.fc = nn.Linear(config.num_features * config.hidden_size, config.hidden_size, bias=False)
        self.hidden_norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.markov_head = build_markov_head(config)
        self.confidence_head = None
        if config.enable_confidence_head:
            extra = config.markov_rank if config.confidence_head_with_markov else 0
            self.confidence_head = ConfidenceHead(config.hidden_size + extra)
        if config.draft_vocab_size is not None:
            self.register_buffer("draft_vocab_ids", torch.arange(config.draft_vocab_size))
        self.post_init()
        self.freeze_target_copies()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the drafter's own weights. Mixed-precision training may hold the frozen copies of the
        target's embedding and LM head in the compute dtype (see `DSparkTrainer.train`); they do not make
        the drafter's dtype, which is what `save_pretrained` records and `from_pretrained` loads."""
        return self.norm.weight.dtype

    def freeze_target_copies(self) -> None:
        """Freeze `embed_tokens` and `lm_head`: copies of the target's, never trained (loading creates new
        parameters, so `from_pretrained` calls this again)."""
        self.embed_tokens.requires_grad_(False)
        self.lm_head.requires_grad_(False)

    @classmethod
    def from_target(
        cls,
        target_model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        dtype: torch.dtype | None = None,
        layer_init: LayerInit = "random",
        **config_overrides,
    ) -> DSparkForCausalLM:
        """A new drafter for `target_model`, sharing copies of its embedding and LM head.

        With the target's `tokenizer`, the mask token defaults to an id that text and the chat template never
        produce (`reserved_mask_token_id`); an explicit `mask_token_id` wins. `dtype` defaults to the
        target's; mixed-precision training of a bfloat16 target wants `torch.float32` master weights.
        `layer_init="target"` warm-starts the draft layers as copies of the target's last `num_hidden_layers`
        layers (`dspark_hf.warm_start`); the layer that feeds them joins `target_layer_ids` if it is missing.
        """
        if layer_init not in LAYER_INITS:
            raise ValueError(f"layer_init must be one of {LAYER_INITS}, got {layer_init!r}.")
        if "mask_token_id" not in config_overrides:
            if tokenizer is not None:
                config_overrides["mask_token_id"] = reserved_mask_token_id(
                    tokenizer, target_model.config.get_text_config(decoder=True).vocab_size
                )
            else:
                logger.warning(
                    "from_target without the target's tokenizer: mask_token_id defaults to the pad token "
                    "(else the last id), which may be a real token such as end-of-turn. Pass "
                    "`tokenizer=` to reserve an id that text never produces."
                )
        config = DSparkConfig.from_target_config(target_model.config, **config_overrides)
        if layer_init == "target":
            config = cls._warm_start_config(config, config_overrides)
        drafter = cls(config).to(dtype or target_model.dtype)
        with torch.no_grad():
            drafter.embed_tokens.weight.copy_(target_model.get_input_embeddings().weight)
            drafter.lm_head.weight.copy_(target_model.get_output_embeddings().weight)
        if layer_init == "target":
            initialize_from_target(drafter, target_model)
        return drafter

    @staticmethod
    def _warm_start_config(config: DSparkConfig, overrides: dict) -> DSparkConfig:
        """`config` whose `target_layer_ids` capture the layer that feeds the copied ones."""
        feeding = feeding_layer_id(config.num_target_layers, config.num_hidden_layers)
        if feeding in config.target_layer_ids:
            return config
        if "target_layer_ids" in overrides:
            raise ValueError(
                f"layer_init='target' copies the target's layers from {feeding + 1} on, so target_layer_ids "
                f"must include {feeding} (the layer that feeds them); got {config.target_layer_ids}."
            )
        config.target_layer_ids = warm_start_layer_ids(
            config.target_layer_ids, config.num_target_layers, config.num_hidden_layers
        )
        config.check_values()
        return config

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *args,
        verifier: PreTrainedModel | str | os.PathLike | None = None,
        **kwargs,
    ):
        """Load a checkpoint in any layout of `dspark_hf.formats` (native, DeepSpec's, speculators'), detected
        from its config.json; safetensors only (pickled weights are refused).

        speculators checkpoints omit the copies of the target's embedding (and LM head), and so may a local
        native folder (saved with a `state_dict` without them, to keep its files small): they are taken from
        `verifier` (the target model, or its folder / Hub id), by default the target the checkpoint records,
        in the checkpoint's precision. Checkpoints whose tensors differ from the native layout are translated
        through a temporary native folder, so every `from_pretrained` option applies unchanged. A local folder
        (drafter or verifier) that is missing, holds no config.json or weights, or holds a malformed
        config.json or a truncated safetensors file raises an `InputError` naming it.
        """
        path = str(pretrained_model_name_or_path)
        config_dict = read_config_dict(pretrained_model_name_or_path, "drafter folder")
        if isinstance(verifier, (str, os.PathLike)):
            check_model_source(verifier, "verifier")
        if os.path.isdir(path):
            files = sorted(os.listdir(path))
            if not any(f.endswith(".safetensors") for f in files):
                pickled = [f for f in files if f.endswith(".bin")]
                if pickled:
                    raise InputError(
                        f"{path} holds only pickled weights ({pickled}); dspark_hf loads safetensors "
                        "checkpoints only. Convert them with safetensors first."
                    )
                raise InputError(f"drafter folder {path} holds no safetensors weights.")
        kwargs["use_safetensors"] = True
        if needs_translation(config_dict) or (os.path.isdir(path) and omits_target_copies(path)):
            if not os.path.isdir(path):
                path = snapshot_download(path, allow_patterns=["*.json", "*.safetensors"])
            with tempfile.TemporaryDirectory() as native_dir:
                write_native_folder(path, native_dir, load_config(path), verifier)
                loaded = super().from_pretrained(native_dir, *args, **kwargs)
            model = loaded[0] if isinstance(loaded, tuple) else loaded
            model.name_or_path = model.config._name_or_path = str(pretrained_model_name_or_path)
        else:
            translated = format_of(config_dict).name != NATIVE_LAYOUT
            if translated and "config" not in kwargs:
                kwargs["config"] = load_config(path)  # another layout's config over native tensors
            loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
            model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
            if translated:
                model.name_or_path = model.config._name_or_path = path
        model._own_loaded_tensors()
        model.freeze_target_copies()
        return loaded

    def _own_loaded_tensors(self) -> None:
        """Replace tensors that view the memory-mapped checkpoint file by owned, aligned copies.

        transformers leaves loaded weights inside the mapped file, at whatever byte offset the file gives
        them; BLAS kernels take other code paths (and round differently) for unaligned operands, so a
        reloaded drafter would not compute bit-identically to the one that was saved.
        """
        with torch.no_grad():
            for tensor in itertools.chain(self.parameters(), self.buffers()):
                tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)

    def set_draft_vocab(self, token_ids: torch.Tensor | list[int] | None) -> None:
        """Restrict drafting to `token_ids` (e.g. from `frequency_ranked_vocab`), or lift it with None."""
        if token_ids is None:
            self.config.draft_vocab_size = None
            self._buffers.pop("draft_vocab_ids", None)
            return
        ids = torch.as_tensor(token_ids, dtype=torch.long).unique()
        if ids.numel() == 0 or int(ids[0]) < 0 or int(ids[-1]) >= self.config.vocab_size:
            raise ValueError(
                f"draft vocabulary ids must be non-empty and within [0, {self.config.vocab_size})."
            )
        self.config.draft_vocab_size = ids.numel()
        self.register_buffer("draft_vocab_ids", ids.to(self.lm_head.weight.device))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def project_context(self, target_hidden_states: torch.Tensor) -> torch.Tensor:
        """Raw concatenated target features [..., m*d] -> context vectors H_ctx [..., d]."""
        return self.hidden_norm(self.fc(target_hidden_states))

    def confidence(
        self, hidden_states: torch.Tensor, prev_token_ids: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Confidence logits for hidden states [..., d] whose previous tokens are `prev_token_ids` [...]."""
        if self.confidence_head is None:
            return None
        if not self.config.confidence_head_with_markov:
            return self.confidence_head(hidden_states).float()
        if prev_token_ids is None:
            return None
        prev = self.markov_head.prev_embeddings(prev_token_ids).to(hidden_states.dtype)
        return self.confidence_head(torch.cat([hidden_states, prev], dim=-1)).float()

    def backbone(
        self,
        input_ids: torch.LongTensor,
        target_hidden_states: torch.Tensor,
        position_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        context_cache: DSparkContextCache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """The parallel stage: normed hidden states [B, L, d] of the block(s); arguments as in `forward`."""
        hidden_states = self.embed_tokens(input_ids).to(self.dtype)
        context = self.project_context(target_hidden_states.to(hidden_states.dtype))
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            mask = torch.zeros(attention_mask.shape, dtype=hidden_states.dtype, device=hidden_states.device)
            attention_mask = mask.masked_fill(~attention_mask, torch.finfo(hidden_states.dtype).min)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states, context, position_embeddings, attention_mask, context_cache, **kwargs
            )
        return self.norm(hidden_states)

    def forward(
        self,
        input_ids: torch.LongTensor,
        target_hidden_states: torch.Tensor,
        position_ids: torch.LongTensor,
        prev_token_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        context_cache: DSparkContextCache | None = None,
        vocab_ids: torch.LongTensor | None = None,
        detach_confidence_input: bool = False,
        return_base_logits: bool = True,
        **kwargs,
    ) -> DSparkOutput:
        r"""
        input_ids: [B, L] the block(s): each block is its anchor followed by `mask_token_id`s.
        target_hidden_states: [B, C, m*d] concatenated raw target features of C context positions (before
            `fc`); with a cache, only the positions not cached yet.
        position_ids: [B, C+L] positions of the context followed by the block.
        prev_token_ids: [B, L] token before each slot (the anchor for slot 0), teacher-forcing the Markov and
            confidence heads.
        attention_mask: optional boolean [B, 1, L, cached+C+L] (True = attend) for packed multi-block
            training; None lets every block position see the whole context and block.
        vocab_ids: optional [K] token ids; the logits then cover these ids only ([B, L, K]), which is how
            training over the draft vocabulary avoids the vocabulary-sized work.
        detach_confidence_input: give the confidence head detached hidden states, so that a confidence loss
            trains the head alone.
        return_base_logits: `False` leaves `base_logits` out of the output (None) when a Markov head makes
            them a tensor of their own: training does not read them, and they are vocabulary-sized.

        L is one block or several consecutive blocks of `config.block_size` positions; the Markov head starts
        every block afresh, so a packed forward equals one forward per block.
        """
        hidden_states = self.backbone(
            input_ids, target_hidden_states, position_ids, attention_mask, context_cache
        )
        head_weight = self.lm_head.weight if vocab_ids is None else self.lm_head.weight[vocab_ids]
        base_logits = F.linear(hidden_states, head_weight)
        logits = base_logits
        if self.markov_head is not None:
            block_size = self.config.block_size if input_ids.shape[1] > self.config.block_size else None
            logits = (
                None
                if prev_token_ids is None
                else base_logits + self.markov_head(prev_token_ids, hidden_states, block_size, vocab_ids)
            )
        return DSparkOutput(
            last_hidden_state=hidden_states,
            base_logits=base_logits if return_base_logits or logits is base_logits else None,
            logits=logits,
            confidence_logits=self.confidence(
                hidden_states.detach() if detach_confidence_input else hidden_states, prev_token_ids
            ),
            context_cache=context_cache,
        )


__all__ = ["DSparkForCausalLM", "DSparkPreTrainedModel", "DSparkOutput", "reserved_mask_token_id"]
