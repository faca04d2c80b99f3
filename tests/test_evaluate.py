"""The evaluator: the judge on rendered scenes (its own error), on wrong images, `unclip eval`, the PSNR check."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from unclip_cli.data.shapes import RELATIONS, SHAPES, Scene, ShapeObject, parse_caption, render, sample_scene, scene_for_index
from unclip_cli.evaluate.classifier import ShapeClassifier, load_classifier, save_classifier
from unclip_cli.evaluate.judge import Judge, default_judge_dir
from unclip_cli.evaluate.report import aggregate, eval_scenes
from unclip_cli.stages.images import downscale, psnr
from unclip_cli.modelset import MANIFEST, default_model_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge.load()  # the committed weights/judge


def single(color="red", shape="circle", background="blue", size="large", cx=0.5, cy=0.5, radius=0.26) -> Scene:
    obj = ShapeObject(shape, color, size, cx, cy, radius, 0.0)
    return Scene(background, (obj,), None, f"a {size} {color} {shape} on a {background} background")


def pair(relation="left of", a=("red", "circle"), b=("blue", "square"), background="white") -> Scene:
    # objects[0] sits on the relation's side of objects[1]
    offset = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}[relation]
    p0 = (0.5 + 0.25 * offset[0], 0.5 + 0.25 * offset[1])
    p1 = (0.5 - 0.25 * offset[0], 0.5 - 0.25 * offset[1])
    objs = (ShapeObject(a[1], a[0], "medium", *p0, 0.17, 0.0), ShapeObject(b[1], b[0], "medium", *p1, 0.17, 0.0))
    caption = f"a {a[0]} {a[1]} {relation} a {b[0]} {b[1]} on a {background} background"
    return Scene(background, objs, relation, caption)


def fraction(verdicts, key) -> float:
    return sum(bool(key(v)) for v in verdicts) / len(verdicts)


# ---------------------------------------------------------------------- the judge's own error


@pytest.mark.parametrize("size", [64, 256])  # 256: the judge averages down to 64 first
def test_judge_reads_rendered_scenes(judge, size):
    rng = random.Random(f"test-evaluate/{size}")
    scenes = [sample_scene(rng) for _ in range(100)]
    verdicts = judge(render(scenes, size), [s.caption for s in scenes])
    one = [v for v in verdicts if v.objects == 1]
    two = [v for v in verdicts if v.objects == 2]
    assert len(one) > 20 and len(two) > 20
    assert fraction(verdicts, lambda v: v.background_ok) >= 0.99
    assert fraction(one, lambda v: v.colors_ok) >= 0.99
    assert fraction(two, lambda v: v.colors_ok) >= 0.99
    assert fraction(one, lambda v: v.shapes_ok) >= 0.95
    assert fraction(two, lambda v: v.shapes_ok) >= 0.95
    assert fraction(two, lambda v: v.relation_ok) >= 0.99
    figures = aggregate(verdicts)
    assert figures["one_object"]["n"] == len(one) and figures["two_objects"]["n"] == len(two)
    assert figures["one_object"]["object_color"] >= 0.99 and figures["two_objects"]["relation"] >= 0.99


def test_judge_reads_what_is_there_not_what_was_asked(judge):
    drawn = [single("red", "circle", "blue"), single("yellow", "star", "black", size="small", radius=0.11, cx=0.3)]
    asked = ["a large green square on a white background", "a small yellow ring on a black background"]
    v0, v1 = judge(render(drawn, 64), asked)
    assert (v0.background, v0.colors, v0.shapes) == ("blue", ["red"], ["circle"])
    assert not (v0.background_ok or v0.colors_ok or v0.shapes_ok)
    assert (v1.background_ok, v1.colors_ok, v1.shapes_ok, v1.shapes) == (True, True, False, ["star"])


@pytest.mark.parametrize("relation", RELATIONS)
def test_judge_reads_relations_and_reports_swaps(judge, relation):
    scene = pair(relation)
    swapped = f"a blue square {relation} a red circle on a white background"  # the caption of the mirror image
    missing = f"a red circle {relation} a green square on a white background"
    right, wrong, absent = judge(render([scene] * 3, 64), [scene.caption, swapped, missing])
    assert right.relation == relation and right.relation_ok and right.colors_ok and right.shapes_ok
    assert wrong.colors_ok and wrong.relation != relation and not wrong.relation_ok
    assert wrong.shapes == ["square", "circle"]
    assert not absent.colors_ok and absent.relation is None and absent.relation_ok is False
    assert absent.shapes == ["circle", None]


def test_judge_on_empty_and_noise_images(judge):
    blank = render([Scene("green", (), None, "")], 64)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    caption = "a medium red triangle on a green background"
    (v_blank,), (v_noise,) = judge(blank, [caption]), judge(noise, [caption])
    assert v_blank.background_ok and v_blank.colors == [] and v_blank.shapes == [None] and not v_blank.colors_ok
    assert not v_noise.colors_ok and not v_noise.shapes_ok


def test_judge_refuses_captions_outside_the_grammar(judge):
    from unclip_cli.errors import UserError

    with pytest.raises(UserError, match="not a shapes caption"):
        judge(render([single()], 64), ["a photo of a cat"])


# ---------------------------------------------------------------------- the classifier and its files


def test_shipped_judge_is_small_and_not_a_model_set():
    folder = default_judge_dir()
    assert folder == ROOT / "weights" / "judge"
    assert not (folder / MANIFEST).exists()
    assert sum(p.stat().st_size for p in folder.iterdir()) < 1 << 20
    assert default_model_dir() is None or default_model_dir().name != "judge"
    record = json.loads((folder / "config.json").read_text())["training"]
    assert record["heldout_clean_accuracy"] >= 0.98


def test_classifier_round_trip(tmp_path):
    model = load_classifier(default_judge_dir())
    crops = torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    save_classifier(tmp_path / "copy", model, {"note": "test"})
    again = load_classifier(tmp_path / "copy")
    assert again.cfg == model.cfg and torch.equal(again(crops), model(crops))
    fresh = ShapeClassifier(model.cfg)
    assert not torch.equal(fresh(crops), model(crops))


def test_bad_judge_folder_is_one_line(cli, tiny_set, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    for folder in (tmp_path / "absent", tmp_path):
        run = cli("eval", "--model", tiny_set, "--count", "1", "--judge", folder)
        assert run.code == 1, run
        lines = [ln for ln in run.err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("unclip: error:") and str(folder) in lines[0]


def test_train_judge_command_writes_a_loadable_judge(cli, tmp_path):
    run = cli("eval", "train-judge", "-o", tmp_path / "j", "--steps", "2", "--scenes", "6", "-q")
    assert run.code == 0, run
    model = load_classifier(tmp_path / "j")
    assert model.cfg.shapes == SHAPES
    record = json.loads((tmp_path / "j" / "config.json").read_text())["training"]
    assert record["steps"] == 2 and 0 <= record["heldout_clean_accuracy"] <= 1


# ---------------------------------------------------------------------- the eval run


def test_eval_prompts_alternate_and_are_reproducible():
    scenes = eval_scenes(10, seed=3)
    assert [len(s.objects) for s in scenes] == [1, 2] * 5
    assert [s.caption for s in scenes] == [s.caption for s in eval_scenes(10, seed=3)]
    assert [s.caption for s in scenes] != [s.caption for s in eval_scenes(10, seed=4)]
    assert all(parse_caption(s.caption) for s in scenes)
    assert [s.caption for s in scenes] != [scene_for_index(3, i).caption for i in range(10)]  # not the training stream


@pytest.fixture(scope="module")
def quick_set(tiny_set, tmp_path_factory) -> Path:
    """The tiny random set with 2 sampling steps everywhere, so the eval runs in seconds."""
    path = tmp_path_factory.mktemp("sets") / "quick"
    shutil.copytree(tiny_set, path)
    manifest = json.loads((path / MANIFEST).read_text())
    for settings in manifest["sampling"].values():
        settings["steps"] = 2
    (path / MANIFEST).write_text(json.dumps(manifest))
    return path


def _check_figures(report: dict, count: int) -> None:
    figures = report["figures"]
    assert figures["one_object"]["n"] + figures["two_objects"]["n"] == count
    for kind in ("one_object", "two_objects"):
        for name, value in figures[kind].items():
            if name != "n":
                assert 0.0 <= value <= 1.0, (kind, name, value)
    assert set(report["passed"]["one_object"]) == {"object_color", "background", "shape"}
    assert set(report["passed"]["two_objects"]) == {"both_colors", "relation"}
    assert len(report["verdicts"]) == count
    assert report["sampling"]["decoder"]["steps"] == 2 and report["sampling"]["prior"]["steps"] == 2


def test_eval_command_prints_the_figures(cli, quick_set, tmp_path):
    run = cli(
        "eval", "--model", quick_set, "--count", "4", "--batch-size", "2", "--seed", "1", "--upsamplers",
        "--upsample-count", "1", "--json", tmp_path / "r.json", "--save", tmp_path / "img", "-q",
    )
    assert run.code == 0, run
    table = run.out.decode()
    for label in ("one object (2)", "two objects (2)", "object color", "relation", "upsampler-256", "upsampler-1024"):
        assert label in table, table
    report = json.loads((tmp_path / "r.json").read_text())
    _check_figures(report, 4)
    assert [v["caption"] for v in report["verdicts"]] == [s.caption for s in eval_scenes(4, 1)]
    for component, size in (("upsampler-256", 64), ("upsampler-1024", 256)):
        u = report["upsamplers"][component]
        assert u["n"] == 1 and u["input"] == size and u["steps"] == 2 and math.isfinite(u["psnr_mean"])
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == ["000.png", "001.png", "002.png", "003.png"]


def test_eval_of_a_perfect_and_a_confused_generator(quick_set, judge, monkeypatch):
    """With the generator replaced by the renderer, every figure is 1; with the images shifted by one prompt, far less."""
    from unclip_cli.evaluate import report as report_mod
    from unclip_cli.pipeline import Pipeline

    by_caption = {s.caption: s for s in eval_scenes(12, seed=5)}

    def perfect(self, prompts, generator, **_):
        return render([by_caption[p] for p in prompts], 64), {}

    def confused(self, prompts, generator, **_):
        return render([by_caption[p] for p in prompts[1:] + prompts[:1]], 64), {}

    pipe = Pipeline.load(quick_set, device="cpu")
    monkeypatch.setattr(Pipeline, "generate_tensor", perfect)
    good = report_mod.run_eval(pipe, judge, count=12, seed=5, batch_size=5)
    assert good["figures"]["one_object"] == {"n": 6, "object_color": 1.0, "background": 1.0, "shape": 1.0}
    assert good["figures"]["two_objects"]["relation"] == 1.0 and good["figures"]["two_objects"]["both_colors"] == 1.0
    assert all(all(kind.values()) for kind in good["passed"].values())
    monkeypatch.setattr(Pipeline, "generate_tensor", confused)
    bad = report_mod.run_eval(pipe, judge, count=12, seed=5, batch_size=5)
    assert bad["figures"]["one_object"]["background"] < 0.7 and bad["figures"]["two_objects"]["both_colors"] < 0.7
    assert not all(bad["passed"]["one_object"].values())


def test_eval_json_on_stdout_is_reproducible(cli, quick_set):
    runs = [cli("eval", "--model", quick_set, "--count", "2", "--batch-size", "2", "--json", "-", "-q") for _ in range(2)]
    for run in runs:
        assert run.code == 0, run
    reports = [json.loads(run.out) for run in runs]
    _check_figures(reports[0], 2)
    assert "upsamplers" not in reports[0]
    assert reports[0]["verdicts"] == reports[1]["verdicts"]


def test_eval_rejects_bad_options(cli, quick_set):
    for args in (["--count", "0"], ["--batch-size", "0"], ["--seed", "-1"]):
        run = cli("eval", "--model", quick_set, *args)
        assert run.code == 1 and run.err.startswith("unclip: error:"), run


# ---------------------------------------------------------------------- PSNR


def test_psnr_of_identical_images_is_infinite():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.isinf(psnr(x, x.clone())).all()


def test_psnr_of_known_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    offset = 0.02 * torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0)  # |error| = 0.02 everywhere
    expected = 10 * math.log10(2.0**2 / 0.02**2)  # range 2 ([-1, 1]): 40 dB
    assert psnr(x + offset, x) == pytest.approx(torch.full((2,), expected), abs=1e-3)
    noisy = x + 0.1 * torch.randn(x.shape, generator=g)  # Gaussian noise of std 0.1: 26.0 dB
    assert psnr(noisy, x) == pytest.approx(torch.full((2,), 10 * math.log10(4 / 0.01)), abs=0.1)


def test_downscale_inverts_a_smooth_upscale():
    x = render([single()], 64)
    up = torch.nn.functional.interpolate(x, size=(256, 256), mode="bicubic", align_corners=False)
    assert downscale(up, 64).shape == (1, 3, 64, 64)
    assert psnr(downscale(up, 64), x).item() > 30
    assert psnr(downscale(torch.zeros(1, 3, 256, 256), 64), x).item() < 20


# ---------------------------------------------------------------------- the shipped model set


def test_shipped_set_is_complete_and_small():
    shipped = default_model_dir()
    assert shipped is not None and shipped.name == "shapes-small"
    manifest = json.loads((shipped / MANIFEST).read_text())
    assert manifest["components"] == ["clip", "prior", "prior-ar", "decoder", "upsampler-256", "upsampler-1024"]
    files = [p for p in shipped.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pt", ".jsonl")], "training states and logs stay out of weights/"
    assert max(p.stat().st_size for p in files) <= 16 * 2**20
    assert sum(p.stat().st_size for p in files) <= 80 * 2**20
    assert (shipped / "README.md").is_file()  # the model card


def test_shipped_set_names_the_clip_its_weights_hash_to():
    """The manifest's CLIP identity (which stage files carry and check) is the hash of the shipped CLIP's
    weights, and that CLIP is the 64 px one its priors and decoder were trained on."""
    from unclip_cli.modelset import clip_identity

    shipped = default_model_dir()
    manifest = json.loads((shipped / MANIFEST).read_text())
    name = manifest["clip"]["identity"].split("@")[0]
    assert manifest["clip"]["identity"] == clip_identity(shipped / "clip", name)
    assert manifest["clip"]["image_size"] == 64


def test_shipped_set_draws_the_right_colors(cli, judge, monkeypatch):
    from unclip_cli.io import decode_image, images_to_tensor

    monkeypatch.delenv("UNCLIP_MODEL", raising=False)
    caption = "a large red circle on a blue background"
    run = cli("generate", caption, "--size", "64", "--seed", "0", "-q")
    assert run.code == 0, run
    (verdict,) = judge(images_to_tensor([decode_image(run.out, "<stdout>")]), [caption])
    assert verdict.background_ok and verdict.colors_ok, verdict
