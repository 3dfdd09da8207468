"""lightning-peft: parameter-efficient fine-tuning for any ``nn.Module``, one Lightning callback away."""

__version__ = "0.1.0"
