"""A small causal transformer language model in plain PyTorch (the ``lm-distil`` recipe's teacher and student).

Pre-LayerNorm blocks (multi-head causal self-attention through
:func:`torch.nn.functional.scaled_dot_product_attention`, a GELU MLP of width ``4 d``), learned
positional embeddings, a final LayerNorm and an untied output layer ``head`` without bias.
:meth:`CausalLM.hidden` returns the final hidden states: what a fused linear + KD loss takes
together with ``head.weight`` instead of the logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CausalLM", "LMConfig"]


@dataclass(frozen=True)
class LMConfig:
    """Sizes of a :class:`CausalLM`: vocabulary, context, width, depth, heads, dropout."""

    vocab_size: int = 256
    context: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context", "d_model", "n_layers", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LMConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model must be a multiple of n_heads, got d_model={self.d_model}, n_heads={self.n_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)


class _Block(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model)
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, length, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, length, d)))
        out: Tensor = x + self.drop(self.mlp(self.ln2(x)))
        return out


class CausalLM(nn.Module):
    """A GPT-style causal language model: ``tokens (B, L)`` int64 -> logits ``(B, L, V)``.

    Args:
        cfg: the sizes (:class:`LMConfig`).

    Example:
        >>> import torch
        >>> lm = CausalLM(LMConfig(vocab_size=16, context=8, d_model=8, n_layers=1, n_heads=2))
        >>> tokens = torch.randint(0, 16, (2, 5))
        >>> lm(tokens).shape, lm.hidden(tokens).shape
        (torch.Size([2, 5, 16]), torch.Size([2, 5, 8]))
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def hidden(self, tokens: Tensor) -> Tensor:
        """The final hidden states ``(B, L, d_model)`` (after the last LayerNorm, before ``head``)."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (B, L), got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.cfg.context:
            raise ValueError(f"sequences of {tokens.shape[1]} tokens exceed the context of {self.cfg.context}")
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.embed(tokens) + self.pos(pos))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)  # type: ignore[no-any-return]

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.hidden(tokens))  # type: ignore[no-any-return]
