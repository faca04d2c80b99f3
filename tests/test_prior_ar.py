"""The autoregressive prior: PCA + quantization round trip, overfitting a batch, sampling, the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load as load_st

from conftest import png_size
from unclip_cli.models.ar_prior import ARPrior
from unclip_cli.models.configs import ARPriorConfig
from unclip_cli.stages.conditioning import TextCond
from unclip_cli.stages.prior_ar import run_ar_prior, top_p_filter

# PCA keeps the fewest dims under cfg.max_pca_error (1%) of the variance; the buckets may add this much.
QUANTIZATION_SLACK = 0.0025


def ok(run):
    assert run.code == 0, run
    return run


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _low_rank_data(n=4000, d=24, rank=6, seed=0):
    """Embeddings whose variance sits in `rank` directions of decreasing scale, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:rank]  # (rank, d) orthonormal
    scales = torch.tensor([4.0, 3.0, 2.0, 1.5, 1.0, 0.7])[:rank]
    z = torch.randn(n, rank, generator=g) * scales
    x = z @ basis + 0.02 * torch.randn(n, d, generator=g) + 1.5
    t = x + 0.5 * torch.randn(n, d, generator=g)  # "text" embeddings correlated with the images
    return x, t


def test_pca_and_quantization_round_trip_within_the_bound():
    x, t = _low_rank_data()
    cfg = ARPriorConfig(embed_dim=24, text_width=8, num_text_tokens=5, width=16, num_layers=1, num_heads=2,
                        num_buckets=1024, num_sim_buckets=16)
    prior = ARPrior(cfg)
    report = prior.fit_statistics(x, t)
    k = report["kept"]
    assert 1 <= k <= 6 and report["pca_error"] <= cfg.max_pca_error
    # K is the fewest: K - 1 dims miss the bound (the variance is spread over 6 directions)
    xc = (x - x.mean(0)).double()
    evals = torch.linalg.eigvalsh(xc.T @ xc / len(x)).flip(0)
    assert float(evals[k - 1 :].sum() / evals.sum()) > cfg.max_pca_error
    # components orthonormal, ordered by decreasing variance
    comps = prior.pca_components[:k].double()
    torch.testing.assert_close(comps @ comps.T, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-5)
    var = ((x - prior.pca_mean) @ prior.pca_components[:k].T).var(0)
    assert bool((var[:-1] >= var[1:]).all())
    # the round trip through the codes
    codes = prior.encode(x)
    assert codes.shape == (len(x), k) and int(codes.min()) >= 0 and int(codes.max()) < cfg.num_buckets
    back = prior.decode(codes)
    rel = float(((back - x) ** 2).sum(-1).mean() / ((x - x.mean(0)) ** 2).sum(-1).mean())
    assert rel <= cfg.max_pca_error + QUANTIZATION_SLACK
    assert abs(rel - report["round_trip_error"]) < 1e-4
    # similarity buckets at the quantiles: each holds about 1/16 of the data
    counts = torch.bincount(prior.similarity_bucket(x, t), minlength=16).float() / len(x)
    assert float(counts.min()) > 0.04 and float(counts.max()) < 0.085


def test_top_p_keeps_the_smallest_nucleus():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    torch.testing.assert_close(top_p_filter(p, 0.7), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    torch.testing.assert_close(top_p_filter(p, 0.1), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(top_p_filter(p, 1.0), p)


def _fitted_tiny_prior():
    x, t = _low_rank_data(n=500, d=16, rank=4)
    cfg = ARPriorConfig(embed_dim=16, text_width=8, num_text_tokens=5, width=16, num_layers=1, num_heads=2,
                        num_buckets=32, num_sim_buckets=8)
    prior = ARPrior(cfg).eval()
    prior.fit_statistics(x, t)
    return prior


def _cond(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, 5, dtype=torch.bool)
    mask[:, :3] = True
    return TextCond(torch.randn(batch, 16, generator=g), torch.randn(batch, 5, 8, generator=g), mask)


def test_sampling_is_seeded_and_draws_the_similarity_from_the_top(monkeypatch):
    prior = _fitted_tiny_prior()
    cond, null = _cond(3), _cond(1, seed=9)
    a = run_ar_prior(prior, cond, null, guidance=2.0, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = run_ar_prior(prior, cond, null, guidance=2.0, top_p=0.9, generator=torch.Generator().manual_seed(1))
    c = run_ar_prior(prior, cond, null, guidance=2.0, top_p=0.9, generator=torch.Generator().manual_seed(2))
    assert a.shape == (3, 16) and torch.equal(a, b) and not torch.equal(a, c)
    # the similarity token: from the top half of its buckets at percentile 50, the top eighth at 87.5
    seen = []
    real_start = prior.start_decoding

    def spy(sim, *rest):
        seen.append(sim.clone())
        return real_start(sim, *rest)

    monkeypatch.setattr(prior, "start_decoding", spy)
    for pct, lowest in ((50.0, 4), (87.5, 7)):
        seen.clear()
        run_ar_prior(prior, _cond(64), null, guidance=1.0, similarity_percentile=pct, generator=torch.Generator().manual_seed(3))
        sims = torch.cat(seen)
        assert int(sims.min()) >= lowest and int(sims.max()) <= 7
    with pytest.raises(ValueError):
        run_ar_prior(ARPrior(prior.cfg), cond, null, guidance=1.0, generator=None)  # not fitted


def test_cached_decoding_gives_the_full_forward_logits():
    """start_decoding / next_logits (KV cache) against forward on the whole sequence, padded text included."""
    prior = _fitted_tiny_prior()
    cond = _cond(4)
    cond.mask[1, 1:] = False  # one caption of a single token: more padded columns
    g = torch.Generator().manual_seed(5)
    k = prior.kept
    codes = torch.randint(0, prior.cfg.num_buckets, (4, k), generator=g)
    sim = torch.randint(0, prior.cfg.num_sim_buckets, (4,), generator=g)
    with torch.no_grad():
        full = prior(codes, sim, cond.embed, cond.hidden, cond.mask)  # (4, k + 1, nb)
    logits, state = prior.start_decoding(sim, cond.embed, cond.hidden, cond.mask)
    steps = [logits]
    for j in range(k):
        steps.append(prior.next_logits(codes[:, j], state))
    torch.testing.assert_close(torch.stack(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full[:, 0], full[:, 1])  # the codes change the prediction
    # the sampler with the cache draws what a full forward per code draws (same seed)
    null = _cond(1, seed=9)
    both = TextCond.cat(null.expand(4), cond)
    gen = torch.Generator().manual_seed(7)
    s = torch.randint(prior.cfg.num_sim_buckets // 2, prior.cfg.num_sim_buckets, (4,), generator=gen)
    drawn = torch.zeros(4, 0, dtype=torch.long)
    for _ in range(k):
        with torch.no_grad():
            lg = prior(torch.cat([drawn, drawn]), torch.cat([s, s]), both.embed, both.hidden, both.mask)[:, -1]
        u, t = lg.chunk(2)
        probs = top_p_filter(torch.softmax(u + 2.0 * (t - u), dim=-1), 0.9)
        drawn = torch.cat([drawn, torch.multinomial(probs, 1, generator=gen)], dim=1)
    cached = run_ar_prior(prior, cond, null, guidance=2.0, top_p=0.9, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(cached, prior.decode(drawn))


@pytest.fixture(scope="module")
def ar_set(tiny_set, tmp_path_factory):
    from typer.testing import CliRunner

    from unclip_cli.cli import app

    path = tmp_path_factory.mktemp("ar") / "set"
    shutil.copytree(tiny_set, path)
    run = CliRunner().invoke(app, ["data", "embed", "--model", str(path), "--data", "shapes", "--count", "512",
                                   "-o", str(path / "cache.safetensors"), "-q"])
    assert run.exit_code == 0, run.stderr
    return path


def test_transformer_overfits_a_tiny_batch_then_pipes_into_decode(cli, ar_set):
    n = torch.get_num_threads()
    run = ok(cli("train", "prior-ar", "--model", ar_set, "--cache", ar_set / "cache.safetensors", "--fixed-batch",
                 "--steps", "150", "--batch-size", "8", "--lr", "3e-3", "--warmup", "5", "--log-every", "5", "-q"))
    assert torch.get_num_threads() == n
    assert "keeps" in run.err and "dims" in run.err  # the PCA report
    losses = [json.loads(line)["loss"] for line in (ar_set / "prior-ar" / "train.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] / 2, (losses[0], losses[-1])
    m = ["--model", ar_set]
    text = ok(cli("encode-text", "a red star on a blue background", "a green ring on a white background", *m)).out
    emb = ok(cli("prior", *m, "--kind", "ar", "--seed", "3", "-q", stdin=text)).out
    t = load_st(emb)
    assert t["image_embed"].shape == (2, 32) and torch.isfinite(t["image_embed"]).all()
    again = ok(cli("prior", *m, "--kind", "ar", "--seed", "3", "-q", stdin=text)).out
    assert torch.equal(load_st(again)["image_embed"], t["image_embed"])
    small = ok(cli("decode", *m, "--seed", "1", "-q", stdin=emb)).out
    assert small.count(b"IEND") == 2
    best = ok(cli("prior", *m, "--kind", "ar", "-k", "2", "--seed", "3", "-q", stdin=text)).out
    assert load_st(best)["image_embed"].shape == (2, 32)
    assert png_size(ok(cli("generate", "a red star", *m, "--prior-kind", "ar", "--size", "64", "--seed", "0", "-q")).out) == (64, 64)
    # mix's text items go through the prior --kind names
    one = ok(cli("encode-text", "a red star on a blue background", *m)).out
    want = load_st(ok(cli("prior", *m, "--kind", "ar", "--seed", "4", "-q", stdin=one)).out)["image_embed"]
    mixed = load_st(ok(cli("mix", "text:a red star on a blue background", *m, "--kind", "ar", "--seed", "4", "-q")).out)
    assert torch.equal(mixed["image_embed"], want)
    diffusion = load_st(ok(cli("mix", "text:a red star on a blue background", *m, "--seed", "4", "-q")).out)
    assert not torch.allclose(diffusion["image_embed"], want)


def test_untrained_ar_prior_and_bad_kind_are_refused(cli, tiny_set):
    m = ["--model", tiny_set]
    text = ok(cli("encode-text", "a red star", *m)).out
    run = cli("prior", *m, "--kind", "ar", "-q", stdin=text)
    assert run.code == 1 and "train it first" in run.err and "Traceback" not in run.err
    run = cli("prior", *m, "--kind", "gan", "-q", stdin=text)
    assert run.code == 1 and "--kind" in run.err


def test_model_add_gives_a_set_an_ar_prior(cli, tiny_set, tmp_path):
    path = tmp_path / "set"
    shutil.copytree(tiny_set, path)
    manifest = json.loads((path / "model.json").read_text())
    manifest["components"].remove("prior-ar")
    (path / "model.json").write_text(json.dumps(manifest))
    shutil.rmtree(path / "prior-ar")
    ok(cli("model", "add", "prior-ar", "--model", path))
    assert "prior-ar" in json.loads((path / "model.json").read_text())["components"]
    assert (path / "prior-ar" / "model.safetensors").is_file()
    run = cli("model", "add", "prior-ar", "--model", path)
    assert run.code == 1 and "already has" in run.err
