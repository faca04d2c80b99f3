"""The paper's metrics over folders of images: CLIP score, Frechet distance in CLIP space, Inception FID.

  clip_score  100 x the mean over images of max(cos(CLIP image embedding, CLIP text embedding of its
              prompt), 0): CLIPScore with w = 1 (Hessel et al. 2021), clamped at 0 as they and the
              text-to-image papers report it
  fd_clip     the Frechet distance between Gaussians fitted to the CLIP image embeddings (projected,
              not normalized) of two folders (Kynkaanniemi et al. 2023, "The Role of ImageNet Classes
              in Frechet Inception Distance")
  fid         the same distance over the 2048 pool features of torch-fidelity's Inception-v3 (the
              TensorFlow FID network, ported), its weights read from a local file, never downloaded

A folder (`open_images`): DIR/manifest.jsonl as `unclip generate --out-dir` writes it (each line's
`file` and `prompt`), webdataset shards (key.png + key.txt, the caption as prompt; `--format tar`),
or image files, each prompt from a same-named .txt beside it, else from the PNG's unclip record.

Features are summed in float64 as they stream (count, sum, sum of outer products), so memory is flat
in the number of images. Under torchrun, rank r takes items r, r + K, r + 2K... of each folder and
the ranks' sums are gathered and added in rank order; every rank returns the same figures.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unclip_cli.checks import finite_result
from unclip_cli.data.sources import TarSource, walk_images, walk_tars
from unclip_cli.distributed import Dist
from unclip_cli.errors import UserError
from unclip_cli.io import RECORD_KEY, decode_image, load_state_dict, read_input, show
from unclip_cli.models.clip import ClipEncoder
from unclip_cli.record import from_png_text

MANIFEST_NAME = "manifest.jsonl"
INCEPTION_NAME = "inception-v3-compat"  # torch-fidelity's name for the FID network
Progress = Callable[[str, int, int], None]  # (what, items done, items) on this process


# --------------------------------------------------------------------------- folders


class ImageSet:
    """A folder's images in a fixed order, each with its prompt where one is known (see the module's doc)."""

    def __init__(self, name: str, files: list[tuple[Path, str | None]] | None = None, tar: TarSource | None = None):
        self.name = name
        self.files = files or []  # (image path, prompt or None: then a .txt beside it or the PNG's record)
        self.tar = tar

    def __len__(self) -> int:
        return len(self.tar) if self.tar is not None else len(self.files)

    def item(self, i: int) -> tuple[Image.Image, str | None, str]:
        """(RGB image, prompt or None, display name)."""
        if self.tar is not None:
            return self.tar.pil_images([i])[0], self.tar.caption(i), f"{self.name}[{i}]"
        path, prompt = self.files[i]
        data, name = read_input(str(path), "an image")
        img = decode_image(data, name)
        caption = path.with_suffix(".txt")
        if prompt is None and caption.is_file():
            try:
                prompt = caption.read_text(encoding="utf-8", errors="replace").strip() or None
            except OSError as e:
                raise UserError(f"{show(caption)}: cannot read ({e.strerror or e})") from None
        if prompt is None:
            record = from_png_text(img.info.get(RECORD_KEY)) or {}
            prompts, index = record.get("prompts"), record.get("index", 0)
            if isinstance(prompts, list) and isinstance(index, int) and 0 <= index < len(prompts):
                prompt = prompts[index] if isinstance(prompts[index], str) else None
        return img, prompt, name


def open_images(spec: str, what: str) -> ImageSet:
    """A folder (manifest, shards or images) or one .tar shard -> its ImageSet; `what` names it in errors."""
    path = Path(spec)
    label = f"{what} {show(spec)}"
    if path.is_file() and path.name.lower().endswith(".tar"):
        return ImageSet(spec, tar=TarSource([path], spec))
    if not path.is_dir():
        raise UserError(f"{label}: {'not a folder or a .tar shard' if path.exists() else 'no such folder'}")
    images = walk_images(path)
    if not images and (shards := walk_tars(path)):
        return ImageSet(spec, tar=TarSource(shards, spec))
    if (path / MANIFEST_NAME).is_file() and images:
        return ImageSet(spec, files=_manifest_files(path, label))
    if not images:
        raise UserError(f"{label}: no images found (png, jpg, jpeg, webp, or .tar shards)")
    return ImageSet(spec, files=[(p, None) for p in images])


def _manifest_files(root: Path, label: str) -> list[tuple[Path, str | None]]:
    """DIR/manifest.jsonl -> (DIR/file, prompt) per line, a file listed twice kept once (its last line)."""
    where = root / MANIFEST_NAME
    files: dict[str, str] = {}
    try:
        lines = where.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{show(where)}: cannot read ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{show(where)}: line {n}: not valid JSON ({e})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not isinstance(entry.get("prompt"), str):
            raise UserError(f"{show(where)}: line {n}: expected a JSON object with \"file\" and \"prompt\" strings")
        files[entry["file"]] = entry["prompt"]
    if not files:
        raise UserError(f"{label}: {MANIFEST_NAME} lists no images")
    return [(root / name, prompt) for name, prompt in files.items()]


# --------------------------------------------------------------------------- statistics


@dataclass
class Moments:
    """Running sums of feature vectors in float64: count, sum (D,), sum of outer products (D, D)."""

    n: int = 0
    total: torch.Tensor | None = None
    outer: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().to("cpu", torch.float64)  # (B, D)
        if self.total is None:
            self.total, self.outer = x.new_zeros(x.shape[1]), x.new_zeros(x.shape[1], x.shape[1])
        self.total += x.sum(0)
        self.outer += x.T @ x
        self.n += len(x)

    def merge(self, other: "Moments") -> None:
        if other.total is None:
            return
        if self.total is None:
            self.total, self.outer = other.total.clone(), other.outer.clone()
        else:
            self.total += other.total
            self.outer += other.outer
        self.n += other.n

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (D,) and unbiased covariance (D, D) (numpy.cov's), float64; needs n >= 2."""
        mu = self.total / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu, (cov + cov.T) / 2


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)), in float64 (Dowson & Landau 1982).

    With cov1 = V diag(w) V^T, Tr((cov1 cov2)^(1/2)) is the sum of the square roots of the eigenvalues
    of the symmetric diag(w)^(1/2) V^T cov2 V diag(w)^(1/2), over cov1's numerical range (w above
    max(w) x D x eps; the rest is rounding): real and non-negative even for the rank-deficient
    covariances of fewer images than dimensions, and an r x r matrix for rank r. A result below 0
    (two equal sets) is rounding, returned as 0."""
    mu1, cov1, mu2, cov2 = (t.to(torch.float64) for t in (mu1, cov1, mu2, cov2))
    w, v = torch.linalg.eigh(cov1)
    keep = w > w.max().clamp(min=0) * len(w) * torch.finfo(torch.float64).eps
    b = v[:, keep] * w[keep].sqrt()  # (D, r): cov1 = b b^T on its range
    m = b.T @ cov2 @ b  # (r, r)
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return max(float(diff @ diff + cov1.trace() + cov2.trace() - 2 * tr_sqrt), 0.0)


# --------------------------------------------------------------------------- feature extractors


class Inception:
    """torch-fidelity's FID Inception-v3 with weights from a local file: images -> (B, 2048) pool features.

    The file is read safely (safetensors, or torch.load with weights_only=True) by io.load_state_dict;
    torch-fidelity unpickles its weights argument with weights_only=False, so it is handed a copy this
    process wrote itself (plain tensors), never the user's file."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu"):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise UserError("--inception-weights needs torch-fidelity: pip install 'unclip[fid]'") from None
        state = load_state_dict(path)
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "inception.pt"
            torch.save({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, copy)
            try:
                net = FeatureExtractorInceptionV3(INCEPTION_NAME, ["2048"], feature_extractor_weights_path=str(copy))
            except RuntimeError as e:  # load_state_dict: missing or unexpected keys, wrong shapes
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise UserError(f"{show(path)}: not torch-fidelity's Inception-v3 (FID) weights ({first[:200]})") from None
        self.net = net.to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        out = []
        for _, run in itertools.groupby(images, key=lambda im: im.size):  # runs of one size; the network resizes to 299
            x = torch.from_numpy(np.stack([np.array(im.convert("RGB"), dtype=np.uint8) for im in run]))  # (b, H, W, 3)
            out.append(self.net(x.permute(0, 3, 1, 2).to(self.device))[0].float())
        return torch.cat(out)  # (B, 2048)


# --------------------------------------------------------------------------- one folder's sums


@dataclass
class Sums:
    """What one folder's images add up to on one process (or, merged, on all)."""

    clip: Moments = field(default_factory=Moments)
    inception: Moments = field(default_factory=Moments)
    score: float = 0.0  # sum over prompted images of 100 x max(cos, 0)
    prompted: int = 0
    unprompted: tuple[int, str] | None = None  # (index, name) of the first image without a prompt

    def merge(self, other: "Sums") -> None:
        self.clip.merge(other.clip)
        self.inception.merge(other.inception)
        self.score += other.score
        self.prompted += other.prompted
        if other.unprompted is not None and (self.unprompted is None or other.unprompted[0] < self.unprompted[0]):
            self.unprompted = other.unprompted


def clip_score(image_embed: torch.Tensor, text_embed: torch.Tensor) -> torch.Tensor:
    """(B, D) CLIP image and text embeddings of image-prompt pairs -> (B,) float64 100 x max(cos, 0)."""
    cos = F.cosine_similarity(image_embed.cpu().double(), text_embed.cpu().double(), dim=-1)
    return 100 * cos.clamp(min=0)


def folder_sums(
    images: ImageSet, clip: ClipEncoder, *, inception: Inception | None = None, prompts: bool = True,
    batch_size: int = 32, d: Dist | None = None, progress: Progress | None = None, what: str = "images",
) -> Sums:
    """This process's share of a folder (items rank, rank + K, ...) in batches: CLIP image features,
    Inception features (given an extractor), and with `prompts` the CLIP score of the prompted images."""
    sums, d = Sums(), d or Dist()
    mine = range(d.rank, len(images), d.world_size)
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size]
        batch = [images.item(i) for i in idx]
        pics = [img for img, _, _ in batch]
        embed = finite_result(clip.encode_image(pics), "CLIP image features", "check the CLIP's weights")  # (B, D)
        sums.clip.add(embed)
        if inception is not None:
            sums.inception.add(finite_result(inception(pics), "Inception features", "check --inception-weights"))
        if prompts:
            have = [(row, p) for row, (_, p, _) in enumerate(batch) if p is not None]
            if have:
                text = clip.encode_text([p for _, p in have])[0]  # (b, D)
                finite_result(text, "CLIP text features", "check the CLIP's weights")
                sums.score += float(clip_score(embed[[row for row, _ in have]], text).sum())
                sums.prompted += len(have)
            missing = next(((i, name) for i, (_, p, name) in zip(idx, batch) if p is None), None)
            if missing is not None and sums.unprompted is None:
                sums.unprompted = missing
        if progress is not None:
            progress(what, start + len(idx) - 1, len(mine))
    return sums


def _gather(sums: Sums | None, error: str | None, d: Dist) -> Sums:
    """Every rank's sums added in rank order (the same on every rank); a rank's error raised on all."""
    if not d.enabled:
        assert sums is not None
        return sums
    import torch.distributed as dist

    parts: list = [None] * d.world_size
    dist.all_gather_object(parts, (sums, error))
    errors = [e for _, e in parts if e is not None]
    if errors:
        raise UserError(errors[0])
    merged = Sums()
    for part, _ in parts:
        merged.merge(part)
    return merged


def _all_ranks(d: Dist, run: Callable[[], Sums]) -> Sums:
    """run() on this rank; its UserError is carried to the others, so no rank waits for a failed one."""
    if not d.enabled:
        return run()
    try:
        sums, error = run(), None
    except UserError as e:
        sums, error = None, str(e)
    return _gather(sums, error, d)


# --------------------------------------------------------------------------- the figures


def compute_metrics(
    fake: ImageSet, clip: ClipEncoder, *, real: ImageSet | None = None, inception: Inception | None = None,
    batch_size: int = 32, d: Dist | None = None, progress: Progress | None = None, log: Callable[[str], None] | None = None,
) -> dict:
    """{"clip_score", "fd_clip", "fid", "fake_images", "real_images"} (None where not computed), the same
    on every rank. The CLIP score needs a prompt for every fake image; fd_clip and fid need `real`
    (fid also `inception`), and at least 2 images in each folder."""
    say, d = log or (lambda message: None), d or Dist()
    if real is not None:
        for s in (fake, real):
            if len(s) < 2:
                raise UserError(f"{show(s.name)}: {len(s)} image; a Frechet distance needs at least 2 per folder")
    opts = dict(inception=inception if real is not None else None, batch_size=batch_size, d=d, progress=progress)
    f = _all_ranks(d, lambda: folder_sums(fake, clip, prompts=True, what="fake images", **opts))
    result = {"clip_score": None, "fd_clip": None, "fid": None, "fake_images": len(fake), "real_images": None}
    if f.prompted and f.unprompted is not None:
        index, name = f.unprompted
        raise UserError(f"{name}: no prompt (no manifest line, caption .txt or unclip record); "
                        "the CLIP score needs one for every image")
    if f.prompted:
        result["clip_score"] = f.score / f.prompted
    elif real is None:
        raise UserError(f"{show(fake.name)}: no prompts (manifest.jsonl, key.txt or .txt captions, unclip PNG records) "
                        "and no --real folder: nothing to compute")
    else:
        say(f"{fake.name}: no prompts, no CLIP score")
    if real is None:
        return result
    r = _all_ranks(d, lambda: folder_sums(real, clip, prompts=False, what="real images", **opts))
    result["real_images"] = len(real)
    result["fd_clip"] = frechet_distance(*f.clip.mean_cov(), *r.clip.mean_cov())
    if inception is not None:
        result["fid"] = frechet_distance(*f.inception.mean_cov(), *r.inception.mean_cov())
    return result
