"""What training means for each component: its batches, its loss, how it is written back.

A `Task` holds the trainable network (`module`, what the model set stores) and `net`, a thin
nn.Module whose forward runs every parameter the loss trains (what DistributedDataParallel wraps).
A step is `fetch` (CPU work on data only: sampling, cropping, degrading; it may run in a background
thread) then `loss` (on the device: CLIP encoding, dropout of the conditioning, noise, forward).
Both take their own generator, so a step's randomness is a function of the loop's seeds.

- clip: open_clip's contrastive loss (Radford et al. 2021) on image-caption batches.
- prior: x0 MSE in the normalized embedding space; the text conditioning replaced by the empty
  prompt's 10% of the time (Ramesh et al. 2022, sec. 2.2).
- decoder: the hybrid loss (eps MSE + lambda L_vlb); the image embedding replaced by the learned
  null embedding 10% of the time, the text by the empty prompt's 50% (sec. 2.1).
- upsamplers: MSE to the noise or the clean crop (as the config predicts) on random crops a
  quarter of the output size (or `--crop`), their colors jittered (`degrade.color_jitter`), conditioned on the
  crop downsampled and corrupted (blur for 64->256, BSR degradation for 256->1024); a `last`
  network, when the set has one, is trained on the same crops at t < LAST_NETWORK_MAX_T (it serves t = 0).
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from unclip_cli.diffusion.schedule import GaussianDiffusion
from unclip_cli.errors import UserError
from unclip_cli.train.degrade import JITTER_OFFSET, bsr_degrade, color_jitter, gaussian_blur
from unclip_cli.train.losses import diffusion_loss

PRIOR_TEXT_DROP = 0.1  # classifier-free guidance dropout rates (paper, sec. 2.1-2.2)
DECODER_IMAGE_DROP = 0.1
DECODER_TEXT_DROP = 0.5
STATS_SAMPLES = 1024  # images encoded for the prior's clip_mean / clip_std when no cache is given
LAST_NETWORK_MAX_T = 50  # an upsampler's `last` network trains on t in [0, 50): it only runs at t = 0
CLIP_MAX_LOGIT_SCALE = math.log(100)  # open_clip clamps the learned temperature to this

Batch = dict[str, object]


def _bernoulli(p: float, n: int, g: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(n, generator=g) < p).to(device)


def _randn(shape, g: torch.Generator, device) -> torch.Tensor:
    """N(0, I) drawn on the CPU, then moved: the same draws on any device."""
    return torch.randn(tuple(shape), generator=g).to(device)


def _randint(high: int, n: int, g: torch.Generator, device) -> torch.Tensor:
    return torch.randint(high, (n,), generator=g).to(device)


def _noised(diffusion: GaussianDiffusion, x0: torch.Tensor, high: int, g: torch.Generator):
    """(t, noise, x_t): t (B,) uniform in [0, high), noise N(0, I), x_t ~ q(x_t | x_0), drawn in that order."""
    t = _randint(high, x0.shape[0], g, x0.device)
    noise = _randn(x0.shape, g, x0.device)
    return t, noise, diffusion.q_sample(x0, t, noise)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Square bicubic resize with antialiasing (the interpolation the pipeline uses), no clamp."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


class Task:
    """One component's training: the network, its batches, its loss, its file."""

    component: str
    module: nn.Module  # what the model set stores (its EMA copy is written)
    net: nn.Module  # forward over everything the loss trains; DDP wraps this

    def __init__(self, amp: Callable = nullcontext):
        self.amp = amp  # context for network forwards (bf16 autocast on CUDA)

    def fetch(self, batch_size: int, g: torch.Generator) -> Batch:
        """CPU data of one step (thread-safe: touches only the data source)."""
        raise NotImplementedError

    def loss(self, net: nn.Module, data: Batch, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        """(scalar loss, {name: scalar} for the log) on the device."""
        raise NotImplementedError

    def setup(self, log: Callable[[str], None]) -> None:
        """Once, before the first step of a fresh (not resumed) run."""

    def after_step(self) -> None:
        """After each optimizer step (e.g. clamping a parameter)."""

    def save(self, ema: nn.Module, log: Callable[[str], None]) -> None:
        """Write the EMA network back into the model set, as this component."""
        from unclip_cli.modelset import save_component

        save_component(self.ms.path, self.component, self.module.cfg, ema)


# ---------------------------------------------------------------------- conditioning from CLIP


class ClipConditioning:
    """The frozen CLIP of the model set, for the conditioning of the prior and the decoder."""

    def __init__(self, clip, device):
        self.clip = clip
        self.device = device
        self.image_size = clip.image_size
        self.null = [t.to(device) for t in clip.encode_text([""])]  # (1, D), (1, L, W), (1, L)
        self._mean = torch.tensor(clip.preprocess_cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(clip.preprocess_cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> CLIP's normalized input (B, 3, S, S) on the device."""
        x = resize(images.to(self.device).float(), self.image_size)
        return ((x + 1) / 2 - self._mean.to(x.device)) / self._std.to(x.device)

    @torch.no_grad()
    def image_embed(self, images: torch.Tensor) -> torch.Tensor:
        if not getattr(self.clip, "has_vision", True):
            raise UserError("this model set's CLIP has no image encoder: it cannot embed training images")
        return self.clip.model.encode_image(self.pixels(images), normalize=False).float()  # (B, D)

    @torch.no_grad()
    def text(self, captions: list[str]) -> list[torch.Tensor]:
        return [t.to(self.device) for t in self.clip.encode_text(list(captions))]

    def drop_text(self, text: list[torch.Tensor], drop: torch.Tensor) -> list[torch.Tensor]:
        """Rows where drop (B,) is True get the empty prompt's embed, hidden states and mask."""
        out = []
        for t, null in zip(text, self.null):
            d = drop.view((-1,) + (1,) * (t.ndim - 1))
            out.append(torch.where(d, null.to(t.dtype).expand_as(t), t))
        return out


def _cache_rows(cache, batch_size: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    rows = torch.randint(len(cache), (batch_size,), generator=g)
    return cache.get(rows)


# ---------------------------------------------------------------------- prior


class PriorNet(nn.Module):
    """Either prior as it is: (x_t, t, text...) for the diffusion prior, (codes, sim, text...) for the AR one."""

    def __init__(self, prior: nn.Module):
        super().__init__()
        self.prior = prior

    def forward(self, *args):
        return self.prior(*args)


class PriorTask(Task):
    component = "prior"

    def __init__(self, ms, prior, cond: ClipConditioning, source, cache, amp=nullcontext):
        super().__init__(amp)
        self.ms, self.module, self.cond, self.source, self.cache = ms, prior, cond, source, cache
        self.net = PriorNet(prior)
        self.diffusion = GaussianDiffusion.from_config(prior.cfg.diffusion)

    def fetch(self, batch_size, g):
        if self.cache is not None:
            rows = _cache_rows(self.cache, batch_size, g)
            return {k: rows[k] for k in ("image_embed", "text_embed", "text_hidden", "text_mask")}
        images, captions, _ = self.source.sample(batch_size, self.cond.image_size, g)
        return {"images": images, "captions": captions}

    def _embeddings(self, data: Batch) -> list[torch.Tensor]:
        dev = self.cond.device
        if "image_embed" in data:
            embeds = [data[k].to(dev) for k in ("image_embed", "text_embed", "text_hidden")]
            return embeds + [data["text_mask"].to(dev).bool()]
        return [self.cond.image_embed(data["images"]), *self.cond.text(data["captions"])]

    def statistics_embeddings(self, text: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(image embeddings (N, D), text embeddings (N, D) if `text`) to fit data statistics on: the
        whole --cache, else STATS_SAMPLES items of the source (the same draw on every rank)."""
        if self.cache is not None:
            rows = self.cache.get(torch.arange(len(self.cache)))
            return rows["image_embed"], rows["text_embed"] if text else None
        n = min(len(self.source), STATS_SAMPLES)
        g = torch.Generator().manual_seed(0x5EED)
        images_, texts = [], []
        for start in range(0, n, 64):
            images, captions, _ = self.source.sample(min(64, n - start), self.cond.image_size, g)
            images_.append(self.cond.image_embed(images).cpu())
            if text:
                texts.append(self.cond.text(captions)[0].cpu())
        return torch.cat(images_), torch.cat(texts) if text else None

    def setup(self, log):
        """clip_mean / clip_std from the data, unless the prior already has statistics (fine-tuning)."""
        p = self.module
        if not (bool((p.clip_mean == 0).all()) and bool((p.clip_std == 1).all())):
            log("prior: keeping its clip_mean / clip_std (already set)")
            return
        embeds = self.statistics_embeddings()[0].double()
        mean = embeds.mean(0, keepdim=True)
        std = embeds.std(0, keepdim=True).nan_to_num(1.0).clamp_min(1e-5) if embeds.shape[0] > 1 else torch.ones_like(mean)
        with torch.no_grad():
            p.clip_mean.copy_(mean.float())
            p.clip_std.copy_(std.float())
        log(f"prior: clip_mean / clip_std from {embeds.shape[0]} image embeddings")

    def loss(self, net, data, g):
        image_embed, *text = self._embeddings(data)
        B, dev = image_embed.shape[0], image_embed.device
        text = self.cond.drop_text(text, _bernoulli(PRIOR_TEXT_DROP, B, g, dev))
        x0 = self.module.normalize(image_embed)  # (B, D)
        t, noise, x_t = _noised(self.diffusion, x0, self.diffusion.num_timesteps, g)
        with self.amp():
            out = net(x_t, t, *text)
        return diffusion_loss(self.diffusion, out, x0, x_t, t, noise)


# ---------------------------------------------------------------------- autoregressive prior


class ARPriorTask(PriorTask):
    """Cross-entropy of the quantized PCA codes, teacher-forced; the text dropped 10% of the time.

    Fresh runs fit the PCA, buckets and similarity edges first (from the whole --cache, else
    STATS_SAMPLES images), unless the component already has them (fine-tuning keeps them)."""

    component = "prior-ar"

    def __init__(self, ms, prior, cond: ClipConditioning, source, cache, amp=nullcontext):
        Task.__init__(self, amp)  # the data side is the diffusion prior's; no diffusion chain
        self.ms, self.module, self.cond, self.source, self.cache = ms, prior, cond, source, cache
        self.net = PriorNet(prior)

    def setup(self, log):
        p = self.module
        if p.fitted:
            log(f"prior-ar: keeping its PCA ({p.kept} dims) and buckets (already fitted)")
            return
        image_embed, text_embed = self.statistics_embeddings(text=True)
        report = p.fit_statistics(image_embed.to(p.pca_mean.device), text_embed.to(p.pca_mean.device))
        log(
            f"prior-ar: PCA of {report['embeddings']} image embeddings keeps {report['kept']} of {report['dims']} dims "
            f"(reconstruction error {100 * report['pca_error']:.2f}% of the variance; with the {p.cfg.num_buckets} "
            f"buckets {100 * report['round_trip_error']:.2f}%)"
        )

    def loss(self, net, data, g):
        image_embed, *text = self._embeddings(data)
        B, dev = image_embed.shape[0], image_embed.device
        codes = self.module.encode(image_embed)  # (B, K)
        sim = self.module.similarity_bucket(image_embed, text[0])  # (B,), from the true caption
        text = self.cond.drop_text(text, _bernoulli(PRIOR_TEXT_DROP, B, g, dev))
        with self.amp():
            logits = net(codes[:, :-1], sim, *text)  # (B, K, nb): row j predicts code j
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1))
        return loss, {}


# ---------------------------------------------------------------------- decoder


class DecoderNet(nn.Module):
    """Conditioning + UNet in one forward; rows with drop_image use the learned null embedding."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, x_t, t, image_embed, drop_image, text_embed, text_hidden, text_mask):
        null = self.decoder.null_image_embed(image_embed.shape[0]).to(image_embed.dtype)
        image_embed = torch.where(drop_image[:, None], null, image_embed)  # (B, D)
        cond = self.decoder.condition(image_embed, text_embed, text_hidden, text_mask)
        return self.decoder(x_t, t, cond)


class DecoderTask(Task):
    component = "decoder"

    def __init__(self, ms, decoder, cond: ClipConditioning, source, cache, amp=nullcontext):
        super().__init__(amp)
        self.ms, self.module, self.cond, self.source, self.cache = ms, decoder, cond, source, cache
        self.net = DecoderNet(decoder)
        self.diffusion = GaussianDiffusion.from_config(decoder.cfg.diffusion)
        self.size = decoder.cfg.unet.sample_size

    def fetch(self, batch_size, g):
        if self.cache is not None:
            rows = _cache_rows(self.cache, batch_size, g)
            data = {k: rows[k] for k in ("image_embed", "text_embed", "text_hidden", "text_mask")}
            data["images"] = self.source.images(rows["index"].tolist(), self.size)
            return data
        images, captions, indices = self.source.sample(batch_size, self.size, g)
        data = {"images": images, "captions": captions}
        if self.cond.image_size > self.size:  # CLIP sees the image at its own resolution
            data["clip_images"] = self.source.images(indices, self.cond.image_size)
        return data

    def loss(self, net, data, g):
        dev = self.cond.device
        x0 = data["images"].to(dev).float()  # (B, 3, S, S) in [-1, 1]
        if "image_embed" in data:
            image_embed = data["image_embed"].to(dev)
            text = [data["text_embed"].to(dev), data["text_hidden"].to(dev), data["text_mask"].to(dev).bool()]
        else:
            image_embed = self.cond.image_embed(data.get("clip_images", data["images"]))
            text = self.cond.text(data["captions"])
        B = x0.shape[0]
        drop_image = _bernoulli(DECODER_IMAGE_DROP, B, g, dev)
        text = self.cond.drop_text(text, _bernoulli(DECODER_TEXT_DROP, B, g, dev))
        t, noise, x_t = _noised(self.diffusion, x0, self.diffusion.num_timesteps, g)
        with self.amp():
            out = net(x_t, t, image_embed, drop_image, *text)
        return diffusion_loss(self.diffusion, out, x0, x_t, t, noise)


# ---------------------------------------------------------------------- upsamplers


class UpsamplerNet(nn.Module):
    """Both networks in one forward: `first` on (x_t, t), `last` (if any) on (x_last, t_last)."""

    def __init__(self, upsampler: nn.Module):
        super().__init__()
        self.upsampler = upsampler

    def forward(self, x_t, t, low_up, x_last=None, t_last=None):
        out = self.upsampler(x_t, t, low_up, last_step=False)
        if self.upsampler.last is None:
            return out, None
        return out, self.upsampler(x_last, t_last, low_up, last_step=True)


class UpsamplerTask(Task):
    def __init__(self, ms, component, upsampler, source, amp=nullcontext, jitter=None, crop=None):
        super().__init__(amp)
        self.ms, self.component, self.module, self.source = ms, component, upsampler, source
        self.jitter = JITTER_OFFSET if jitter is None else jitter  # largest per-channel color offset of a crop
        self.net = UpsamplerNet(upsampler)
        cfg = upsampler.cfg
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion)
        self.size = cfg.size
        self.crop = cfg.size // 4 if crop is None else crop  # default: a quarter of the target size (paper, appendix C)
        self.factor = cfg.size // cfg.low_res
        if not 0 < self.crop <= cfg.size:
            raise UserError(f"{component}: --crop must be between 1 and the output size {cfg.size} (got {self.crop})")
        if self.crop % self.factor:
            raise UserError(f"{component}: crop {self.crop} is not a multiple of the scale factor {self.factor}")

    def corrupt(self, low: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if self.component == "upsampler-256":
            return gaussian_blur(low)
        return bsr_degrade(low, g)

    def fetch(self, batch_size, g):
        images, _, _ = self.source.sample(batch_size, self.size, g)  # (B, 3, S, S)
        c = self.crop
        tops = torch.randint(self.size - c + 1, (batch_size,), generator=g).tolist()
        lefts = torch.randint(self.size - c + 1, (batch_size,), generator=g).tolist()
        x0 = torch.stack([img[:, y : y + c, x : x + c] for img, y, x in zip(images.float(), tops, lefts)])
        x0 = color_jitter(x0, g, self.jitter)  # the target and its low-res input share the moved colors
        low = resize(x0, c // self.factor)  # what the previous stage would produce, (B, 3, c/f, c/f)
        low = self.corrupt(low, g).clamp(-1, 1)
        return {"x0": x0, "low_up": resize(low, c)}  # low_up as Upsampler.upsample_low_res, at crop size

    def loss(self, net, data, g):
        x0 = data["x0"].to(self._device()).float()
        low_up = data["low_up"].to(x0.device).float()
        t, noise, x_t = _noised(self.diffusion, x0, self.diffusion.num_timesteps, g)
        has_last = self.module.last is not None
        if has_last:
            t_last, noise_last, x_last = _noised(self.diffusion, x0, LAST_NETWORK_MAX_T, g)
        with self.amp():
            out, out_last = net(x_t, t, low_up, *((x_last, t_last) if has_last else ()))
        loss, parts = diffusion_loss(self.diffusion, out, x0, x_t, t, noise)
        if has_last:
            loss_last, _ = diffusion_loss(self.diffusion, out_last, x0, x_last, t_last, noise_last)
            loss = loss + loss_last
            parts["mse_last"] = loss_last.detach()
        return loss, parts

    def _device(self):
        return next(self.module.parameters()).device


# ---------------------------------------------------------------------- CLIP


class ClipNet(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels, ids):
        image = self.model.encode_image(pixels, normalize=True)  # (B, D)
        text = self.model.encode_text(ids, normalize=True)  # (B, D)
        return image, text, self.model.logit_scale.exp()


class ClipTask(Task):
    component = "clip"

    def __init__(self, ms, clip, source, rank: int = 0, world_size: int = 1, amp=nullcontext, hard_negatives=None):
        from open_clip.loss import ClipLoss

        super().__init__(amp)
        self.ms, self.clip, self.source = ms, clip, source
        self.group = hard_negatives or 1
        if self.group > 1 and not hasattr(source, "sample_groups"):
            raise UserError(f"--hard-negatives needs the shapes data (--data shapes), not {source.name}")
        self.module = clip.model.train().requires_grad_(True)
        self.net = ClipNet(self.module)
        self.cond = ClipConditioning(clip, clip.device)
        # features gathered from every rank, gradients through the gather (open_clip's --local-loss --gather-with-grad)
        self.criterion = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
        self._warned = False

    def fetch(self, batch_size, g):
        if self.group > 1:
            images, captions = self.source.sample_groups(batch_size // self.group, self.group, self.cond.image_size, g)
        else:
            images, captions, _ = self.source.sample(batch_size, self.cond.image_size, g)
        return {"images": images, "captions": captions}

    def loss(self, net, data, g):
        ids, _ = self.clip.tokenize(data["captions"])
        with self.amp():
            image, text, scale = net(self.cond.pixels(data["images"]), ids)
        with warnings.catch_warnings():  # open_clip's gather uses an API torch marks deprecated
            warnings.simplefilter("ignore", FutureWarning)
            loss = self.criterion(image.float(), text.float(), scale.float())
        return loss, {"logit_scale": scale.detach().float()}

    def after_step(self):
        with torch.no_grad():
            self.module.logit_scale.clamp_(0, CLIP_MAX_LOGIT_SCALE)

    def save(self, ema, log):
        """open_clip_model.safetensors in the local-dir layout, and the set's new CLIP identity."""
        from unclip_cli.io import save_weights
        from unclip_cli.modelset import refresh_clip_identity

        folder = self.ms.path / "clip"
        config_text = (folder / "open_clip_config.json").read_text()
        state = {k: v.detach().float().contiguous() for k, v in ema.state_dict().items()}
        save_weights(folder / "open_clip_model.safetensors", state, {"format": "pt", "open_clip_config": config_text})
        old, manifest = refresh_clip_identity(self.ms.path)
        self.ms.manifest = manifest
        if old != manifest["clip"]["identity"] and not self._warned:
            self._warned = True
            stale = [c for c in ("prior", "decoder") if self.ms.has(c)]
            if stale:
                log(
                    f"warning: CLIP changed ({old} -> {manifest['clip']['identity']}): "
                    f"{' and '.join(stale)} trained on the old CLIP need retraining"
                )


# ---------------------------------------------------------------------- factory


def is_imported_clip(ms) -> bool:
    """An imported CLIP (marked `"imported": true` in the manifest's clip entry, or any set converted
    from a foreign snapshot, whose manifest records its `source`) stays frozen."""
    return bool(ms.manifest.get("clip", {}).get("imported") or ms.manifest.get("source"))


def make_task(
    component, ms, device, source, cache, rank=0, world_size=1, amp=nullcontext, jitter=None, crop=None,
    hard_negatives=None,
) -> Task:
    """The Task of `component` on model set `ms`, its network loaded from the set onto `device`.

    jitter, crop: the upsamplers' color-jitter offset (None: `degrade.JITTER_OFFSET`) and training crop
    side at the output size (None: a quarter of it); other components take neither.
    hard_negatives: CLIP on the shapes data, scenes per group of hard negatives (None: independent scenes).
    """
    if component == "clip":
        if is_imported_clip(ms):
            raise UserError(f"the CLIP of model set {ms.name!r} is imported and stays frozen; only a set's own CLIP is trained")
        return ClipTask(ms, ms.load("clip", device), source, rank, world_size, amp, hard_negatives)
    module = ms.load(component, device).train()
    if component.startswith("upsampler"):
        return UpsamplerTask(ms, component, module, source, amp, jitter, crop)
    cond = ClipConditioning(ms.load("clip", device), device)
    if component == "prior":
        return PriorTask(ms, module, cond, source, cache, amp)
    if component == "prior-ar":
        return ARPriorTask(ms, module, cond, source, cache, amp)
    return DecoderTask(ms, module, cond, source, cache, amp)
