"""Text conditioning passed between stages: CLIP text embedding, per-token hidden states, token mask."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextCond:
    embed: torch.Tensor  # (B, D) projected EOT embedding, not normalized
    hidden: torch.Tensor  # (B, L, W) last hidden states after the final LayerNorm
    mask: torch.Tensor  # (B, L) bool, True up to and including EOT

    def __len__(self) -> int:
        return self.embed.shape[0]

    def to(self, device) -> "TextCond":
        return TextCond(self.embed.to(device), self.hidden.to(device), self.mask.to(device))

    def expand(self, batch: int) -> "TextCond":
        """A one-row condition (the empty prompt) repeated to `batch` rows."""
        return TextCond(
            self.embed.expand(batch, -1), self.hidden.expand(batch, -1, -1), self.mask.expand(batch, -1)
        )

    def repeat_interleave(self, n: int) -> "TextCond":
        return TextCond(*(t.repeat_interleave(n, dim=0) for t in (self.embed, self.hidden, self.mask)))

    @staticmethod
    def cat(a: "TextCond", b: "TextCond") -> "TextCond":
        """[a; b] along the batch (classifier-free guidance: [uncond; cond])."""
        return TextCond(
            torch.cat([a.embed, b.embed]), torch.cat([a.hidden, b.hidden]), torch.cat([a.mask, b.mask])
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"text_embed": self.embed, "text_hidden": self.hidden, "text_mask": self.mask}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "TextCond | None":
        if not all(k in tensors for k in ("text_embed", "text_hidden", "text_mask")):
            return None
        return cls(tensors["text_embed"].float(), tensors["text_hidden"].float(), tensors["text_mask"].bool())
