"""DSpark speculative decoding, native to the Hugging Face stack.

Importing the package registers the drafter with transformers' Auto classes, so `AutoModel.from_pretrained`
loads native DSpark checkpoints without `trust_remote_code`; `DSparkForCausalLM.from_pretrained` also loads
DeepSpec's and speculators' layouts (`dspark_hf.formats`). Nothing else of transformers is changed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .check import DrafterCheckReport, check_drafter
from .configuration_dspark import DSparkConfig
from .formats.deepspec import export_deepspec
from .formats.speculators import export_speculators
from .generation.drafting import DSparkGenerationMixin
from .generation.target_tap import DSparkGenerationStats
from .modeling_dspark import DSparkForCausalLM, DSparkOutput
from .training.arguments import DSparkTrainingArguments
from .training.loss import DSparkLossOutput, dspark_loss
from .training.trainer import DSparkTrainer
from .version import __version__ as __version__

AutoConfig.register(DSparkConfig.model_type, DSparkConfig, exist_ok=True)
AutoModel.register(DSparkConfig, DSparkForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(DSparkConfig, DSparkForCausalLM, exist_ok=True)


__all__ = [
    "DSparkConfig",
    "DSparkForCausalLM",
    "DrafterCheckReport",
    "DSparkGenerationMixin",
    "DSparkGenerationStats",
    "DSparkLossOutput",
    "DSparkOutput",
    "DSparkTrainer",
    "DSparkTrainingArguments",
    "check_drafter",
    "dspark_loss",
    "export_deepspec",
    "export_speculators",
]
