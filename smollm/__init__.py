"""smollm: a hand-written SmolLM2-135M trained with PyTorch Lightning."""

from smollm.config import ModelConfig
from smollm.model import SmolLM

__all__ = ["ModelConfig", "SmolLM"]
__version__ = "0.1.0"
