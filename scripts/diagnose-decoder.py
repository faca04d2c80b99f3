"""Where a model set's quality is lost: CLIP, or the decoder? Prints three measurements.

    python scripts/diagnose-decoder.py MODEL_DIR [--count 50] [--guidance 1,5] [--steps 25] [--probes-only]

1. Linear probes on CLIP image embeddings of rendered shapes scenes and on the text embeddings of
   their captions (2,000 to fit, 1,000 to test): how well background, first object color and first
   object shape can be read from them; and the shape on one-object scenes alone (two thirds to fit),
   where no probe has to guess which object the caption names first.
2. The decoder on the *true* CLIP embeddings of the eval scenes (no prior), judged as `unclip eval`
   judges: the decoder's own share of the errors.
3. The decoder's error on the spatial mean of its prediction, on correctly noised rendered scenes,
   per timestep: for eps models the noise mean (whose std is 1/S for S x S images) and the
   resulting x0 mean error; for x0 models the x0 mean error directly.
The model card's diagnosis figures come from this script.
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F

from unclip_cli.data.shapes import render, sample_scene
from unclip_cli.diffusion.schedule import GaussianDiffusion
from unclip_cli.evaluate.judge import Judge
from unclip_cli.evaluate.report import aggregate, eval_scenes
from unclip_cli.io import tensor_to_images
from unclip_cli.pipeline import Pipeline
from unclip_cli.stages.conditioning import TextCond


def clip_embeds(clip, scenes, batch: int = 250) -> torch.Tensor:
    parts = [clip.encode_image(tensor_to_images(render(scenes[i : i + batch], clip.image_size))) for i in range(0, len(scenes), batch)]
    return torch.cat(parts)


def probe(embeds: torch.Tensor, labels: list, fit: int) -> float:
    """Test accuracy of an L2-regularized linear softmax classifier fitted with LBFGS."""
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(v) for v in labels])
    x = torch.cat([F.normalize(embeds, dim=1), torch.ones(len(embeds), 1)], 1)
    w = torch.zeros(x.shape[1], len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=300)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x[:fit] @ w, y[:fit]) + 1e-4 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return ((x[fit:] @ w).argmax(1) == y[fit:]).float().mean().item()


def figures(verdicts) -> str:
    a = aggregate(verdicts)
    o, t = a["one_object"], a["two_objects"]
    return (f"object color {o['object_color']:.2f}, background {o['background']:.2f}, shape {o['shape']:.2f}; "
            f"two objects: both colors {t['both_colors']:.2f}, relation {t['relation']:.2f}")


@torch.no_grad()
def mean_errors(clip, decoder, count: int = 16) -> None:
    rng = random.Random(7)
    scenes = [sample_scene(rng) for _ in range(count)]
    x0 = render(scenes, decoder.cfg.unet.sample_size)
    text = TextCond(*clip.encode_text([s.caption for s in scenes]))
    cond = decoder.condition(clip_embeds(clip, scenes), text.embed, text.hidden, text.mask)
    diffusion = GaussianDiffusion.from_config(decoder.cfg.diffusion)
    g = torch.Generator().manual_seed(0)
    for t in (999, 950, 900, 800, 600, 400, 200, 50):
        eps = torch.randn(x0.shape, generator=g)
        abar = diffusion.alpha_bar(t)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        out = decoder(x_t, torch.full((count,), t), cond)
        pred_x0 = diffusion.predict_x0(x_t, t, out)  # clamped, as sampling uses it
        x0_err = (pred_x0.mean((2, 3)) - x0.mean((2, 3))).abs().mean().item()
        line = f"  t={t:3d} SNR={float(abar / (1 - abar)):.4f}: x0 mean error {x0_err:.3f}"
        if diffusion.config.prediction == "eps":
            eps_err = (out[:, :3].mean((2, 3)) - eps.mean((2, 3))).abs().mean().item()
            line += f", noise mean error {eps_err:.4f}"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--count", type=int, default=50, help="eval scenes decoded from their true embeddings")
    ap.add_argument("--guidance", default="1,5", help="decoder guidance values, comma-separated")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--probes-only", action="store_true", help="only the CLIP probes (a set whose decoder is not trained yet)")
    args = ap.parse_args()
    pipe = Pipeline.load(args.model, device="cpu")
    clip = pipe.net("clip")

    rng = random.Random(123)
    scenes = [sample_scene(rng) for _ in range(3000)]
    embeds = clip_embeds(clip, scenes)
    captions = [s.caption for s in scenes]
    texts = torch.cat([clip.encode_text(captions[i : i + 500])[0] for i in range(0, len(captions), 500)])
    print("linear probes on CLIP embeddings (test accuracy: image / text):")
    for name, labels in (("background", [s.background for s in scenes]),
                         ("first object color", [s.objects[0].color for s in scenes]),
                         ("first object shape", [s.objects[0].shape for s in scenes])):
        print(f"  {name}: {probe(embeds, labels, 2000):.3f} / {probe(texts, labels, 2000):.3f} ({len(set(labels))} classes)")
    one = [i for i, s in enumerate(scenes) if s.relation is None]
    labels, fit = [scenes[i].objects[0].shape for i in one], len(one) * 2 // 3
    print(f"  shape, one-object scenes only: {probe(embeds[one], labels, fit):.3f} / {probe(texts[one], labels, fit):.3f}"
          f" ({len(set(labels))} classes)")
    if args.probes_only:
        return
    judge = Judge.load()

    scenes = eval_scenes(args.count, 0)
    prompts = [s.caption for s in scenes]
    cond, null = pipe.text_cond(prompts), pipe.null(len(prompts))
    embeds = clip_embeds(clip, scenes)
    print(f"decoder on the true embeddings of {args.count} eval scenes ({args.steps} steps):")
    for guidance in (float(v) for v in args.guidance.split(",")):
        out, _ = pipe.run_decoder(embeds, cond, null, torch.Generator().manual_seed(0), steps=args.steps, guidance=guidance)
        print(f"  guidance {guidance:g}: {figures(judge(out, prompts))}")

    print("spatial-mean errors on noised rendered scenes:")
    mean_errors(clip, pipe.net("decoder"))


if __name__ == "__main__":
    main()
