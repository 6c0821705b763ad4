"""lcsb: LoRA fine-tuning in little memory, back-propagating through only some blocks each step."""

__version__ = "0.1.0"     # first: modules below record it in what they write (convert.py)

from .config import LoraConfig, ModelConfig, TrainConfig  # noqa: E402
from .engine import lora_gradients  # noqa: E402
from .errors import UserError  # noqa: E402
from .lora import load_adapter, load_model, save_adapter  # noqa: E402
from .model import load_config  # noqa: E402
from .model.tokenizer import load_tokenizer  # noqa: E402
from .trainer import train  # noqa: E402

__all__ = ["LoraConfig", "ModelConfig", "TrainConfig", "UserError", "load_adapter", "load_config", "load_model",
           "load_tokenizer", "lora_gradients", "save_adapter", "train"]
