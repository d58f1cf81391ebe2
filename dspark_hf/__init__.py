"""DSpark speculative decoding, native to the Hugging Face stack.

Importing the package registers the drafter with transformers' Auto classes, so `AutoModel.from_pretrained`
loads DSpark checkpoints without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_dspark import DSparkConfig
from .convert import export_deepspec
from .generation import DSparkGenerationMixin, DSparkGenerationStats
from .loss import DSparkLossOutput, dspark_loss
from .modeling_dspark import DSparkForCausalLM, DSparkOutput
from .trainer import DSparkTrainer
from .training_args import DSparkTrainingArguments

AutoConfig.register(DSparkConfig.model_type, DSparkConfig, exist_ok=True)
AutoModel.register(DSparkConfig, DSparkForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(DSparkConfig, DSparkForCausalLM, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "DSparkConfig",
    "DSparkForCausalLM",
    "DSparkGenerationMixin",
    "DSparkGenerationStats",
    "DSparkLossOutput",
    "DSparkOutput",
    "DSparkTrainer",
    "DSparkTrainingArguments",
    "dspark_loss",
    "export_deepspec",
]
