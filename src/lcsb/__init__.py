"""lcsb: LoRA fine-tuning in little memory, back-propagating through only some blocks each step."""

from .config import LoraConfig, ModelConfig
from .errors import UserError
from .model import load_config, load_model

__version__ = "0.1.0"

__all__ = ["LoraConfig", "ModelConfig", "UserError", "load_config", "load_model"]

from .engine import lora_gradients  # noqa: E402
from .lora import load_adapter, save_adapter  # noqa: E402

__all__ += ["lora_gradients", "load_adapter", "save_adapter"]

from .config import TrainConfig  # noqa: E402
from .model.tokenizer import load_tokenizer  # noqa: E402


def train(cfg: TrainConfig, **kw):
    """Run a fine-tuning job (see `lcsb.trainer.train`)."""
    from .trainer import train as _train
    return _train(cfg, **kw)


__all__ += ["TrainConfig", "load_tokenizer", "train"]
