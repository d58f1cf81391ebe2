"""Training arguments of the [`DSparkTrainer`]."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .muon_adamw import MATRIX_OPTIMIZERS


@dataclass
class DSparkTrainingArguments(TrainingArguments):
    r"""
    Configuration of the [`DSparkTrainer`]: [`~transformers.TrainingArguments`] plus the DSpark loss and
    anchor sampling, with defaults from the paper's recipe (DeepSpec). Named apart from the model's
    `DSparkConfig`.

    Using [`~transformers.HfArgumentParser`] this class turns into command-line arguments.

    Parameters:
        > Parameters that control the DSpark loss

        ce_weight (`float`, *optional*, defaults to `0.1`):
            Weight of the cross-entropy to the ground-truth next tokens.
        l1_weight (`float`, *optional*, defaults to `0.9`):
            Weight of the L1 distance between the draft and target distributions (twice the total variation,
            i.e. what speculative sampling rejects).
        confidence_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the confidence head's BCE against the analytic acceptance `1 - 0.5 * L1`. Ignored for
            drafters without a confidence head.
        decay_gamma (`float`, *optional*, defaults to `4.0`):
            Block position k (0-based) is weighted by `exp(-k / decay_gamma)`: a rejection ends the block, so
            early positions matter most.
        ce_warmup_fraction (`float`, *optional*, defaults to `0.0`):
            Fraction of training (of the wall-clock budget with `max_train_minutes`, else of the steps) that
            uses cross-entropy only (`ce_weight` 1, `l1_weight` 0) before the configured mix.
        confidence_detach_backbone (`bool`, *optional*, defaults to `False`):
            Feed the confidence head detached hidden states, so its loss trains the head only.

        > Parameters that control the optimizer

        markov_head_lr_multiplier (`float`, *optional*, defaults to `1.0`):
            The Markov head's learning rate is `learning_rate` times this; its low-rank factors start at
            N(0, 0.02) and otherwise grow slowly towards the backbone's logit scale.
        matrix_optimizer (`str`, *optional*, defaults to `"adamw"`):
            `"muon"` updates the weight matrices of the draft layers and of `fc` with `torch.optim.Muon`
            (learning rate matched to AdamW's update size) and every other trainable parameter with AdamW.

        > Parameters that control the drafted blocks

        num_anchors (`int`, *optional*, defaults to `512`):
            Maximum number of block anchors sampled (without replacement) per sequence, among the positions of
            the loss-masked response whose next token is also in the response. All blocks of a sequence are
            drafted in one packed forward.

        > Parameters that control the training budget and the vocabulary

        max_train_minutes (`float`, *optional*):
            Wall-clock budget of training in minutes. Training ends when it is spent, and the learning-rate
            schedule follows the clock instead of the step count: `warmup_steps` is then a fraction of the
            budget, and the rate reaches its final value when the budget ends. `max_steps` /
            `num_train_epochs` still cap the run. A resumed run continues the budget of its checkpoint.
        target_cache_dir (`str`, *optional*):
            Folder of the target-feature cache (`dspark_hf.training.target_cache`): the first pass over a row
            stores the target's captured features and final hidden state; later passes read them and skip
            the target, which is about half of a step's compute. Keyed by the row's token ids under a
            manifest of the target's fingerprint, `target_layer_ids` and precision; a folder of another
            target is refused.
        target_cache_max_gb (`float`, *optional*, defaults to `50.0`):
            Size bound of the cache; rows past it are computed online each time.
        draft_vocab_training (`bool`, *optional*, defaults to `True`):
            When the drafter has a draft vocabulary (`set_draft_vocab`), compute its training logits over that
            vocabulary plus the batch's prompt tokens only (what it can draft), with the target mass outside
            as a constant of the L1 term (see `dspark_loss`). `False` trains over the full vocabulary.

        > Parameters whose defaults differ from [`~transformers.TrainingArguments`] (the DSpark recipe)

        learning_rate (`float`, *optional*, defaults to `6e-4`):
            Peak AdamW learning rate.
        lr_scheduler_type (`str`, *optional*, defaults to `"cosine"`):
            Learning-rate schedule after warmup.
        warmup_steps (`int` or `float`, *optional*, defaults to `0.04`):
            Linear warmup: a float in [0, 1) is a fraction of the total steps (4 %).
        max_grad_norm (`float`, *optional*, defaults to `1.0`):
            Gradient-norm clipping.
        logging_steps (`int` or `float`, *optional*, defaults to `10`):
            Steps between two logs of the loss terms, the per-position acceptance and the expected tau.
        remove_unused_columns (`bool`, *optional*, defaults to `False`):
            Must stay `False`: the drafter's forward does not name `loss_mask`, so transformers would drop it.

    Mixed precision (`bf16=True`, as in the paper's recipe on GPUs), activation checkpointing of the draft
    layers (`activation_checkpointing=True`), `report_to` and resuming
    (`trainer.train(resume_from_checkpoint=...)`) come from [`~transformers.TrainingArguments`].
    """

    ce_weight: float = field(default=0.1, metadata={"help": "Weight of the cross-entropy term."})
    l1_weight: float = field(
        default=0.9, metadata={"help": "Weight of the L1 distance between draft and target distributions."}
    )
    confidence_weight: float = field(
        default=1.0, metadata={"help": "Weight of the confidence-head BCE term."}
    )
    decay_gamma: float = field(
        default=4.0, metadata={"help": "Block position k (0-based) is weighted by exp(-k / decay_gamma)."}
    )
    ce_warmup_fraction: float = field(
        default=0.0, metadata={"help": "Fraction of training with cross-entropy only, before the mix."}
    )
    confidence_detach_backbone: bool = field(
        default=False, metadata={"help": "Train the confidence head on detached hidden states."}
    )
    markov_head_lr_multiplier: float = field(
        default=1.0, metadata={"help": "Learning-rate multiplier of the Markov head's parameters."}
    )
    num_anchors: int = field(
        default=512, metadata={"help": "Maximum number of block anchors sampled per sequence."}
    )
    matrix_optimizer: str = field(
        default="adamw",
        metadata={
            "help": "Optimizer of the draft layers' weight matrices: adamw, or muon (torch.optim.Muon; every "
            "other parameter keeps AdamW).",
            "choices": list(MATRIX_OPTIMIZERS),
        },
    )

    max_train_minutes: float | None = field(
        default=None,
        metadata={
            "help": "Wall-clock training budget (minutes) that ends training and drives the LR schedule."
        },
    )
    target_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Cache the target's hidden states of each training row here on its first pass; later "
            "epochs (and resumed runs) read them instead of running the target."
        },
    )
    target_cache_max_gb: float = field(
        default=50.0, metadata={"help": "Size bound of target_cache_dir; rows past it are computed online."}
    )
    draft_vocab_training: bool = field(
        default=True,
        metadata={
            "help": "Train over the drafter's draft vocabulary (when it has one) instead of the full one."
        },
    )

    learning_rate: float = field(default=6e-4, metadata={"help": "Peak AdamW learning rate."})
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "Learning-rate schedule after warmup."}
    )
    warmup_steps: float = field(
        default=0.04,
        metadata={"help": "Warmup steps; a float in [0, 1) is a fraction of the total steps."},
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clipping (0 disables it)."})
    logging_steps: float = field(default=10, metadata={"help": "Steps between two logs."})
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Must stay False: `loss_mask` is not an argument of the drafter's forward."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.matrix_optimizer not in MATRIX_OPTIMIZERS:
            raise ValueError(
                f"matrix_optimizer must be one of {MATRIX_OPTIMIZERS}, got {self.matrix_optimizer!r}."
            )
        if self.num_anchors < 1:
            raise ValueError(f"num_anchors must be >= 1, got {self.num_anchors}.")
        if not self.decay_gamma > 0:
            raise ValueError(f"decay_gamma must be > 0, got {self.decay_gamma}.")
        weights = ("ce_weight", "l1_weight", "confidence_weight")
        negative = [name for name in weights if getattr(self, name) < 0]
        if negative:
            raise ValueError(f"Loss weights must be >= 0; negative: {negative}.")
        if self.ce_weight == 0 and self.l1_weight == 0:
            raise ValueError("ce_weight and l1_weight are both 0: the draft distribution would not learn.")
        if not 0.0 <= self.ce_warmup_fraction < 1.0:
            raise ValueError(f"ce_warmup_fraction must be in [0, 1), got {self.ce_warmup_fraction}.")
        if not self.markov_head_lr_multiplier > 0:
            raise ValueError(f"markov_head_lr_multiplier must be > 0, got {self.markov_head_lr_multiplier}.")
        if self.max_train_minutes is not None:
            if not self.max_train_minutes > 0:
                raise ValueError(f"max_train_minutes must be > 0, got {self.max_train_minutes}.")
            if not 0 <= self.warmup_steps < 1:
                raise ValueError(
                    "With max_train_minutes, warmup_steps must be a fraction of the budget in [0, 1), got "
                    f"{self.warmup_steps}."
                )
        if not self.target_cache_max_gb > 0:
            raise ValueError(f"target_cache_max_gb must be > 0, got {self.target_cache_max_gb}.")
        if self.remove_unused_columns:
            raise ValueError(
                "remove_unused_columns=True would drop the `loss_mask` column the DSparkTrainer needs; "
                "leave it False (columns other than `input_ids` and `loss_mask` are ignored anyway)."
            )


__all__ = ["DSparkTrainingArguments"]
