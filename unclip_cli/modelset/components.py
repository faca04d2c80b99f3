"""A component folder (prior/, decoder/, ...): config.json + model.safetensors, the config also in the weights' metadata."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch

from unclip_cli.errors import UserError
from unclip_cli.io import atomic_write, read_json_object, save_weights
from unclip_cli.models.configs import (
    ARPriorConfig,
    DecoderConfig,
    PriorConfig,
    UpsamplerConfig,
    config_from_dict,
    config_to_dict,
)

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
# every component but clip/ (open_clip's own layout) and its config type
CONFIG_TYPES = {
    "prior": PriorConfig,
    "prior-ar": ARPriorConfig,
    "decoder": DecoderConfig,
    "upsampler-256": UpsamplerConfig,
    "upsampler-1024": UpsamplerConfig,
}


def build_component(component: str, cfg) -> torch.nn.Module:
    """A freshly initialized network for a component config."""
    if component == "prior":
        from unclip_cli.models.prior import DiffusionPrior

        return DiffusionPrior(cfg)
    if component == "prior-ar":
        from unclip_cli.models.ar_prior import ARPrior

        return ARPrior(cfg)
    if component == "decoder":
        from unclip_cli.models.decoder import Decoder

        return Decoder(cfg)
    if component.startswith("upsampler"):
        from unclip_cli.models.upsampler import Upsampler

        return Upsampler(cfg)
    raise ValueError(f"unknown component {component}")


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """Networks built inside skip their random initialization (torch.nn.init's fills do nothing): for
    builds whose parameters are loaded next, or that only need shapes (on the meta device, where the
    fills would cost seconds, importing torch._dynamo)."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def empty_component(component: str, cfg) -> torch.nn.Module:
    """build_component on the meta device, uninitialized: shapes only, nothing allocated (the
    attention masks, built on the CPU, excepted); fill it with load_state_dict(..., assign=True)."""
    with no_init(), torch.device("meta"):
        return build_component(component, cfg)


def seeded_component(component: str, cfg, seed: int, index: int) -> torch.nn.Module:
    """build_component seeded by (seed, the component's place in its preset), the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + index + 1)
        return build_component(component, cfg)


def read_component_config(folder: Path, component: str):
    """The typed config in folder/config.json; a one-line UserError if missing or invalid."""
    if not (folder / CONFIG).is_file():
        raise UserError(f"{folder}: {CONFIG} missing")
    data = read_json_object(folder / CONFIG, "component config")
    try:
        return config_from_dict(CONFIG_TYPES[component], data)
    except (ValueError, TypeError) as e:
        raise UserError(f"{folder / CONFIG}: invalid ({str(e).splitlines()[0][:300]})") from None


def save_component(root: Path, component: str, cfg, module: torch.nn.Module | dict[str, torch.Tensor]) -> None:
    """Write config.json + model.safetensors (config also in the weights' metadata); module: a network or its state dict."""
    folder = Path(root) / component
    folder.mkdir(parents=True, exist_ok=True)
    cfg_dict = config_to_dict(cfg)
    atomic_write(folder / CONFIG, (json.dumps(cfg_dict, indent=2) + "\n").encode())
    state = module if isinstance(module, dict) else module.state_dict()
    state = {k: v.detach().float() for k, v in state.items()}
    save_weights(folder / WEIGHTS, state, {"component": component, "config": json.dumps(cfg_dict)})
