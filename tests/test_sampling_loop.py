"""The lean step loop: per-row generators, step noise drawn ahead, network dtypes, upsampler micro-batches."""

from __future__ import annotations

import functools

import pytest
import torch

from unclip_cli.device import generator_rows, make_generators
from unclip_cli.diffusion import samplers
from unclip_cli.diffusion.samplers import draw_noise, sample_ancestral, sample_ddim, step_noise
from unclip_cli.diffusion.schedule import GaussianDiffusion, respaced_timesteps
from unclip_cli.models.ar_prior import ARPrior
from unclip_cli.models.configs import ARPriorConfig, DiffusionConfig
from unclip_cli.pipeline import Pipeline
from unclip_cli.stages.conditioning import TextCond
from unclip_cli.stages.decode import run_decoder
from unclip_cli.stages.images import psnr
from unclip_cli.stages.prior import run_prior
from unclip_cli.stages.prior_ar import run_ar_prior
from unclip_cli.stages.upsample import run_upsampler

SEEDS = (5, 6, 7)
PROMPTS = ["a red circle", "a small blue square on green", "two yellow stars"]
BATCH_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def pipe(tiny_set):
    return Pipeline.load(tiny_set, device="cpu")


@pytest.fixture(scope="module")
def pipe64(tiny_set):
    """The tiny set with float64 networks and prompts encoded one at a time, so that a batch's rows
    differ from the same items alone only by float64 rounding. (In float32 the batched maths' last
    bits, ~5e-6 in eps, are amplified ~2e4 times by the first step's x0 = (x - sqrt(1 - abar) eps) /
    sqrt(abar) at t = 999: up to 0.03 in the 64 px image, noise or no noise.)"""
    p = Pipeline.load(tiny_set, device="cpu")
    for component in ("prior", "decoder", "upsampler-256"):
        p.net(component).double()
    encode = p.text_cond
    p.text_cond = lambda prompts: functools.reduce(TextCond.cat, [encode([prompt]) for prompt in prompts])
    return p


@pytest.fixture(scope="module")
def conds(pipe):
    return pipe.text_cond(PROMPTS), pipe.null(len(PROMPTS))


def _row(cond: TextCond, r: int) -> TextCond:
    return TextCond(cond.embed[r : r + 1], cond.hidden[r : r + 1], cond.mask[r : r + 1])


def _rows_alone(run, batch: int = len(SEEDS)) -> torch.Tensor:
    """run(row, generators) of each row alone with its own seed, stacked."""
    return torch.cat([run(slice(r, r + 1), make_generators([SEEDS[r]])) for r in range(batch)])


# ---------------------------------------------------------------------- drawing


def test_a_list_of_generators_draws_each_rows_from_its_own():
    one = draw_noise((4, 3), torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(one, torch.randn(4, 3, generator=torch.Generator().manual_seed(1)))  # one generator: unchanged
    rows = draw_noise((6, 3), make_generators([1, 2, 3]), "cpu")  # two rows per generator
    expected = torch.cat([torch.randn(2, 3, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3)])
    assert torch.equal(rows, expected)
    assert [n for _, n in generator_rows(make_generators([1, 2]), 4)] == [2, 2]
    with pytest.raises(ValueError):
        generator_rows(make_generators([1, 2]), 3)


@pytest.mark.parametrize("window_bytes", [1 << 30, 2 * 4 * 2 * 5])  # all steps at once; two steps a window
def test_step_noise_is_the_stream_of_drawing_each_step_in_turn(monkeypatch, window_bytes):
    monkeypatch.setattr(samplers, "NOISE_AHEAD_BYTES", window_bytes)
    g = torch.Generator().manual_seed(4)
    noises = step_noise((2, 5), 5, g, "cpu")
    after = torch.randn(3, generator=g)  # the first window is drawn before any step asks for it
    got = torch.stack(list(noises))
    ref = torch.Generator().manual_seed(4)
    expected = torch.stack([torch.randn(2, 5, generator=ref) for _ in range(5)])
    if window_bytes >= 1 << 30:
        assert torch.equal(got, expected) and torch.equal(after, torch.randn(3, generator=ref))
    else:  # later windows are drawn when reached: the same stream as long as nothing else draws in between
        assert torch.equal(got[:2], expected[:2])
    assert list(step_noise((2, 5), 0, g, "cpu")) == []


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_loops_draw_what_a_per_step_draw_would(sampler):
    """The loop with noise drawn ahead against the same loop drawing each step's noise after its model call."""
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(prediction="eps", variance="fixed_small_log", clip_range=1.0))
    ts = respaced_timesteps(6, diffusion.num_timesteps)
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.1

    def model_fn(x, t):
        return torch.tanh(x @ weight + t / 1000)

    x_T = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    g, ref = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    x = x_T
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        out = model_fn(x, t)
        if sampler == "ancestral":
            x, _ = diffusion.step(out, x, t, t_prev, torch.randn(x.shape, generator=ref) if t > 0 else None)
        else:
            x, _ = diffusion.ddim_step(out, x, t, t_prev, 0.5, torch.randn(x.shape, generator=ref) if t_prev >= 0 else None)
    if sampler == "ancestral":
        got = sample_ancestral(model_fn, x_T, diffusion, ts, generator=g)
    else:
        got = sample_ddim(model_fn, x_T, diffusion, ts, eta=0.5, generator=g)
    assert torch.equal(got, x) and torch.equal(g.get_state(), ref.get_state())


# ---------------------------------------------------------------------- per-row generators: an item does not depend on its batch


def test_diffusion_prior_rows_are_their_seeds_alone(pipe64, conds):
    cond, null = conds
    net = pipe64.net("prior")

    def run(rows, gens):
        return run_prior(net, _sub(cond, rows), _sub(null, rows), steps=3, guidance=2.0, generator=gens)

    torch.testing.assert_close(run(slice(0, 3), make_generators(SEEDS)), _rows_alone(run), **BATCH_TOL)


def test_decoder_rows_are_their_seeds_alone(pipe64, conds):
    cond, null = conds
    net = pipe64.net("decoder")
    embed = torch.randn(3, cond.embed.shape[1], generator=torch.Generator().manual_seed(0))

    def run(rows, gens, eta=None):
        return run_decoder(net, embed[rows], _sub(cond, rows), _sub(null, rows), steps=3, guidance=3.0, generator=gens, eta=eta)

    torch.testing.assert_close(run(slice(0, 3), make_generators(SEEDS)), _rows_alone(run), **BATCH_TOL)
    ddim = lambda rows, gens: run(rows, gens, eta=0.7)  # noqa: E731
    torch.testing.assert_close(ddim(slice(0, 3), make_generators(SEEDS)), _rows_alone(ddim), **BATCH_TOL)


def test_upsampler_rows_are_their_seeds_alone_and_micro_batches_change_nothing(pipe64):
    net = pipe64.net("upsampler-256")
    low = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def run(rows, gens, micro_batch=None):
        return run_upsampler(net, low[rows], steps=2, generator=gens, micro_batch=micro_batch)

    whole = run(slice(0, 3), make_generators(SEEDS))
    torch.testing.assert_close(whole, _rows_alone(run), **BATCH_TOL)
    for micro in (1, 2):  # the noise is the whole batch's; only the network's calls are cut
        torch.testing.assert_close(run(slice(0, 3), make_generators(SEEDS), micro), whole, **BATCH_TOL)
    one_gen = run_upsampler(net, low, steps=2, generator=torch.Generator().manual_seed(3))
    in_ones = run_upsampler(net, low, steps=2, generator=torch.Generator().manual_seed(3), micro_batch=1)
    torch.testing.assert_close(in_ones, one_gen, **BATCH_TOL)
    assert not torch.allclose(whole[0], whole[1])


def _fitted_ar_prior() -> ARPrior:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, generator=g) @ torch.randn(4, 16, generator=g) + 0.02 * torch.randn(400, 16, generator=g)
    cfg = ARPriorConfig(embed_dim=16, text_width=8, num_text_tokens=5, width=16, num_layers=1, num_heads=2,
                        num_buckets=32, num_sim_buckets=8)
    prior = ARPrior(cfg).eval()
    prior.fit_statistics(x, x + 0.5 * torch.randn(400, 16, generator=g))
    return prior


def test_ar_prior_rows_are_their_seeds_alone():
    prior = _fitted_ar_prior()
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[:, :3] = True
    cond = TextCond(torch.randn(3, 16, generator=g), torch.randn(3, 5, 8, generator=g), mask)
    null = TextCond(torch.randn(1, 16, generator=g), torch.randn(1, 5, 8, generator=g), mask[:1]).expand(3)

    def run(rows, gens):
        return run_ar_prior(prior, _sub(cond, rows), _sub(null, rows), guidance=2.0, top_p=0.9, generator=gens)

    batch = run(slice(0, 3), make_generators(SEEDS))
    torch.testing.assert_close(batch, _rows_alone(run), **BATCH_TOL)
    assert not torch.equal(batch, run(slice(0, 3), torch.Generator().manual_seed(5)))  # one generator: another draw


def test_generate_tensor_rows_are_their_seeds_alone(pipe64):
    opts = dict(size=64, prior_steps=3, decoder_steps=3)
    batch, _ = pipe64.generate_tensor(PROMPTS, make_generators(SEEDS), **opts)
    alone = torch.cat([pipe64.generate_tensor([p], make_generators([s]), **opts)[0] for p, s in zip(PROMPTS, SEEDS)])
    torch.testing.assert_close(batch, alone, **BATCH_TOL)
    one, _ = pipe64.generate_tensor(PROMPTS[:1], torch.Generator().manual_seed(SEEDS[0]), **opts)
    assert torch.equal(one, alone[:1])  # a list of one generator is that generator


def _sub(cond: TextCond, rows: slice) -> TextCond:
    return TextCond(cond.embed[rows], cond.hidden[rows], cond.mask[rows])


# ---------------------------------------------------------------------- network dtype: reduced precision inside, float32 outside


def test_bf16_networks_keep_the_sampler_in_float32(pipe, conds):
    cond, null = conds
    embed = torch.randn(3, cond.embed.shape[1], generator=torch.Generator().manual_seed(0))
    decoder = pipe.net("decoder")
    ref = run_decoder(decoder, embed, cond, null, steps=3, guidance=3.0, generator=torch.Generator().manual_seed(1))
    half = type(decoder)(decoder.cfg)
    half.load_state_dict(decoder.state_dict())
    half = half.to(torch.bfloat16)
    out = run_decoder(half, embed, cond, null, steps=3, guidance=3.0, generator=torch.Generator().manual_seed(1))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert float(psnr(out, ref).min()) > 20.0  # random weights: noise-like images, bf16 rounding through 3 steps
    up = pipe.net("upsampler-256")
    up_half = type(up)(up.cfg)
    up_half.load_state_dict(up.state_dict())
    big = run_upsampler(up_half.to(torch.bfloat16), ref, steps=2, generator=torch.Generator().manual_seed(2))
    big_ref = run_upsampler(up, ref, steps=2, generator=torch.Generator().manual_seed(2))
    assert big.dtype == torch.float32 and float(psnr(big, big_ref).min()) > 20.0
