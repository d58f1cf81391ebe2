"""`DSparkTrainer`: train a DSpark drafter against a frozen target with transformers' `Trainer`.

TRL's trainers do not fit: the drafter's input is the target's hidden states, not text, and nothing is
generated. This trainer follows TRL's conventions instead (arguments dataclass beside the trainer, the frozen
model prepared like a teacher, metrics collected in `compute_loss` and averaged in `log`, `peft_config=`,
model tags and card).

One training step (DSpark paper, section 5; DeepSpec's sampling rules):
1. the frozen target runs once over the batch and yields the features of `target_layer_ids` and its last
   (final-norm) hidden state;
2. anchors are sampled inside the loss-masked response; each opens a block [anchor, mask x (block_size - 1)];
3. all blocks of a sequence are drafted in ONE packed forward: a block sees the context before its anchor and
   itself (bidirectionally), nothing else;
4. target logits come from the target's LM head at the block positions only; the loss is `dspark_loss`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast, is_peft_model
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import is_peft_available, logging

from ..generation.target_tap import LayerFeatures, check_target_compatibility, expected_tau
from ..hub.model_card import write_model_card
from .arguments import DSparkTrainingArguments
from .loss import DSparkLossOutput, dspark_loss, position_weights, target_distribution
from .muon_adamw import MuonAdamW, split_for_muon
from .target_cache import TargetFeatureCache
from .time_budget import WallClockBudget

# Parameters copied from the target: frozen, never trained, never part of an adapter.
FROZEN_MODULES = ("embed_tokens", "lm_head")


logger = logging.get_logger(__name__)


@dataclass
class DSparkDataCollator:
    """Right-pads `input_ids` (with `pad_token_id`) and `loss_mask` (with 0), and adds `attention_mask`.

    Rows need `input_ids` and `loss_mask` of equal length; other columns are ignored.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        masks = [torch.as_tensor(f["loss_mask"]).bool() for f in features]
        for row, (i, m) in enumerate(zip(ids, masks)):
            if i.shape != m.shape:
                raise ValueError(
                    f"Row {row}: input_ids has {i.numel()} tokens but loss_mask {m.numel()}; they must match."
                )
        length = max(i.numel() for i in ids)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(ids), length), self.pad_token_id, dtype=torch.long)
        loss_mask = torch.zeros(len(ids), length, dtype=torch.bool)
        attention_mask = torch.zeros(len(ids), length, dtype=torch.long)
        for row, (i, m) in enumerate(zip(ids, masks)):
            input_ids[row, : i.numel()] = i
            loss_mask[row, : i.numel()] = m
            attention_mask[row, : i.numel()] = 1
        return {"input_ids": input_ids, "loss_mask": loss_mask, "attention_mask": attention_mask}


def pad_rows(rows: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """Rows [T_i, d] stacked into [B, length, d], zeros after each row's end."""
    out = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
    for index, row in enumerate(rows):
        out[index, : row.shape[0]] = row
    return out


def anchor_candidates(loss_mask: torch.Tensor) -> torch.Tensor:
    """[B, T-1] True where position p can anchor a block: p and its first label p+1 are in the response."""
    loss_mask = loss_mask.bool()
    return loss_mask[:, :-1] & loss_mask[:, 1:]


def anchor_seeds(input_ids: torch.Tensor, attention_mask: torch.Tensor, seed: int, step: int) -> list[int]:
    """One sampling seed per sequence, from the run seed, the step and the sequence's tokens.

    Anchors then depend on neither the batch composition nor the process a sequence lands on, so
    single-process, gradient-accumulation, DDP and resumed runs draft the same blocks.
    """
    lengths = attention_mask.sum(-1).tolist()
    header = np.asarray([seed, step], dtype=np.int64).tobytes()
    rows = input_ids.detach().cpu().numpy().astype(np.int64)
    return [zlib.crc32(row[:length].tobytes(), zlib.crc32(header)) for row, length in zip(rows, lengths)]


def sample_anchors(
    loss_mask: torch.Tensor, num_anchors: int, seeds: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample up to `num_anchors` anchor positions per sequence, without replacement, sorted.

    Returns `anchors` [B, A] and `keep` [B, A], with A = min(num_anchors, most candidates in a row), at
    least 1; padding anchors are 0 with `keep` False.
    """
    if num_anchors < 1:
        raise ValueError(f"num_anchors must be >= 1, got {num_anchors}.")
    candidates = anchor_candidates(loss_mask.cpu())
    counts = candidates.sum(-1)
    width = max(1, min(num_anchors, int(counts.max()) if counts.numel() else 0))
    anchors = torch.zeros(len(seeds), width, dtype=torch.long)
    keep = torch.zeros(len(seeds), width, dtype=torch.bool)
    for row, seed in enumerate(seeds):
        positions = candidates[row].nonzero().squeeze(-1)
        generator = torch.Generator().manual_seed(seed)
        chosen = positions[torch.randperm(positions.numel(), generator=generator)[:width]].sort().values
        anchors[row, : chosen.numel()] = chosen
        keep[row, : chosen.numel()] = True
    return anchors.to(loss_mask.device), keep.to(loss_mask.device)


def block_label_mask(
    loss_mask: torch.Tensor, anchors: torch.Tensor, keep: torch.Tensor, block_size: int
) -> torch.Tensor:
    """[B, A, block] supervised block positions: label p+k+1 inside the sequence and the response, cut at the
    first invalid label (a drafted block cannot continue past a rejection)."""
    seq_len = loss_mask.shape[1]
    label_positions = anchors[..., None] + 1 + torch.arange(block_size, device=anchors.device)
    in_sequence = label_positions < seq_len
    in_response = loss_mask.bool().gather(1, label_positions.clamp(max=seq_len - 1).flatten(1))
    valid = in_sequence & in_response.view_as(label_positions) & keep[..., None]
    return valid.long().cumprod(-1).bool()


@dataclass
class DSparkBlocks:
    """Packed drafter inputs for all anchors of a batch (Q = A * block_size query positions).

    input_ids: [B, Q] anchor then mask tokens per block.
    position_ids: [B, T + Q] context then block positions.
    prev_token_ids: [B, Q] teacher-forced previous tokens.
    attention_mask: [B, 1, Q, T + Q] bool, True = attend.
    block_positions: [B, A, block] absolute positions p..p+block-1.
    labels, label_mask: [B, A, block] next tokens and the supervised positions.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    prev_token_ids: torch.Tensor
    attention_mask: torch.Tensor
    block_positions: torch.Tensor
    labels: torch.Tensor
    label_mask: torch.Tensor


def build_blocks(
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    anchors: torch.Tensor,
    keep: torch.Tensor,
    block_size: int,
    mask_token_id: int,
) -> DSparkBlocks:
    """Lay out one block per anchor for a single packed drafter forward.

    Query q of block j attends to context positions < anchor_j and to the positions of block j. Padding blocks
    (keep False) have anchor 0, so they see only themselves: no query row is fully masked, which would turn
    into NaNs in SDPA.
    """
    batch, seq_len = input_ids.shape
    num_blocks = anchors.shape[1]
    device = input_ids.device
    offsets = torch.arange(block_size, device=device)
    block_positions = anchors[..., None] + offsets
    anchor_ids = input_ids.gather(1, anchors)
    labels = input_ids.gather(1, (block_positions + 1).clamp(max=seq_len - 1).flatten(1)).view_as(
        block_positions
    )
    label_mask = block_label_mask(loss_mask, anchors, keep, block_size)

    block_ids = torch.full_like(block_positions, mask_token_id)
    block_ids[..., 0] = torch.where(keep, anchor_ids, mask_token_id)
    prev_token_ids = torch.cat([anchor_ids[..., None], labels[..., :-1]], dim=-1)

    query_anchor = anchors.repeat_interleave(block_size, dim=1)  # [B, Q]
    sees_context = torch.arange(seq_len, device=device) < query_anchor[..., None]  # [B, Q, T]
    block_of = torch.arange(num_blocks, device=device).repeat_interleave(block_size)
    same_block = (block_of[:, None] == block_of[None, :]).expand(batch, -1, -1)  # [B, Q, Q]
    attention_mask = torch.cat([sees_context, same_block], dim=-1)[:, None]

    context_positions = torch.arange(seq_len, device=device).expand(batch, -1)
    return DSparkBlocks(
        input_ids=block_ids.flatten(1),
        position_ids=torch.cat([context_positions, block_positions.flatten(1)], dim=1),
        prev_token_ids=prev_token_ids.flatten(1),
        attention_mask=attention_mask,
        block_positions=block_positions,
        labels=labels,
        label_mask=label_mask,
    )


class DSparkTrainer(Trainer):
    """Trains a [`DSparkForCausalLM`] drafter for a frozen target with the DSpark loss.

    Args:
        model: the drafter, e.g. `DSparkForCausalLM.from_target(target)`.
        target_model: the target causal LM; kept in eval mode, never updated.
        args: [`DSparkTrainingArguments`].
        train_dataset, eval_dataset: rows with `input_ids` and `loss_mask` (1 on the assistant tokens the
            drafter learns to predict); see `dspark_hf.training.data`.
        processing_class: the target's tokenizer (saved with the drafter; its pad id pads batches).
        peft_config: optional PEFT config (e.g. `LoraConfig(target_modules=[...], task_type=None)`), applied
            with `peft.get_peft_model`.
    """

    _tag_names = ["dspark", "speculative-decoding", "dspark_hf"]
    # `compute_loss` normalises by the position weight of the whole optimizer step (see `get_batch_samples`).
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: PreTrainedModel,
        target_model: PreTrainedModel,
        args: DSparkTrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        peft_config: Any = None,
    ):
        if args is None:
            args = DSparkTrainingArguments(output_dir="dspark-drafter")
        elif not isinstance(args, DSparkTrainingArguments):
            raise TypeError(f"args must be DSparkTrainingArguments, got {type(args).__name__}.")
        if args.n_gpu > 1:
            raise ValueError(
                f"This process sees {args.n_gpu} GPUs but was not launched as one process per GPU, so the "
                "Trainer would wrap the drafter in nn.DataParallel, which splits the draft vocabulary along "
                "with the batch and skips the mixed-precision autocast. Launch one process per GPU "
                f"(`torchrun --nproc_per_node={args.n_gpu} ...` or `accelerate launch ...`), or train on one "
                "GPU with CUDA_VISIBLE_DEVICES=0."
            )
        check_target_compatibility(model, target_model)
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            for split, rows in dataset.items() if isinstance(dataset, dict) else [(None, dataset)]:
                check_dataset(rows, name if split is None else f"{name}[{split!r}]")
        # However the drafter was made (fresh, loaded, adapted), the copies of the target's weights stay out
        # of the optimizer.
        for module_name in FROZEN_MODULES:
            getattr(model, module_name).requires_grad_(False)
        if peft_config is not None:
            model = apply_peft(model, peft_config)
        self._budget = None
        if args.max_train_minutes is not None:
            agree = self._main_process_reading if args.world_size > 1 else None
            self._budget = WallClockBudget(
                args.max_train_minutes, args.lr_scheduler_type, args.warmup_steps, agree
            )
            callbacks = [*(callbacks or []), self._budget]
        if data_collator is None:
            pad_id = getattr(processing_class, "pad_token_id", None)
            data_collator = DSparkDataCollator(pad_id if pad_id is not None else model.config.mask_token_id)

        target_model.eval().requires_grad_(False)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.model.add_model_tags(self._tag_names)
        check_fsdp_plugin(getattr(self.accelerator.state, "fsdp_plugin", None))
        if self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            self.target_model = prepare_deepspeed(target_model, self.accelerator)
        else:
            # accelerate places a model for evaluation only outside FSDP, so the trainer places it itself.
            target_model = place_target(target_model, self.accelerator.device)
            self.target_model = self.accelerator.prepare_model(target_model, evaluation_mode=True)
        unwrapped_target = self.accelerator.unwrap_model(self.target_model)
        self._unwrapped_target = unwrapped_target
        # The decoder alone: training needs the target's hidden states, not its logits at the last position.
        self._target_decoder = unwrapped_target.get_decoder()
        self._target_lm_head = unwrapped_target.get_output_embeddings()
        self._drafter_config = self.accelerator.unwrap_model(self.model).config
        self._target_cache = None
        if args.target_cache_dir is not None:
            precision = f"{unwrapped_target.dtype}, bf16 autocast {args.bf16}, fp16 autocast {args.fp16}"
            self._target_cache = TargetFeatureCache(
                args.target_cache_dir,
                unwrapped_target,
                self._drafter_config.target_layer_ids,
                precision,
                args.target_cache_max_gb,
            )
        # Per mode ("train"/"eval"): running sums of metric numerators and denominators since the last log.
        self._metric_sums: dict[str, dict[str, torch.Tensor]] = {}

    # ---- wall-clock budget -------------------------------------------------------------------------------

    def _training_progress(self) -> float:
        """Fraction of training done: of the wall-clock budget when there is one, else of the steps."""
        if self._budget is not None:
            return self._budget.progress()
        return self.state.global_step / max(self.state.max_steps, 1)

    def _main_process_reading(self, seconds: float) -> float:
        """The main process's `seconds`, on every process (the wall-clock budget's shared clock)."""
        reading = torch.tensor([seconds], dtype=torch.float64, device=self.accelerator.device)
        return float(broadcast(reading, from_process=0))

    def _distribution_weights(self, training: bool) -> dict[str, float]:
        """CE and L1 weights of this step: cross-entropy only during `ce_warmup_fraction` of training."""
        if training and self._training_progress() < self.args.ce_warmup_fraction:
            return {"ce_weight": 1.0, "l1_weight": 0.0}
        return {"ce_weight": self.args.ce_weight, "l1_weight": self.args.l1_weight}

    def create_optimizer(self, model: nn.Module | None = None):
        """`Trainer.create_optimizer`, then the Markov head's parameters get their own learning rate and, with
        `matrix_optimizer="muon"`, Muon takes over the draft layers' weight matrices."""
        created = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if not created:
            return optimizer
        groups = self._markov_head_groups(optimizer.param_groups)
        if self.args.matrix_optimizer == "muon":
            self.optimizer = MuonAdamW(*split_for_muon(self.model, groups))
            return self.optimizer
        optimizer.param_groups.clear()
        for group in groups:
            optimizer.add_param_group(group)
        return optimizer

    def _markov_head_groups(self, param_groups: list[dict]) -> list[dict]:
        """`param_groups` with the Markov head's parameters in groups of their own, at
        `markov_head_lr_multiplier` times the rate."""
        multiplier = self.args.markov_head_lr_multiplier
        markov = {id(p) for n, p in self.model.named_parameters() if "markov_head." in n and p.requires_grad}
        groups = []
        for group in param_groups:
            for is_markov in (False, True):
                params = [p for p in group["params"] if (id(p) in markov) == is_markov]
                if params:
                    lr = group["lr"] * (multiplier if is_markov else 1.0)
                    groups.append({**group, "params": params, "lr": lr})
        return groups

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """Under `max_train_minutes` the rate follows the clock (see `WallClockBudget`), else the steps."""
        if self._budget is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer or self.optimizer, self._budget.lr_factor
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`; a resumed run also continues the wall-clock budget of its checkpoint.

        Under mixed precision the frozen copies of the target's embedding and LM head are held in the
        compute dtype while training, where that loses nothing (their values come from a target of that
        dtype): they need no master weights, and autocast would otherwise copy the LM head every step.
        """
        if self._budget is not None and resume_from_checkpoint:
            checkpoint = resume_from_checkpoint
            if checkpoint is True:
                checkpoint = get_last_checkpoint(self.args.output_dir)
            if checkpoint:
                self._budget.restore(checkpoint)
        compute_dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        held = hold_frozen_copies(self.accelerator.unwrap_model(self.model), compute_dtype)
        try:
            output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            for module, dtype in held:
                module.to(dtype)
        if self._target_cache is not None:
            logger.info(self._target_cache.describe())
            self.log(self._target_cache.stats())
        return output

    # ---- one step ----------------------------------------------------------------------------------------

    def _sample_anchors(
        self, inputs: dict[str, torch.Tensor], training: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Evaluation uses a fixed step so that successive evaluations score the same blocks.
        step = self.state.global_step if training else -1
        seeds = anchor_seeds(inputs["input_ids"], inputs["attention_mask"], self.args.seed, step)
        return sample_anchors(inputs["loss_mask"], self.args.num_anchors, seeds)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """Fetch the optimizer step's micro-batches, sample their anchors, and return the step's total
        position weight (over all processes) as `num_items_in_batch`, so that gradient accumulation and DDP
        give the loss of one big batch; without a `labels` column transformers would return None."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        block_size = self._drafter_config.block_size
        weights = position_weights(block_size, self.args.decay_gamma, device)
        total = torch.zeros((), device=device)
        for batch in batch_samples:
            anchors, keep = self._sample_anchors(batch, training=True)
            batch["anchors"], batch["anchor_keep"] = anchors, keep
            label_mask = block_label_mask(batch["loss_mask"], anchors, keep, block_size)
            total = total + (label_mask * weights.to(label_mask.device)).sum().to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        return batch_samples, total

    @torch.no_grad()
    def _target_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`_compute_target_states`, read from the target cache for the rows it holds (right-padded batches;
        padding positions are zeros, which no block sees)."""
        cache = self._target_cache
        if cache is None:
            return self._compute_target_states(input_ids, attention_mask)
        lengths = attention_mask.sum(dim=1)
        if not torch.equal(
            attention_mask.bool(), torch.arange(input_ids.shape[1], device=lengths.device) < lengths[:, None]
        ):
            raise ValueError("target_cache_dir needs right-padded batches (DSparkDataCollator's).")
        rows = [ids[:length] for ids, length in zip(input_ids, lengths.tolist())]
        states = [cache.get(row) for row in rows]
        missing = [i for i, state in enumerate(states) if state is None]
        if missing:
            features, last_hidden = self._compute_target_states(input_ids[missing], attention_mask[missing])
            for j, i in enumerate(missing):
                length = rows[i].numel()
                states[i] = features[j, :length], last_hidden[j, :length]
                cache.put(rows[i], *states[i])
        length = input_ids.shape[1]
        return tuple(
            pad_rows([state[part] for state in states], length).to(input_ids.device) for part in (0, 1)
        )

    @torch.no_grad()
    def _compute_target_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenated features of `target_layer_ids` [B, T, m*d] and the final-norm hidden state [B, T, d].

        Feature i is the output of decoder layer i (-1: the embeddings), captured by hooks exactly as at
        generation time; HF's `hidden_states[i + 1]` would put the final norm on the last layer's.
        """
        # A target split over devices (`device_map`) yields features on several of them; they all go to the
        # batch's device, the drafter's.
        device = input_ids.device
        layer_ids = self._drafter_config.target_layer_ids
        with LayerFeatures(self._unwrapped_target, layer_ids, device=device) as capture:
            with self.accelerator.autocast():
                outputs = self._target_decoder(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False
                )
        return capture.concatenated(), outputs.last_hidden_state.to(device)

    def _training_vocab(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The ids the drafter is trained to draft over: its draft vocabulary, extended (as at generation)
        with the batch's prompt tokens; None for full-vocabulary training."""
        vocab_ids = getattr(self.accelerator.unwrap_model(self.model), "draft_vocab_ids", None)
        if vocab_ids is None or not self.args.draft_vocab_training:
            return None
        if self._drafter_config.extend_draft_vocab_with_prompt:
            prompt = inputs["attention_mask"].bool() & ~inputs["loss_mask"].bool()
            vocab_ids = torch.cat([vocab_ids, inputs["input_ids"][prompt].to(vocab_ids.device)]).unique()
        return vocab_ids

    @torch.no_grad()
    def _target_distribution(
        self, last_hidden: torch.Tensor, blocks: DSparkBlocks, vocab_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The target's next-token probabilities [N, K] (at `vocab_ids`) and its mass outside them [N] at
        the N distinct supervised positions, and the row of each block position [B, A, block].

        The distribution of the token after position p comes from the target's hidden state at p. Blocks
        overlap, so the LM head runs once per distinct supervised position, not once per block slot, and
        the loss reads each slot's row chunk by chunk (a [B, A, block, K] float32 target is never built).
        """
        batch, seq_len, width = last_hidden.shape
        positions = blocks.block_positions.clamp(max=seq_len - 1)
        flat = positions + seq_len * torch.arange(batch, device=positions.device)[:, None, None]
        needed = flat[blocks.label_mask].unique()
        if needed.numel() == 0:
            needed = flat.new_zeros(1)
        lookup = flat.new_zeros(batch * seq_len)
        lookup[needed] = torch.arange(needed.numel(), device=needed.device)
        # Under mixed precision the final norm may return float32 next to a bfloat16 head; the head of a
        # target split over devices may live on another device than the drafter.
        head = self._target_lm_head.weight
        hidden = last_hidden.reshape(-1, width)[needed].to(head.device, head.dtype)
        probs, outside = target_distribution(self._target_lm_head(hidden).to(last_hidden.device), vocab_ids)
        rows = lookup[flat]  # unsupervised slots read an arbitrary row; their weight is 0
        return probs, outside, rows

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ):
        config = self._drafter_config
        if "anchors" in inputs:
            anchors, keep = inputs["anchors"], inputs["anchor_keep"]
        else:
            anchors, keep = self._sample_anchors(inputs, training=model.training)
        blocks = build_blocks(
            inputs["input_ids"], inputs["loss_mask"], anchors, keep, config.block_size, config.mask_token_id
        )
        features, last_hidden = self._target_states(inputs["input_ids"], inputs["attention_mask"])
        vocab_ids = self._training_vocab(inputs)
        # accelerate's mixed precision wraps the drafter's forward so that it returns float32 copies of its
        # outputs, which would double the logits; the loss upcasts them chunk by chunk instead, so the
        # wrapper goes and the forward runs under accelerate's autocast here.
        self.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        with self.accelerator.autocast():
            outputs = model(
                input_ids=blocks.input_ids,
                target_hidden_states=features,
                position_ids=blocks.position_ids,
                prev_token_ids=blocks.prev_token_ids,
                attention_mask=blocks.attention_mask,
                vocab_ids=vocab_ids,
                detach_confidence_input=self.args.confidence_detach_backbone,
                return_base_logits=False,
            )
        shape = blocks.labels.shape
        target_probs, outside_mass, target_rows = self._target_distribution(last_hidden, blocks, vocab_ids)
        confidence = outputs.confidence_logits
        result = dspark_loss(
            outputs.logits.view(*shape, -1),
            None,
            blocks.labels,
            blocks.label_mask,
            None if confidence is None else confidence.view(shape),
            vocab_ids=vocab_ids,
            target_probs=target_probs,
            target_outside_mass=outside_mass,
            target_rows=target_rows,
            **self._distribution_weights(model.training),
            confidence_weight=self.args.confidence_weight,
            decay_gamma=self.args.decay_gamma,
        )
        loss = result.loss
        if num_items_in_batch is not None:
            loss = loss * result.weight_sum / num_items_in_batch.clamp_min(torch.finfo(torch.float32).tiny)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                # DDP averages gradients over processes; the normaliser already covers all of them.
                loss = loss * self.accelerator.num_processes
        self._accumulate_metrics(result, "train" if model.training else "eval")
        return (loss, outputs) if return_outputs else loss

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ):
        """Evaluation loss only: the drafter's forward has no `labels`, so `Trainer` would not compute one."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ---- metrics -----------------------------------------------------------------------------------------

    def _accumulate_metrics(self, result: DSparkLossOutput, mode: str) -> None:
        """Add the batch's weighted loss terms and per-position acceptance, summed over processes, to the
        running sums of `mode`."""
        weight = result.weight_sum.detach()
        confidence = result.confidence_loss
        batch = {
            "ce_loss": result.ce_loss.detach() * weight,
            "l1_loss": result.l1_loss.detach() * weight,
            "confidence_loss": torch.zeros_like(weight)
            if confidence is None
            else confidence.detach() * weight,
            "weight": weight,
            "accepted": torch.nan_to_num(result.acceptance) * result.position_count,
            "positions": result.position_count.to(weight.dtype),
        }
        batch = self.accelerator.reduce(batch, reduction="sum")
        sums = self._metric_sums.setdefault(mode, {})
        for name, value in batch.items():
            sums[name] = value.double().cpu() + sums.get(name, 0)

    def _summarise_metrics(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """Loss terms, per-position acceptance and expected tau = 1 + sum_k prod_{i<=k} acceptance_i."""
        weight = float(sums["weight"])
        if weight == 0:
            return {}
        metrics = {"ce_loss": float(sums["ce_loss"]) / weight, "l1_loss": float(sums["l1_loss"]) / weight}
        if self._drafter_config.enable_confidence_head:
            metrics["confidence_loss"] = float(sums["confidence_loss"]) / weight
        acceptance = []
        for accepted, count in zip(sums["accepted"].tolist(), sums["positions"].tolist()):
            if count == 0:
                break
            acceptance.append(accepted / count)
        metrics.update({f"acceptance_{k + 1}": rate for k, rate in enumerate(acceptance)})
        metrics["expected_tau"] = expected_tau(acceptance)
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        sums = self._metric_sums.pop(mode, None)
        if sums is not None:
            metrics = self._summarise_metrics(sums)
            if mode == "eval":
                metrics = {f"eval_{key}": value for key, value in metrics.items()}
            logs.update(metrics)
        super().log(logs, start_time)

    # ---- saving ------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self._write_card(output_dir or self.args.output_dir)

    def create_model_card(self, *args, **kwargs) -> None:
        """Write the DSpark model card to `output_dir` (called by `push_to_hub`); the arguments of
        transformers' generic card do not apply and are ignored."""
        if self.is_world_process_zero():
            self._write_card(self.args.output_dir)

    def _write_card(self, output_dir: str) -> None:
        """The DSpark card of a full drafter, with the run's settings and last metrics; PEFT adapters keep the
        card PEFT writes."""
        model = self.accelerator.unwrap_model(self.model)
        if is_peft_model(model):
            return
        write_model_card(model, output_dir, training_info=self._training_info())

    def _training_info(self) -> dict[str, Any]:
        args = self.args
        target = self.accelerator.unwrap_model(self.target_model)
        info: dict[str, Any] = {
            "target": target.config.name_or_path or target.config.model_type,
            "steps": self.state.global_step,
            "epochs": round(self.state.epoch or 0.0, 2),
            "learning_rate": args.learning_rate,
            "batch_size": args.per_device_train_batch_size
            * args.gradient_accumulation_steps
            * args.world_size,
            "num_anchors": args.num_anchors,
            "loss_weights": f"ce {args.ce_weight}, l1 {args.l1_weight}, confidence {args.confidence_weight}",
            "decay_gamma": args.decay_gamma,
        }
        if self.train_dataset is not None and hasattr(self.train_dataset, "__len__"):
            info["training_sequences"] = len(self.train_dataset)
        logged = [entry for entry in self.state.log_history if "expected_tau" in entry]
        if logged:
            info["final_metrics"] = {
                k: v
                for k, v in logged[-1].items()
                if k in ("loss", "expected_tau") or k.startswith("acceptance")
            }
        return info


def check_dataset(dataset: Any, name: str) -> None:
    """Raise a ValueError unless rows carry `input_ids` and `loss_mask` and some row has a block to learn.

    Datasets without a length (streaming) are not scanned.
    """
    if dataset is None or not hasattr(dataset, "__len__"):
        return
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty.")
    missing = [column for column in ("input_ids", "loss_mask") if column not in dataset[0]]
    if missing:
        raise ValueError(
            f"{name} rows lack {missing}; they need `input_ids` and `loss_mask` (1 on the assistant tokens), "
            "as built by `dspark_hf.training.data.build_dataset`."
        )
    rows = dataset.select_columns(["loss_mask"]) if hasattr(dataset, "select_columns") else dataset
    for row in rows:
        if anchor_candidates(torch.as_tensor(row["loss_mask"])[None]).any():
            return
    raise ValueError(
        f"{name} has no assistant tokens to learn: no row has two consecutive `loss_mask` positions (an "
        "anchor and its first label). Check that the chat template marks the assistant's reply."
    )


def hold_frozen_copies(model: nn.Module, dtype: torch.dtype | None) -> list[tuple[nn.Module, torch.dtype]]:
    """Cast the drafter's frozen copies of the target's embedding and LM head to `dtype` where their values
    are exactly representable there; returns each cast module with its former dtype (to cast back)."""
    held = []
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        weight = module.weight
        if (
            dtype is None
            or weight.dtype == dtype
            or not torch.equal(weight.to(dtype).to(weight.dtype), weight)
        ):
            continue
        held.append((module, weight.dtype))
        module.to(dtype)
    return held


def place_target(target: nn.Module, device: torch.device) -> nn.Module:
    """`target` on `device`, unless a `device_map` split it over several devices, where it stays."""
    device_map = getattr(target, "hf_device_map", None) or {}
    if len(set(device_map.values())) > 1:
        return target
    return target.to(device)


def check_fsdp_plugin(plugin: Any) -> None:
    """Raise a ValueError for an FSDP setup that cannot train a drafter: FSDP1 with `use_orig_params=False`
    flattens each unit's parameters into one tensor, which cannot mix the frozen copies of the target's
    embedding and LM head with trainable weights."""
    if plugin is None or plugin.fsdp_version != 1 or plugin.use_orig_params is not False:
        return
    raise ValueError(
        "FSDP1 with use_orig_params=False cannot train a DSpark drafter: its embedding and LM head are "
        "frozen copies of the target's and share FSDP units with trainable weights. Use FSDP2 "
        "(fsdp_config={'version': 2}, the default) or fsdp_config={'version': 1, 'use_orig_params': True}."
    )


def apply_peft(model: PreTrainedModel, peft_config: Any) -> nn.Module:
    """`peft.get_peft_model` for a drafter, refusing configurations that do not fit a custom model type.

    PEFT cannot infer target modules for DSpark, `task_type` wrappers would inject arguments the drafter does
    not take, `"all-linear"` also catches `fc` and the heads, and the copied embedding/LM head stay frozen.
    """
    if not is_peft_available():
        raise ImportError("peft_config needs the `peft` package: pip install peft")
    from peft import get_peft_model

    target_modules = getattr(peft_config, "target_modules", None)
    if target_modules is None or target_modules == "all-linear":
        raise ValueError(
            "peft_config.target_modules must name the drafter's modules explicitly, e.g. "
            "['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']; "
            f"got {target_modules!r}."
        )
    if peft_config.task_type is not None:
        raise ValueError(
            f"peft_config.task_type must be None for a DSpark drafter, got {peft_config.task_type!r}: task "
            "wrappers pass arguments (labels, inputs_embeds, ...) its forward does not take."
        )
    peft_model = get_peft_model(model, peft_config)
    trained_frozen = [
        n for n, p in peft_model.named_parameters() if p.requires_grad and any(m in n for m in FROZEN_MODULES)
    ]
    if trained_frozen:
        raise ValueError(
            f"peft_config would train {trained_frozen[:3]}...: the embedding and LM head are copies of the "
            "target's and must stay frozen (remove them from target_modules / modules_to_save)."
        )
    return peft_model


__all__ = [
    "DSparkBlocks",
    "DSparkDataCollator",
    "DSparkTrainer",
    "anchor_candidates",
    "anchor_seeds",
    "apply_peft",
    "block_label_mask",
    "build_blocks",
    "check_dataset",
    "check_fsdp_plugin",
    "place_target",
    "sample_anchors",
]
