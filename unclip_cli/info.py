"""`unclip info`: human-readable summaries of stage files, arrays, images and model sets."""

from __future__ import annotations

import json
from pathlib import Path

from unclip_cli.errors import UserError


def describe(path: str) -> list[str]:
    p = Path(path)
    if p.is_dir():
        return _describe_model_set(p)
    from unclip_cli.io import NPY_MAGIC, PNG_MAGIC, RECORD_KEY, decode_image, parse_stage, read_input, split_pngs
    from unclip_cli.record import from_meta, from_png_text

    data, name = read_input(path, "a file")
    if data.startswith(PNG_MAGIC) or data[:3] == b"\xff\xd8\xff":
        parts = split_pngs(data, name)
        lines = [f"{name}: {len(parts)} image(s)"]
        for i, part in enumerate(parts):
            img = decode_image(part, name)
            lines.append(f"  [{i}] {img.size[0]}x{img.size[1]} RGB")
            record = from_png_text(img.info.get(RECORD_KEY))
            lines += [f"    {key}: {_show(record[key])}" for key in sorted(record or {})]
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
    record = from_meta(stage.meta)
    lines += [f"  {key}: {_show(record[key])}" for key in sorted(record)]
    return lines


def _show(value) -> str:
    """A record value on one line: strings as they are, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def remake_command(path: str) -> str:
    """One shell command line that makes the pixels of the PNG at `path` again (from its record)."""
    from unclip_cli.io import RECORD_KEY, read_images
    from unclip_cli.record import NotReproducible, command_line, from_png_text

    (img, name), *rest = read_images([path], "a PNG made by unclip")
    if rest:
        raise UserError(f"{name}: holds {len(rest) + 1} images; --command takes one")
    record = from_png_text(img.info.get(RECORD_KEY))
    if record is None:
        raise UserError(f"{name}: carries no unclip record (not made by unclip, or stripped of its text chunk)")
    try:
        return command_line(record, "out.png" if path == "-" else path)
    except NotReproducible as e:
        raise UserError(f"{name}: cannot be made again from scratch: {e}") from None


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
