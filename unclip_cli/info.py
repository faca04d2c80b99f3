"""`unclip info`: human-readable summaries of stage files, arrays, images and model sets."""

from __future__ import annotations

import json
from pathlib import Path

from unclip_cli.errors import UserError


def describe(path: str) -> list[str]:
    p = Path(path)
    if p.is_dir():
        return _describe_model_set(p)
    from unclip_cli.io import NPY_MAGIC, PNG_MAGIC, decode_image, parse_stage, read_input, split_pngs

    data, name = read_input(path, "a file")
    if data.startswith(PNG_MAGIC) or data[:3] == b"\xff\xd8\xff":
        parts = split_pngs(data, name)
        lines = [f"{name}: {len(parts)} image(s)"]
        for i, part in enumerate(parts):
            img = decode_image(part, name)
            lines.append(f"  [{i}] {img.size[0]}x{img.size[1]} RGB")
        return lines
    stage = parse_stage(data, name)  # stdin is read once
    if stage.bare or data.startswith(NPY_MAGIC):
        t = stage.main
        return [f"{name}: bare .npy embedding, shape {tuple(t.shape)}, norms {_norms(t)}"]
    lines = [f"{name}: unclip {stage.kind} stage file (version {stage.meta.get('version')})"]
    for key in sorted(stage.tensors):
        t = stage.tensors[key]
        lines.append(f"  {key}: {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}")
    if "image_embed" in stage.tensors:
        lines.append(f"  image_embed norms: {_norms(stage.tensors['image_embed'])}")
    for key in sorted(stage.meta):
        if key in ("format", "version", "kind"):
            continue
        value = stage.meta[key]
        try:
            value = json.loads(value) if key in ("prompts", "images", "slerp", "mix", "reconstruction_psnr") else value
        except json.JSONDecodeError:
            pass
        lines.append(f"  {key}: {value}")
    return lines


def _norms(t) -> str:
    return ", ".join(f"{v:.3f}" for v in t.float().norm(dim=-1).tolist()[:8])


def _describe_model_set(path: Path) -> list[str]:
    from unclip_cli.modelset import COMPONENTS, ModelSet

    ms = ModelSet.open(str(path))
    clip = ms.manifest.get("clip", {})
    lines = [
        f"{path}: model set {ms.name!r}",
        f"  clip: {clip.get('identity')} (embed {clip.get('embed_dim')}, text width {clip.get('text_width')})",
    ]
    for component in COMPONENTS:
        if not ms.has(component):
            lines.append(f"  {component}: absent")
            continue
        folder = path / component
        if component == "clip":
            size = (folder / "open_clip_model.safetensors").stat().st_size
            lines.append(f"  clip: {size / 2**20:.1f} MiB")
            continue
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise UserError(f"{weights}: missing")
        params = _count_params(weights)
        sampling = ", ".join(f"{k} {v}" for k, v in ms.sampling(component).items())
        lines.append(f"  {component}: {params / 1e6:.2f}M parameters, {weights.stat().st_size / 2**20:.1f} MiB; sampling: {sampling}")
    return lines


def _count_params(weights: Path) -> int:
    from unclip_cli.io import read_safetensors_header

    header = read_safetensors_header(weights)
    total = 0
    for key, v in header.items():
        if key == "__metadata__":
            continue
        n = 1
        for d in v["shape"]:
            n *= d
        total += n
    return total
