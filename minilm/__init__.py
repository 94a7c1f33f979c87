"""minilm: a readable Transformer language-model library in pure PyTorch."""

from minilm.config import PRESETS, ModelConfig, preset
from minilm.model import CausalLM, MaskedLM, ModelOutput, ReplacedTokenDetection, SequenceClassifier, Transformer

__all__ = ["PRESETS", "ModelConfig", "preset", "CausalLM", "MaskedLM", "ModelOutput",
           "ReplacedTokenDetection", "SequenceClassifier", "Transformer"]
__version__ = "0.1.0"
