"""Applying a key map (our key -> the diffusers key(s) it is made of) to a diffusers state dict.

Shared by the prior and UNet converters: every source tensor must be used exactly once and every
result must have our shape, otherwise ValueError lists the missing / unused keys or the mismatched
shapes. Several sources for one key are concatenated on dim 0.
"""

from __future__ import annotations

import torch


def apply_key_map(state: dict, expected: dict, key_map: dict[str, list[str]], what: str) -> dict[str, torch.Tensor]:
    """Apply a key map: every source used exactly once, every result of our shape (`what` names the part)."""
    stale = sorted(set(expected) ^ set(key_map))
    assert not stale, f"{what} key map out of date with our model: {stale[:8]}"
    sources = [s for srcs in key_map.values() for s in srcs]
    missing = sorted(s for s in sources if s not in state)
    unused = sorted(set(state) - set(sources))
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unused:
        problems.append(f"unused keys {unused}")
    if problems:
        raise ValueError(f"diffusers {what} weights: " + "; ".join(problems))
    bad = []
    for ours, srcs in key_map.items():
        shape = tuple(expected[ours].shape)
        part = (shape[0] // len(srcs), *shape[1:])  # each source's share of a concatenation
        bad += [f"{s} {tuple(state[s].shape)} != {part}" for s in srcs if tuple(state[s].shape) != part]
    if bad:
        raise ValueError(f"diffusers {what} weights: shape mismatch " + "; ".join(bad))
    return {
        ours: state[srcs[0]] if len(srcs) == 1 else torch.cat([state[s] for s in srcs], dim=0)
        for ours, srcs in key_map.items()
    }
