"""`unclip metrics`: the Frechet distance against a float64 reference, fd_clip of a folder against itself
and against a perturbed copy, the CLIP score against a direct computation with the pipeline's
encoders (from a manifest, tar shards, captions and PNG records alike), Inception FID through
torch-fidelity, bad inputs, and 2 torchrun ranks against one process."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from unclip_cli.evaluate.metrics import Moments, frechet_distance

PROMPTS = ["a red circle", "a blue square on a green background", "a small yellow star", "two purple triangles",
           "a white cross"]
SIZES = [(64, 64), (48, 80), (64, 64), (96, 64), (64, 64)]  # mixed sizes are fine


def _image(seed: int, size: tuple[int, int], noise: float = 0.0) -> Image.Image:
    """A blocky random picture (fixed seed), plus Gaussian pixel noise of std `noise` (0..255 scale)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (4, 4, 3)).astype(np.float64)
    x = np.kron(blocks, np.ones((size[1] // 4 + 1, size[0] // 4 + 1, 1)))[: size[1], : size[0]]
    if noise:
        x = x + np.random.default_rng(1000 + seed).normal(0, noise, x.shape)
    return Image.fromarray(np.clip(x, 0, 255).round().astype(np.uint8))


def _images(noise: float = 0.0, count: int = len(SIZES)) -> list[Image.Image]:
    return [_image(i, s, noise) for i, s in enumerate(SIZES[:count])]


def _manifest_dir(root: Path, noise: float = 0.0, count: int = len(SIZES)) -> Path:
    """root/000000.png... and root/manifest.jsonl as `generate --out-dir` writes them."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "manifest.jsonl", "w") as f:
        for i, (img, prompt) in enumerate(zip(_images(noise, count), PROMPTS)):
            img.save(root / f"{i:06d}.png")
            f.write(json.dumps({"index": i, "prompt": prompt, "seed": i, "file": f"{i:06d}.png"}) + "\n")
    return root


def _metrics(cli, *args) -> dict:
    run = cli("metrics", *args, "--json", "-q")
    assert run.code == 0, run
    return json.loads(run.out)


# --------------------------------------------------------------------------- the maths


def _reference_fd(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance of two feature sets, float64: scipy's sqrtm if installed, else eigenvalues of cov_a cov_b."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    try:
        from scipy.linalg import sqrtm

        tr = np.trace(sqrtm(ca @ cb)).real
    except ImportError:
        tr = np.sqrt(np.linalg.eigvals(ca @ cb).astype(np.complex128)).real.sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * tr)


@pytest.mark.parametrize("n, dim", [(200, 16), (40, 32)])
def test_frechet_distance_matches_float64_reference(n, dim):
    g = np.random.default_rng(dim)
    a = g.normal(size=(n, dim)) * g.uniform(0.5, 2, dim)
    b = g.normal(size=(n + 7, dim)) @ g.normal(size=(dim, dim)) * 0.3 + 0.5
    ma, mb = Moments(), Moments()
    for chunk in np.array_split(a, 3):  # streamed in batches, as folders are
        ma.add(torch.from_numpy(chunk).float())
    mb.add(torch.from_numpy(b).float())
    a32, b32 = (torch.from_numpy(x).float().double().numpy() for x in (a, b))  # what the sums saw
    mu, cov = ma.mean_cov()
    assert np.allclose(mu.numpy(), a32.mean(0), rtol=1e-12, atol=1e-12)
    assert np.allclose(cov.numpy(), np.cov(a32, rowvar=False), rtol=1e-9, atol=1e-11)
    ours = frechet_distance(*ma.mean_cov(), *mb.mean_cov())
    assert ours == pytest.approx(_reference_fd(a32, b32), rel=1e-8)
    assert frechet_distance(*ma.mean_cov(), *ma.mean_cov()) == pytest.approx(0, abs=1e-6 * ours)


# --------------------------------------------------------------------------- the command


def test_fd_clip_is_zero_against_itself_and_grows_with_perturbation(cli, tiny_set, tmp_path):
    clean = _manifest_dir(tmp_path / "clean")
    slight = _manifest_dir(tmp_path / "slight", noise=8)
    strong = _manifest_dir(tmp_path / "strong", noise=64)
    same = _metrics(cli, clean, "--real", clean, "--model", tiny_set)
    d_slight = _metrics(cli, clean, "--real", slight, "--model", tiny_set)["fd_clip"]
    d_strong = _metrics(cli, clean, "--real", strong, "--model", tiny_set)["fd_clip"]
    assert same["fid"] is None and same["real_images"] == same["fake_images"] == len(PROMPTS)
    assert 0 < d_slight < d_strong
    assert same["fd_clip"] <= 1e-6 * d_slight


def _direct_clip_score(model: Path) -> float:
    from unclip_cli import Pipeline

    pipe = Pipeline.load(model, device="cpu")
    image = pipe.encode_image(_images()).main.double()
    text = pipe.encode_text(PROMPTS).tensors["text_embed"].double()
    cos = (image * text).sum(-1) / (image.norm(dim=-1) * text.norm(dim=-1))
    return float(100 * cos.clamp(min=0).mean())


def _tar_dir(root: Path) -> Path:
    """The same images as webdataset shards (key.png, key.txt, key.json), two of them."""
    root.mkdir()
    for s, keys in enumerate([range(0, 3), range(3, 5)]):
        with tarfile.open(root / f"shard-{s:06d}.tar", "w") as tar:
            for i in keys:
                buf = io.BytesIO()
                _images()[i].save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("txt", PROMPTS[i].encode()), ("json", b"{}")):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def _plain_dir(root: Path) -> Path:
    """The same images as loose files: prompts from a .txt beside some, from the PNG's unclip record for the rest."""
    root.mkdir()
    for i, img in enumerate(_images()):
        info = PngInfo()
        if i % 2:
            (root / f"img-{i}.txt").write_text(PROMPTS[i] + "\n")
        else:
            info.add_text("unclip", json.dumps({"prompts": ["another prompt", PROMPTS[i]], "index": 1}))
        img.save(root / f"img-{i}.png", pnginfo=info)
    return root


def test_clip_score_matches_direct_computation_from_every_layout(cli, tiny_set, tmp_path):
    expected = _direct_clip_score(tiny_set)
    for folder in (_manifest_dir(tmp_path / "manifest"), _tar_dir(tmp_path / "tar"), _plain_dir(tmp_path / "plain")):
        result = _metrics(cli, folder, "--model", tiny_set, "--batch-size", "2")
        assert result["clip_score"] == pytest.approx(expected, rel=1e-5), folder.name
        assert result["fd_clip"] is None and result["fid"] is None and result["fake_images"] == len(PROMPTS)
    table = cli("metrics", tmp_path / "manifest", "--model", tiny_set, "-q")
    assert table.code == 0 and table.out.decode().startswith("clip_score") and len(table.out.decode().splitlines()) == 3


def test_clip_option_takes_an_open_clip_folder(cli, tiny_set, other_set, tmp_path):
    folder = _manifest_dir(tmp_path / "fake")
    with_set = _metrics(cli, folder, "--model", tiny_set)
    with_clip = _metrics(cli, folder, "--model", tiny_set, "--clip", other_set / "clip")
    assert with_clip["clip_score"] == pytest.approx(_direct_clip_score(other_set), rel=1e-5)
    assert with_clip["clip_score"] != pytest.approx(with_set["clip_score"], rel=1e-3)


def _lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip()]


def test_bad_inputs_are_one_line(cli, tiny_set, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    unprompted = tmp_path / "unprompted"
    unprompted.mkdir()
    for i in range(2):
        _images()[i].save(unprompted / f"{i}.png")
    broken = _manifest_dir(tmp_path / "broken")
    (broken / "000002.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    bad_manifest = _manifest_dir(tmp_path / "badmanifest")
    with open(bad_manifest / "manifest.jsonl", "a") as f:
        f.write('{"prompt": "no file"}\n')
    good = _manifest_dir(tmp_path / "good")
    cases = [
        ((empty,), "no images"),
        ((tmp_path / "missing",), "no such folder"),
        ((unprompted,), "no prompts"),
        ((broken,), "not a readable image"),
        ((bad_manifest,), "line 6"),
        ((good, "--inception-weights", tmp_path / "w.pth"), "--real"),
        ((good, "--real", empty), "no images"),
        ((good, "--real", good, "--batch-size", "0"), "--batch-size"),
    ]
    for args, words in cases:
        run = cli("metrics", *args, "--model", tiny_set, "-q")
        assert run.code == 1 and words in run.err and len(_lines(run.err)) == 1 and "Traceback" not in run.err, (args, run)
    mixed = tmp_path / "mixed"  # some images with a prompt, one without: named
    _plain_dir(mixed)
    (mixed / "img-1.txt").unlink()
    run = cli("metrics", mixed, "--model", tiny_set, "-q")
    assert run.code == 1 and "img-1.png: no prompt" in run.err and len(_lines(run.err)) == 1, run
    # no prompts but a --real folder: fd_clip alone, clip_score null
    result = _metrics(cli, unprompted, "--real", good, "--model", tiny_set)
    assert result["clip_score"] is None and result["fd_clip"] > 0


# --------------------------------------------------------------------------- Inception FID


def _random_inception(path: Path) -> None:
    """torch-fidelity's Inception-v3 with its random initialization (seeded), saved as safetensors."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3",
                             reason="Inception FID needs the fid extra (torch-fidelity)")
    from safetensors.torch import save_file

    cls = fe.FeatureExtractorInceptionV3
    real_load, real_url = cls.load_state_dict, fe.load_state_dict_from_url
    cls.load_state_dict, fe.load_state_dict_from_url = (lambda self, *a, **k: None), (lambda *a, **k: {})
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = cls("inception-v3-compat", ["2048"])
    finally:
        cls.load_state_dict, fe.load_state_dict_from_url = real_load, real_url
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


def _low_rank_fd(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance of few samples in many dimensions, exactly: with centred samples Xa, Xb,
    Tr((cov_a cov_b)^(1/2)) is the sum of the singular values of Xa Xb^T / ((n_a - 1)(n_b - 1))^(1/2)."""
    xa, xb = a - a.mean(0), b - b.mean(0)
    tr = np.linalg.svd(xa @ xb.T, compute_uv=False).sum() / np.sqrt((len(a) - 1) * (len(b) - 1))
    cov_traces = (xa**2).sum() / (len(a) - 1) + (xb**2).sum() / (len(b) - 1)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + cov_traces - 2 * tr)


def test_inception_fid_through_torch_fidelity(cli, tiny_set, tmp_path):
    weights = tmp_path / "inception.safetensors"
    _random_inception(weights)
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from unclip_cli.io import load_state_dict

    # two images a folder: Inception-v3 and a 2048-wide eigendecomposition are slow on a CPU
    fake, real = _manifest_dir(tmp_path / "fake", count=2), _manifest_dir(tmp_path / "real", noise=40, count=2)
    result = _metrics(cli, fake, "--real", real, "--model", tiny_set, "--inception-weights", weights)
    # torch-fidelity's own extractor, image by image, and the exact few-samples formula
    state_path = tmp_path / "state.pt"
    torch.save(load_state_dict(weights), state_path)
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(state_path))

    def features(noise):
        pixels = [torch.from_numpy(np.array(im)).permute(2, 0, 1)[None] for im in _images(noise, 2)]  # (1, 3, H, W) uint8
        with torch.no_grad():
            return torch.cat([net(x)[0] for x in pixels]).double().numpy()

    assert result["fid"] == pytest.approx(_low_rank_fd(features(0), features(40)), rel=1e-5)
    assert result["fd_clip"] > 0
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.zeros(3, 3)}, str(bad))
    run = cli("metrics", fake, "--real", real, "--model", tiny_set, "--inception-weights", bad, "-q")
    assert run.code == 1 and "Inception" in run.err and len(_lines(run.err)) == 1, run


# --------------------------------------------------------------------------- torchrun


def test_two_torchrun_ranks_give_the_figures_of_one_process(cli, tiny_set, tmp_path):
    fake, real = _manifest_dir(tmp_path / "fake"), _manifest_dir(tmp_path / "real", noise=30)
    args = ["metrics", str(fake), "--real", str(real), "--model", str(tiny_set), "--batch-size", "2", "--json", "-q"]
    one = _metrics(cli, *args[1:-2])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "unclip_cli", *args],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    two = json.loads(run.stdout)
    assert two["fake_images"] == one["fake_images"] and two["real_images"] == one["real_images"]
    for key in ("clip_score", "fd_clip"):
        assert two[key] == pytest.approx(one[key], rel=1e-6), key
