"""Tiny random Karlo-shaped diffusers snapshots for the import / parity tests.

Test-only: diffusers and transformers build the reference components, which are saved with
`save_pretrained` exactly as the public `kakaobrain/karlo-v1-alpha(-image-variations)` folders are
laid out. The shapes start from diffusers' former unclip fast tests (text width 32, prior 2 heads x 12,
decoder (32, 64), cross-attention 100), with the real resolutions (decoder 64px, super-res 256px) so
that `unclip upsample` takes the decoder's output, and narrower super-res networks (the 256px
convolutions are most of the test's time); a second configuration has more levels, layers per block
and layers. Every parameter diffusers initializes to a constant is randomized, or the
comparisons would be between degenerate models.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

CONTEXT = 77  # CLIP text context length (prior num_embeddings)


@dataclass
class SnapshotConfig:
    """Sizes of one tiny snapshot; D is the CLIP embedding (= text width, as diffusers ties them)."""

    D: int
    text: dict  # CLIPTextConfig kwargs
    vision: dict  # CLIPVisionConfig kwargs (variations snapshot)
    image_size: int  # feature extractor size / crop
    prior: dict  # PriorTransformer kwargs
    text_proj: dict  # UnCLIPTextProjModel kwargs
    decoder: dict  # UNet2DConditionModel kwargs
    super_res: dict  # UNet2DModel kwargs
    seed: int = 0
    extra: dict = field(default_factory=dict)


def _decoder(plain_levels: int = 1, **kw) -> dict:
    """Karlo's decoder layout: no attention in the first `plain_levels` levels, attention below."""
    n = len(kw["block_out_channels"])
    return dict(
        sample_size=64, in_channels=3, out_channels=6,
        down_block_types=("ResnetDownsampleBlock2D",) * plain_levels + ("SimpleCrossAttnDownBlock2D",) * (n - plain_levels),
        up_block_types=("SimpleCrossAttnUpBlock2D",) * (n - plain_levels) + ("ResnetUpsampleBlock2D",) * plain_levels,
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", class_embed_type="identity",
        resnet_time_scale_shift="scale_shift", **kw,
    )


def _super_res(**kw) -> dict:
    n = len(kw["block_out_channels"])
    return dict(
        sample_size=256, in_channels=6, out_channels=3, add_attention=False,
        down_block_types=("ResnetDownsampleBlock2D",) * n, up_block_types=("ResnetUpsampleBlock2D",) * n, **kw,
    )


CONFIGS = {
    # diffusers' former fast-test sizes (but 64px / 256px, narrower super-res, 4 attention heads of 16 instead
    # of 16 of 4: attention over 32x32 positions is the decoder's cost); eos_token_id 2 as in Karlo's
    # text_encoder config (argmax pooling)
    "fast-test": SnapshotConfig(
        D=32,
        text=dict(hidden_size=32, projection_dim=32, intermediate_size=37, num_attention_heads=4,
                  num_hidden_layers=5, eos_token_id=2),
        vision=dict(hidden_size=32, projection_dim=32, intermediate_size=37, num_attention_heads=4,
                    num_hidden_layers=5, image_size=32, patch_size=4),
        image_size=32,
        prior=dict(num_attention_heads=2, attention_head_dim=12, embedding_dim=32, num_layers=1),
        text_proj=dict(clip_embeddings_dim=32, time_embed_dim=128, cross_attention_dim=100),
        decoder=_decoder(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=100,
                         attention_head_dim=16),
        super_res=_super_res(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4),
    ),
    # more levels (attention in the lower two of four), layers per block and layers; 3 extra context
    # tokens; the current eos id; odd widths
    "deeper": SnapshotConfig(
        D=24,
        text=dict(hidden_size=24, projection_dim=24, intermediate_size=48, num_attention_heads=2,
                  num_hidden_layers=2, eos_token_id=49407),
        vision=dict(hidden_size=40, projection_dim=24, intermediate_size=80, num_attention_heads=4,
                    num_hidden_layers=2, image_size=28, patch_size=7),
        image_size=28,
        prior=dict(num_attention_heads=4, attention_head_dim=8, embedding_dim=24, num_layers=3),
        text_proj=dict(clip_extra_context_tokens=3, clip_embeddings_dim=24, time_embed_dim=40,
                       cross_attention_dim=24),
        decoder=_decoder(block_out_channels=(8, 16, 32, 48), layers_per_block=2, cross_attention_dim=24,
                         attention_head_dim=16, time_embedding_dim=40, norm_num_groups=8, norm_eps=1e-6,
                         plain_levels=2),
        super_res=_super_res(block_out_channels=(8, 16, 24), layers_per_block=2, norm_num_groups=4,
                             resnet_time_scale_shift="scale_shift"),
        seed=1,
    ),
}


def _jitter(model: torch.nn.Module, g: torch.Generator, scale: float = 0.1) -> torch.nn.Module:
    """Perturb every 1-D parameter (norm affines, biases), so that a swapped norm or a dropped bias shows."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def hf_tokenizer(folder: Path) -> CLIPTokenizer:
    """A transformers CLIPTokenizer written from open_clip's BPE file (the same vocabulary), pad "!" as Karlo."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")
    lines = lines[: 49152 - 256 - 2 + 1]  # header line + 48894 merges, as open_clip reads them
    merges = ["".join(m.split()) for m in lines[1:]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + merges + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("\n".join(lines))
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!", model_max_length=CONTEXT
    )


def build_components(cfg: SnapshotConfig, tmp: Path) -> dict:
    """Every component of both Karlo pipelines, randomized (deterministic in cfg.seed)."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 100)
    text = CLIPTextModelWithProjection(
        CLIPTextConfig(vocab_size=49408, max_position_embeddings=CONTEXT, hidden_act="quick_gelu", **cfg.text)
    )
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_act="quick_gelu", **cfg.vision))
    prior = PriorTransformer(num_embeddings=CONTEXT, additional_embeddings=4, **cfg.prior)
    text_proj = UnCLIPTextProjModel(**cfg.text_proj)
    decoder = UNet2DConditionModel(**cfg.decoder)
    first, last = UNet2DModel(**cfg.super_res), UNet2DModel(**cfg.super_res)
    for m in (text, vision, prior, text_proj, decoder, first, last):
        _jitter(m, g)
    with torch.no_grad():  # diffusers zero-initializes these; give them realistic scales
        prior.positional_embedding.normal_(generator=g)
        prior.prd_embedding.normal_(generator=g)
        prior.clip_mean.normal_(generator=g)
        prior.clip_std.uniform_(0.5, 2.0, generator=g)
        text_proj.learned_classifier_free_guidance_embeddings.normal_(generator=g)
    return dict(
        text_encoder=text, image_encoder=vision, prior=prior, text_proj=text_proj, decoder=decoder,
        super_res_first=first, super_res_last=last, tokenizer=hf_tokenizer(tmp / "bpe"),
        feature_extractor=CLIPImageProcessor(size=cfg.image_size, crop_size=cfg.image_size),
        prior_scheduler=UnCLIPScheduler(
            variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000, clip_sample_range=5.0
        ),
        decoder_scheduler=UnCLIPScheduler(
            variance_type="learned_range", prediction_type="epsilon", num_train_timesteps=1000
        ),
        super_res_scheduler=UnCLIPScheduler(
            variance_type="fixed_small_log", prediction_type="epsilon", num_train_timesteps=1000
        ),
    )


TEXT_TO_IMAGE = ("prior", "decoder", "text_encoder", "tokenizer", "text_proj", "super_res_first", "super_res_last",
                 "prior_scheduler", "decoder_scheduler", "super_res_scheduler")
VARIATIONS = ("decoder", "text_encoder", "tokenizer", "text_proj", "feature_extractor", "image_encoder",
              "super_res_first", "super_res_last", "decoder_scheduler", "super_res_scheduler")


def text_to_image_pipeline(components: dict):
    from diffusers import UnCLIPPipeline

    return UnCLIPPipeline(**{k: components[k] for k in TEXT_TO_IMAGE})


def variation_pipeline(components: dict):
    from diffusers import UnCLIPImageVariationPipeline

    return UnCLIPImageVariationPipeline(**{k: components[k] for k in VARIATIONS})


def bench_config(scale: str) -> SnapshotConfig:
    """Karlo v1 alpha's architecture for scripts/bench_vs_diffusers.py: "karlo", its real sizes (REFERENCE.md;
    prior 1.0 B, decoder 0.9 B, each super-res 0.7 B parameters: for a GPU), or "small", for a CPU: the same
    levels, layers per block, layer counts and attention placement, widths a twentieth of Karlo's or less
    (about 180 GFLOP per 256px image). The vision tower is tiny (the text-to-image pipeline has none)."""
    karlo = scale == "karlo"
    D = 768 if karlo else 32  # CLIP embedding = text tower width
    prior_heads, head = (32, 64) if karlo else (4, 16)  # prior width = heads x head; UNet attention head width
    unet = (320, 640, 960, 1280) if karlo else (16, 32, 48, 64)
    sr = unet if karlo else (8, 16, 24, 32)
    return SnapshotConfig(
        D=D,
        text=dict(hidden_size=D, projection_dim=D, intermediate_size=4 * D, num_attention_heads=12 if karlo else 4,
                  num_hidden_layers=12, eos_token_id=2),
        vision=dict(hidden_size=32, projection_dim=D, intermediate_size=37, num_attention_heads=4,
                    num_hidden_layers=1, image_size=32, patch_size=4),
        image_size=32,
        prior=dict(num_attention_heads=prior_heads, attention_head_dim=head, embedding_dim=D, num_layers=20),
        text_proj=dict(clip_embeddings_dim=D, time_embed_dim=4 * unet[0], cross_attention_dim=2 * D),
        decoder=_decoder(block_out_channels=unet, layers_per_block=3, cross_attention_dim=2 * D,
                         attention_head_dim=head, norm_num_groups=32 if karlo else 16),
        super_res=_super_res(block_out_channels=sr, layers_per_block=3, norm_num_groups=32 if karlo else 8,
                             resnet_time_scale_shift="scale_shift"),
    )
