"""Classifier-free guidance (Ho & Salimans 2022): one rule for both priors and the decoder.

The rule: a stage runs the guided batch [unconditional; conditional] when its scale differs from 1,
and mixes the two halves as uncond + scale * (cond - uncond) (`combine`). A scale of 1 is the
conditional model alone (one half, half the work); 0 the unconditional one; above 1 guides.

The one exception is diffusers' `UnCLIPPipeline`, which runs the guided batch in the prior and the
decoder whenever either scale is above 1, so that at a prior scale of 1 it still runs the batch
(uncond + 1 * (cond - uncond), equal to cond in exact arithmetic but not in the last bits). Karlo
parity needs the same batches, so `unclip generate` builds its two scales with `diffusers_pair`:
the only place that switch exists. No float noise leaves this module: the stages take a
`Guidance` (or a plain float scale, which follows the rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Guidance:
    """A stage's guidance: its scale and whether the [uncond; cond] batch runs."""

    scale: float
    batched: bool  # run the guided batch (see the module's rule)

    @classmethod
    def of(cls, scale: "float | Guidance") -> "Guidance":
        """The rule: batched exactly when the scale is not 1 (a Guidance is returned as it is)."""
        if isinstance(scale, Guidance):
            return scale
        return cls(float(scale), float(scale) != 1.0)

    @classmethod
    def diffusers_pair(cls, prior_scale: float, decoder_scale: float) -> tuple["Guidance", "Guidance"]:
        """The prior's and the decoder's guidance as diffusers' UnCLIPPipeline runs them: both batched
        when either scale is above 1, neither otherwise (its `do_classifier_free_guidance`)."""
        batched = prior_scale > 1.0 or decoder_scale > 1.0
        return cls(float(prior_scale), batched), cls(float(decoder_scale), batched)

    def combine(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """uncond + scale * (cond - uncond)."""
        return uncond + self.scale * (cond - uncond)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batched model output [uncond; cond] -> (uncond, cond)."""
        uncond, cond = out.chunk(2)
        return uncond, cond
