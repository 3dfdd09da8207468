"""Exports that leave this package behind: the Hugging Face PEFT adapter layout and merged models.

* :func:`export_peft` / :func:`import_peft`: ``adapter_config.json`` + ``adapter_model.safetensors``, which
  ``peft.PeftModel.from_pretrained`` loads and peft's ``save_pretrained`` writes (LoRA, prompt tuning,
  P-tuning, prefix tuning; one format per method, see :mod:`lightning_peft.export.hf_peft`).
* :func:`export_merged`: LoRA folded into the base and saved with ``save_pretrained``.

``lightning-peft export`` does both from a training checkpoint (:mod:`lightning_peft.export_cli`).
"""

from lightning_peft.export import lora as _lora  # registers the LoRA format
from lightning_peft.export import prompt as _prompt  # prompt tuning, P-tuning, prefix tuning
from lightning_peft.export.hf_peft import PeftFormat, export_peft, import_peft, register_peft_format
from lightning_peft.export.merged import export_merged

__all__ = ["PeftFormat", "export_merged", "export_peft", "import_peft", "register_peft_format"]
del _lora, _prompt
