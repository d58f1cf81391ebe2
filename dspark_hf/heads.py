"""The sequential Markov heads and the confidence head of DSpark.

The backbone drafts every block position in parallel; a Markov head adds a bias that depends on the
previously drafted token (and, for the rnn head, on a recurrent state), so drafting becomes a cheap
left-to-right loop over the block. Parameter names follow DeepSpec's checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VanillaMarkovHead(nn.Module):
    """Low-rank token-to-token transition: B(x_{k-1}, .) = W1[x_{k-1}] W2."""

    # Whether the head carries a state along the block (then positions are computed one after another).
    recurrent = False
    # How model cards describe the head.
    description = "low-rank token transition"

    def __init__(self, vocab_size: int, markov_rank: int, hidden_size: int):
        super().__init__()
        self.markov_rank = markov_rank
        self.markov_w1 = nn.Embedding(vocab_size, markov_rank)
        self.markov_w2 = nn.Linear(markov_rank, vocab_size, bias=False)

    def prev_embeddings(self, prev_token_ids: torch.Tensor) -> torch.Tensor:
        return self.markov_w1(prev_token_ids)

    def init_state(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Recurrent state before the first block position (None for memoryless heads)."""
        return None

    def latent(
        self, prev_embeddings: torch.Tensor, hidden_states: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rank-r vector that W2 maps to the vocabulary bias, and the next state."""
        return prev_embeddings, state

    def project(self, latent: torch.Tensor, vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
        """W2 latent: the bias over the vocabulary, or over `vocab_ids` only (draft-vocabulary training)."""
        weight = self.markov_w2.weight if vocab_ids is None else self.markov_w2.weight[vocab_ids]
        return F.linear(latent.to(weight.dtype), weight)

    def step(
        self,
        prev_token_ids: torch.Tensor,
        hidden_states: torch.Tensor,
        state: torch.Tensor | None,
        projection: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One sequential step: bias [..., V] for the position whose hidden state is given, and the state.

        `projection` [r, K] stands in for W2 (the drafting loop keeps W2 transposed, perhaps restricted to a
        sub-vocabulary, the layout cheapest for one row); the bias then has its dtype.
        """
        latent, state = self.latent(self.prev_embeddings(prev_token_ids), hidden_states, state)
        return (
            self.project(latent) if projection is None else latent.to(projection.dtype) @ projection
        ), state

    def forward(
        self,
        prev_token_ids: torch.Tensor,
        hidden_states: torch.Tensor,
        block_size: int | None = None,
        vocab_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced bias for whole blocks: ids [..., L], hidden [..., L, d] -> bias [..., L, V].

        L holds consecutive blocks of `block_size` positions (one block when None). A recurrent state starts
        from s_0 at every block, as in drafting, so a packed forward over many blocks equals one forward per
        block. `vocab_ids` restricts the bias to those ids ([..., L, K]).
        """
        prev = self.prev_embeddings(prev_token_ids)
        length = prev_token_ids.shape[-1]
        block_size = block_size or length
        if length % block_size:
            raise ValueError(f"{length} positions do not split into blocks of {block_size}.")
        if not self.recurrent:
            latent, _ = self.latent(prev, hidden_states, None)
        else:
            blocks = length // block_size
            prev = prev.unflatten(-2, (blocks, block_size))
            hidden = hidden_states.unflatten(-2, (blocks, block_size))
            state = self.init_state(hidden[..., 0, :])
            steps = []
            for k in range(block_size):
                step_latent, state = self.latent(prev[..., k, :], hidden[..., k, :], state)
                steps.append(step_latent)
            latent = torch.stack(steps, dim=-2).flatten(-3, -2)
        return self.project(latent, vocab_ids)


class GatedMarkovHead(VanillaMarkovHead):
    """The previous token's embedding is scaled by a context-aware gate sigma(W_g [h_k ; W1[x_{k-1}]])."""

    description = "transition scaled by a context gate"

    def __init__(self, vocab_size: int, markov_rank: int, hidden_size: int):
        super().__init__(vocab_size, markov_rank, hidden_size)
        self.gate_proj = nn.Linear(hidden_size + markov_rank, markov_rank)

    def latent(self, prev_embeddings, hidden_states, state):
        features = torch.cat([hidden_states, prev_embeddings.to(hidden_states.dtype)], dim=-1)
        gate = torch.sigmoid(self.gate_proj(features))
        return gate * prev_embeddings, state


class RNNMarkovHead(VanillaMarkovHead):
    """A GRU-like state s_k carries the whole drafted prefix, not only the previous token.

    z_k = [s_{k-1} ; W1[x_{k-1}] ; h_k]; g, c, o = split(W z_k);
    s_k = sigma(g) * s_{k-1} + (1 - sigma(g)) * tanh(c); the bias is W2 tanh(o); s_0 = 0.
    """

    recurrent = True
    description = "recurrent state over the drafted prefix"

    def __init__(self, vocab_size: int, markov_rank: int, hidden_size: int):
        super().__init__(vocab_size, markov_rank, hidden_size)
        self.joint_proj = nn.Linear(2 * markov_rank + hidden_size, 3 * markov_rank)

    def init_state(self, hidden_states):
        return hidden_states.new_zeros(*hidden_states.shape[:-1], self.markov_rank)

    def latent(self, prev_embeddings, hidden_states, state):
        if state is None:
            state = self.init_state(hidden_states)
        z = torch.cat([state, prev_embeddings.to(hidden_states.dtype), hidden_states], dim=-1)
        gate, candidate, output = self.joint_proj(z).chunk(3, dim=-1)
        gate = torch.sigmoid(gate)
        new_state = gate * state + (1.0 - gate) * torch.tanh(candidate)
        return torch.tanh(output), new_state


# The registry of Markov head types: config validation, CLI choices and model cards all read their names here.
MARKOV_HEADS: dict[str, type[VanillaMarkovHead]] = {
    "vanilla": VanillaMarkovHead,
    "gated": GatedMarkovHead,
    "rnn": RNNMarkovHead,
}


def build_markov_head(config) -> VanillaMarkovHead | None:
    """The head named by `config.markov_head_type`, or None when `markov_rank == 0` (DFlash)."""
    if config.markov_rank == 0:
        return None
    return MARKOV_HEADS[config.markov_head_type](config.vocab_size, config.markov_rank, config.hidden_size)


class ConfidenceHead(nn.Module):
    """Logit of the probability that a draft position survives verification, given its prefix did."""

    def __init__(self, input_dim: int):
        super().__init__()
        self.proj = nn.Linear(input_dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).squeeze(-1)


__all__ = [
    "VanillaMarkovHead",
    "GatedMarkovHead",
    "RNNMarkovHead",
    "MARKOV_HEADS",
    "build_markov_head",
    "ConfidenceHead",
]
