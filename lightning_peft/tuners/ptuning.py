"""P-tuning (Liu et al. 2021, "GPT Understands, Too").

Like prompt tuning, ``n`` virtual tokens are put in front of the input embeddings, but they are the output
of a small prompt encoder over ``n`` learned input embeddings ``E`` (n x d), which couples the tokens and
eases optimisation:

* ``encoder="mlp"``: ``Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, d)``;
* ``encoder="lstm"``: a bidirectional LSTM (``encoder_num_layers`` layers, hidden ``h``) then
  ``Linear(2h, 2h) -> ReLU -> Linear(2h, d)``.

Insertion, masks, labels and generation (also encoder-decoder models such as T5) are shared with
:mod:`lightning_peft.tuners.prompt`. The layout and
parameter names (``prompt_encoder.embedding``, ``.mlp_head``, ``.lstm_head``) follow Hugging Face PEFT's
``PromptEncoder``, so its weights move over as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from lightning_peft.config import TunerConfig, check_choice, check_positive, register_tuner
from lightning_peft.tuners.prompt import (
    VirtualTokens,
    _check_tokens,
    attach_virtual_tokens,
    check_prompt_fields,
    hf_root,
)

__all__ = ["PTuningConfig", "PromptEncoder"]


class PromptEncoder(VirtualTokens):
    """``n`` learned embeddings through an MLP or a bidirectional LSTM + MLP: returns ``(n, d)``."""

    def __init__(
        self, num_virtual_tokens: int, dim: int, *, encoder: str, hidden: int, num_layers: int, dropout: float
    ) -> None:
        super().__init__(num_virtual_tokens)
        self.encoder = encoder
        self.embedding = nn.Embedding(num_virtual_tokens, dim)
        if encoder == "lstm":
            self.lstm_head = nn.LSTM(
                dim, hidden, num_layers=num_layers, dropout=dropout, bidirectional=True, batch_first=True
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim)
            )
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, dim),
            )

    def forward(self) -> Tensor:
        x = self.embedding.weight  # (n, d)
        if self.encoder == "lstm":
            x = self.lstm_head(x[None])[0][0]  # (n, 2h): the LSTM reads the n tokens as one sequence
        return self.mlp_head(x)  # (n, d)

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, encoder={self.encoder!r}"


@register_tuner("ptuning")
@dataclass(kw_only=True)
class PTuningConfig(TunerConfig):
    """P-tuning hyper-parameters.

    Attributes:
        num_virtual_tokens: number of virtual tokens ``n`` (> 0).
        encoder: prompt encoder, ``"mlp"`` or ``"lstm"``.
        encoder_hidden_size: hidden width ``h`` of the encoder (``None``: the model's embedding width).
        encoder_num_layers: LSTM layers (the MLP always has three linear layers).
        encoder_dropout: dropout between LSTM layers.

    Example::

        PTuningConfig(num_virtual_tokens=10, encoder="lstm", encoder_hidden_size=128)
    """

    #: Untrained virtual tokens still take part in attention: outputs change.
    identity_at_init = False

    num_virtual_tokens: int = 20
    encoder: str = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_prompt_fields(self, "PTuningConfig")
        _check_tokens("PTuningConfig", self.num_virtual_tokens)
        check_choice("PTuningConfig", "encoder", self.encoder, ["mlp", "lstm"])
        if self.encoder_hidden_size is not None:
            check_positive("PTuningConfig", "encoder_hidden_size", self.encoder_hidden_size)
        check_positive("PTuningConfig", "encoder_num_layers", self.encoder_num_layers)
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"PTuningConfig.encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")
        if self.encoder == "mlp" and self.encoder_num_layers != 2:
            raise ValueError(
                "PTuningConfig.encoder_num_layers applies to encoder='lstm' only (the MLP encoder always has "
                "three linear layers); leave it at 2"
            )

    def apply(self, model: nn.Module) -> list[str]:
        dim = hf_root(model, "PTuningConfig", encoder_decoder=True).get_input_embeddings().weight.shape[1]
        encoder = PromptEncoder(
            self.num_virtual_tokens,
            dim,
            encoder=self.encoder,
            hidden=self.encoder_hidden_size or dim,
            num_layers=self.encoder_num_layers,
            dropout=self.encoder_dropout,
        )
        return [attach_virtual_tokens(model, encoder, "PTuningConfig")]
