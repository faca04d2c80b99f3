"""Either prior behind one call: the diffusion prior or the autoregressive one, with a model set's defaults."""

from __future__ import annotations

from typing import Callable

import torch

from unclip_cli.diffusion.guidance import Guidance
from unclip_cli.errors import UserError
from unclip_cli.stages.conditioning import TextCond

KINDS = {"diffusion": "prior", "ar": "prior-ar"}  # --kind -> component


def prior_kind(ms, kind: str | None) -> str:
    """The prior a call uses: `kind`, else the set's `prior_kind`, else diffusion (ar if that is all it has)."""
    kind = kind or ms.manifest.get("prior_kind") or ("ar" if ms.has("prior-ar") and not ms.has("prior") else "diffusion")
    if kind not in KINDS:
        raise UserError(f"--kind must be diffusion or ar, got {kind!r}")
    return kind


def sample_prior(
    ms,
    device,
    kind: str | None,
    cond: TextCond,
    null: TextCond,
    generator: torch.Generator | None,
    *,
    steps: int | None = None,
    guidance: float | Guidance | None = None,
    candidates: int = 1,
    temperature: float | None = None,
    top_p: float | None = None,
    similarity_percentile: float | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, dict]:
    """Image embeddings (B, D) from the chosen prior, the set's defaults filling what is not given;
    returns them with the settings used (`settings["guidance"]` the float scale). guidance: a scale, or a
    `Guidance` passed through as it is. candidates K > 1: best of K per prompt (stages.manipulate.best_of)."""
    from unclip_cli.stages.manipulate import best_of

    kind = prior_kind(ms, kind)
    component = KINDS[kind]
    defaults = ms.sampling(component)
    net = ms.load(component, device)
    guidance = Guidance.of(defaults["guidance"] if guidance is None else guidance)
    settings = {"kind": kind, "guidance": guidance.scale, "candidates": candidates}
    if kind == "diffusion":
        from unclip_cli.stages.prior import run_prior

        settings["steps"] = steps or defaults["steps"]

        def sample(c: TextCond, n: TextCond) -> torch.Tensor:
            return run_prior(net, c, n, steps=settings["steps"], guidance=guidance, generator=generator, callback=callback)
    else:
        from unclip_cli.stages.prior_ar import run_ar_prior

        for key, value in (("temperature", temperature), ("top_p", top_p), ("similarity_percentile", similarity_percentile)):
            settings[key] = defaults[key] if value is None else value

        def sample(c: TextCond, n: TextCond) -> torch.Tensor:
            try:
                return run_ar_prior(net, c, n, guidance=guidance, temperature=settings["temperature"],
                                    top_p=settings["top_p"], similarity_percentile=settings["similarity_percentile"],
                                    generator=generator, callback=callback)
            except ValueError as e:
                raise UserError(f"prior-ar: {e}") from None

    return best_of(sample, cond, null, candidates), settings
