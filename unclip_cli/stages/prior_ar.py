"""Autoregressive prior stage: text conditioning -> CLIP image embedding, code by code.

Sampling (Ramesh et al. 2022, section 2.2): the similarity token is drawn uniformly from the
buckets at or above `similarity_percentile` of its training distribution (50: the top half, as the
paper), then the K codes one at a time with classifier-free guidance on the logits (the empty
prompt as unconditional), temperature and nucleus (top-p) filtering. All draws come from the CPU
generator, so a seed gives the same embedding on any device; with a list of generators, each draws
its own rows (device.generator_rows), as a batch of those rows alone would.
"""

from __future__ import annotations

from typing import Callable

import torch

from unclip_cli.device import Generators, generator_rows
from unclip_cli.diffusion.guidance import Guidance
from unclip_cli.models.ar_prior import ARPrior
from unclip_cli.stages.conditioning import TextCond


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely entries whose mass reaches top_p (Holtzman et al. 2019); renormalize."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the entries ranked above each one
    sorted_p = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))  # the first always stays
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return kept / kept.sum(-1, keepdim=True)


@torch.no_grad()
def run_ar_prior(
    prior: ARPrior,
    cond: TextCond,
    null: TextCond,
    *,
    guidance: float | Guidance,
    temperature: float = 1.0,
    top_p: float = 1.0,
    similarity_percentile: float = 50.0,
    generator: Generators,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Sample image embeddings (B, D) for B text conditions with the AR prior.

    guidance: a scale (the [uncond; cond] batch runs when it is not 1) or a `Guidance`. The network
    sees its own dtype; logits and the embedding come back float32.
    """
    if not prior.fitted:
        raise ValueError("the AR prior has no fitted PCA: train it first (unclip train prior-ar)")
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    if not 0 < top_p <= 1:
        raise ValueError("top_p must be in (0, 1]")
    if not 0 <= similarity_percentile < 100:
        raise ValueError("similarity_percentile must be in [0, 100)")
    device, dtype = prior.pca_mean.device, prior.text_proj.weight.dtype
    batch, k = len(cond), prior.kept
    guidance = Guidance.of(guidance)
    batched = guidance.batched  # run the [uncond; cond] batch
    cond = cond.to(device)
    both = TextCond.cat(null.to(device).expand(batch), cond) if batched else cond
    n_sim = prior.cfg.num_sim_buckets
    lowest = min(int(similarity_percentile / 100 * n_sim), n_sim - 1)
    groups = generator_rows(generator, batch)  # [(generator, rows)]
    sim = torch.cat([torch.randint(lowest, n_sim, (rows,), generator=g) for g, rows in groups]).to(device)  # (B,)
    s_in = torch.cat([sim, sim]) if batched else sim
    logits, state = prior.start_decoding(s_in, both.embed.to(dtype), both.hidden.to(dtype), both.mask)  # KV cache
    codes = []
    for j in range(k):
        logits = logits.float()  # (B or 2B, nb)
        if batched:
            logits = guidance.combine(*guidance.split(logits))
        probs = top_p_filter(torch.softmax(logits.cpu() / temperature, dim=-1), top_p)  # drawn on the CPU
        parts = probs.split([rows for _, rows in groups])  # each generator samples its own rows
        nxt = torch.cat([torch.multinomial(p, 1, generator=g) for (g, _), p in zip(groups, parts)])  # (B, 1)
        nxt = nxt[:, 0].to(device)  # (B,)
        codes.append(nxt)
        if j + 1 < k:
            logits = prior.next_logits(torch.cat([nxt, nxt]) if batched else nxt, state)
        if callback is not None:
            callback(j, k)
    codes = torch.stack(codes, dim=1)  # (B, K)
    return prior.decode(codes).float()
