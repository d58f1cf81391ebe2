"""Warm start: a drafter whose layers begin as copies of the target's last decoder layers.

A randomly initialised drafter spends most of a small training budget learning what the target's last layers
already compute. Starting from copies of those layers (the context projection `fc` as the identity on the
feature that fed them, the target's norms, the Markov head's output factor and the confidence head at zero)
makes the untrained drafter a truncated target: its first drafted token is already often right.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from .generation.target_tap import decoder_layers

LayerInit = Literal["random", "target"]
LAYER_INITS: tuple[str, ...] = ("random", "target")
# Token ids of the probe forward that measures the scale of the target's queries and keys (see
# `qk_norm_scale`): a deterministic spread over the vocabulary, so no tokenizer or data is needed. On the
# reference target the per-token RMS of queries and keys varies by about 10 % around its mean, and the mean
# from such ids is within about 15 % of the mean over real text.
PROBE_LENGTH = 128


def feeding_layer_id(num_target_layers: int, num_draft_layers: int) -> int:
    """Id of the captured target layer whose output feeds the first copied layer (-1: the embeddings)."""
    if not 0 < num_draft_layers <= num_target_layers:
        raise ValueError(
            f"layer_init='target' copies the target's last num_hidden_layers layers: need 1 <= "
            f"num_hidden_layers <= {num_target_layers} (the target's depth), got {num_draft_layers}."
        )
    return num_target_layers - num_draft_layers - 1


def warm_start_layer_ids(layer_ids: list[int], num_target_layers: int, num_draft_layers: int) -> list[int]:
    """`layer_ids` plus the layer that feeds the first copied layer, if it is not captured already."""
    return sorted({*layer_ids, feeding_layer_id(num_target_layers, num_draft_layers)})


def _probe_ids(vocab_size: int, device: torch.device) -> torch.Tensor:
    step = max(1, vocab_size // PROBE_LENGTH - 1)
    return (torch.arange(PROBE_LENGTH, device=device) * step + 7).remainder(vocab_size).unsqueeze(0)


@torch.no_grad()
def qk_norm_scale(target: PreTrainedModel, layer_indices: list[int]) -> dict[int, tuple[float, float]]:
    """Mean per-head RMS of the queries and keys of the given target layers, from one probe forward.

    Qwen3-style draft layers normalise each query and key head to unit RMS before the rotary embedding, which
    Llama-style targets do not. A q/k norm whose weight is this mean RMS keeps the copied attention's logits
    at the target's scale (exactly where the per-token RMS is constant).
    """
    layers = decoder_layers(target)
    sums: dict[int, list[torch.Tensor]] = {}

    def recorder(index: int, head_dim: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            heads = output.float().view(*output.shape[:-1], -1, head_dim)
            sums.setdefault(index, []).append(heads.pow(2).mean(-1).sqrt().mean())

        return hook

    handles = []
    for index in layer_indices:
        attention = layers[index].self_attn
        head_dim = attention.head_dim
        handles.append(attention.q_proj.register_forward_hook(recorder(index, head_dim)))
        handles.append(attention.k_proj.register_forward_hook(recorder(index, head_dim)))
    try:
        target(_probe_ids(target.config.get_text_config(decoder=True).vocab_size, target.device))
    finally:
        for handle in handles:
            handle.remove()
    return {index: (float(query), float(key)) for index, (query, key) in sums.items()}


def _copy(destination: nn.Module, source: nn.Module) -> None:
    destination.load_state_dict({name: tensor.detach() for name, tensor in source.state_dict().items()})


@torch.no_grad()
def initialize_from_target(drafter: nn.Module, target: PreTrainedModel) -> None:
    """Set `drafter`'s layers, norms, `fc` and heads for a warm start from `target` (see the module doc)."""
    config = drafter.config
    target_layers = decoder_layers(target)
    first = config.num_target_layers - config.num_hidden_layers
    copied = list(range(first, config.num_target_layers))
    needs_qk_scale = not hasattr(target_layers[first].self_attn, "q_norm")
    scales = qk_norm_scale(target, copied) if needs_qk_scale else {}
    for draft_layer, index in zip(drafter.layers, copied):
        source = target_layers[index]
        attention = draft_layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            _copy(getattr(attention, name), getattr(source.self_attn, name))
        if needs_qk_scale:
            attention.q_norm.weight.fill_(scales[index][0])
            attention.k_norm.weight.fill_(scales[index][1])
        else:
            _copy(attention.q_norm, source.self_attn.q_norm)
            _copy(attention.k_norm, source.self_attn.k_norm)
        _copy(draft_layer.mlp, source.mlp)
        _copy(draft_layer.input_layernorm, source.input_layernorm)
        _copy(draft_layer.post_attention_layernorm, source.post_attention_layernorm)
    _copy(drafter.norm, target.get_decoder().norm)
    # The context keys/values skip the draft layer's input norm: `hidden_norm` plays its part for the
    # feeding layer's output, as the first copied layer's input norm did in the target.
    _copy(drafter.hidden_norm, target_layers[first].input_layernorm)
    slot = config.target_layer_ids.index(feeding_layer_id(config.num_target_layers, config.num_hidden_layers))
    hidden = config.hidden_size
    drafter.fc.weight.zero_()
    drafter.fc.weight[:, slot * hidden : (slot + 1) * hidden] = torch.eye(hidden)
    if drafter.markov_head is not None:
        drafter.markov_head.markov_w2.weight.zero_()
    if drafter.confidence_head is not None:
        drafter.confidence_head.proj.weight.zero_()
        drafter.confidence_head.proj.bias.zero_()


__all__ = ["LAYER_INITS", "LayerInit", "feeding_layer_id", "initialize_from_target", "qk_norm_scale"]
