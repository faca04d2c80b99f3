"""Training data: the shapes grammar and renderer, folder and tar sources, the embedding cache, `unclip data`."""

from __future__ import annotations

import io
import random
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from test_cli import ok, user_error
from unclip_cli.data.cache import EmbeddingCache, build_embedding_cache
from unclip_cli.data.shapes import (
    COLORS, RELATIONS, SHAPES, SIZES, Scene, ShapeObject, palette_value, parse_caption, render, sample_scene,
    scene_for_index, scene_group,
)
from unclip_cli.data.sources import ImageTextSource, open_source
from unclip_cli.errors import UserError
from unclip_cli.io import tensor_to_images

C, S, Z, R = (f"({'|'.join(x)})" for x in (COLORS, SHAPES, SIZES, RELATIONS))
SINGLE = re.compile(rf"a {Z} {C} {S} on a {C} background")
PAIR = re.compile(rf"a {C} {S} {R} a {C} {S} on a {C} background")


def scenes(n: int, seed: int = 0) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(n)]


def rgb(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, as PNGs store it."""
    return np.stack([np.asarray(im) for im in tensor_to_images(x)])


# ---------------------------------------------------------------------- grammar


def test_captions_follow_the_grammar_and_cover_it():
    seen = {"color": set(), "shape": set(), "size": set(), "relation": set()}
    for sc in scenes(400):
        colors = [o.color for o in sc.objects]
        assert sc.background not in colors
        if len(sc.objects) == 1:
            m = SINGLE.fullmatch(sc.caption)
            assert m and sc.relation is None, sc.caption
            (o,) = sc.objects
            assert m.groups() == (o.size, o.color, o.shape, sc.background)
            seen["size"].add(o.size)
        else:
            m = PAIR.fullmatch(sc.caption)
            assert m and len(sc.objects) == 2, sc.caption
            a, b = sc.objects
            assert m.groups() == (a.color, a.shape, sc.relation, b.color, b.shape, sc.background)
            assert a.color != b.color  # each object can be found by its color
            seen["relation"].add(sc.relation)
        seen["color"].update(colors + [sc.background])
        seen["shape"].update(o.shape for o in sc.objects)
        parsed = parse_caption(sc.caption)
        assert parsed["background"] == sc.background and parsed["relation"] == sc.relation
        assert [(o["color"], o["shape"]) for o in parsed["objects"]] == [(o.color, o.shape) for o in sc.objects]
        if len(sc.objects) == 1:
            assert parsed["objects"][0]["size"] == sc.objects[0].size
    assert seen == {"color": set(COLORS), "shape": set(SHAPES), "size": set(SIZES), "relation": set(RELATIONS)}


def test_parse_caption_forgives_case_and_an_but_rejects_the_rest():
    assert parse_caption("An orange star above a white ring on a black background.") == {
        "background": "black", "relation": "above",
        "objects": [{"color": "orange", "shape": "star"}, {"color": "white", "shape": "ring"}],
    }
    for bad in (
        "a red circle",
        "a small red circle on a red background",  # object colored like the background
        "a huge red circle on a blue background",
        "a red circle near a blue square on a white background",
        "a small pink circle on a blue background",
        "a small red circle on a blue background and a green square",
    ):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_scene_geometry_makes_the_relation_true():
    for sc in scenes(300, seed=1):
        for o in sc.objects:  # every object fully inside the image
            assert o.radius < o.cx < 1 - o.radius and o.radius < o.cy < 1 - o.radius
        if sc.relation is None:
            continue
        a, b = sc.objects
        horizontal = sc.relation in ("left of", "right of")
        along = (b.cx - a.cx) if horizontal else (b.cy - a.cy)
        across = (b.cy - a.cy) if horizontal else (b.cx - a.cx)
        if sc.relation in ("right of", "below"):
            along = -along
        assert along > a.radius + b.radius, sc  # bounding circles clear of each other along the axis
        assert abs(across) <= along / 2 + 1e-9, sc  # and the relation is the dominant direction


def test_scene_for_index_is_deterministic():
    assert scene_for_index(3, 7) == scene_for_index(3, 7)
    assert scene_for_index(3, 7) != scene_for_index(3, 8)
    assert scene_for_index(3, 7) != scene_for_index(4, 7)
    a = render([scene_for_index(3, i) for i in range(4)], 48)
    b = render([scene_for_index(3, i) for i in range(4)], 48)
    assert torch.equal(a, b)


def test_scene_groups_differ_only_where_clip_must_look():
    """A group of hard negatives shares the background and the set of object colors; one-object
    groups take distinct shapes, two-object groups vary shapes, relation or color order. Every
    caption is still true of its scene, and a group's seed fixes it."""
    rng = random.Random(2)
    kinds = set()
    for _ in range(60):
        group = scene_group(rng, 4)
        assert len(group) == 4 and len({sc.caption for sc in group}) > 1
        assert len({sc.background for sc in group}) == 1
        assert len({frozenset(o.color for o in sc.objects) for sc in group}) == 1
        assert len({len(sc.objects) for sc in group}) == 1
        for sc in group:
            assert parse_caption(sc.caption)["background"] == sc.background
            for o in sc.objects:
                assert o.radius < o.cx < 1 - o.radius and o.radius < o.cy < 1 - o.radius
        if group[0].relation is None:
            kinds.add("one")
            assert len({sc.objects[0].shape for sc in group}) == 4
        else:
            kinds.add("two")
            assert len({(sc.relation, tuple((o.shape, o.color) for o in sc.objects)) for sc in group}) > 1
    assert kinds == {"one", "two"}
    big = next(g for g in (scene_group(random.Random(i), 9) for i in range(20)) if g[0].relation is None)
    assert len({sc.objects[0].shape for sc in big}) == len(SHAPES)  # every shape, then repeats
    assert scene_group(random.Random(5), 3) == scene_group(random.Random(5), 3)


# ---------------------------------------------------------------------- rendering


def test_render_shape_range_and_exact_palette_colors():
    batch = scenes(48, seed=2)
    x = render(batch, 64)
    assert x.shape == (48, 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    px = rgb(x)
    for sc, img, t in zip(batch, px, x):
        for corner in (img[0, 0], img[-1, -1], img[0, -1], img[-1, 0]):
            assert tuple(corner) == COLORS[sc.background]
        assert torch.equal(t[:, 0, 0], torch.tensor(palette_value(sc.background)))  # exact before rounding too
        for o in sc.objects:
            centre = tuple(img[int(o.cy * 64), int(o.cx * 64)])
            assert centre == COLORS[sc.background if o.shape == "ring" else o.color], (sc, centre)
    assert render(batch[:1], 1024).shape == (1, 3, 1024, 1024)


def test_edges_are_antialiased_between_object_and_background():
    for sc in [s for s in scenes(60, seed=3) if len(s.objects) == 1][:12]:
        img = rgb(render([sc], 64))[0].reshape(-1, 3).astype(np.float64)
        bg, fg = np.array(COLORS[sc.background], float), np.array(COLORS[sc.objects[0].color], float)
        exact_fg = (img == fg).all(1).sum()
        mixed = ~((img == fg).all(1) | (img == bg).all(1))
        assert 0 < mixed.sum() < exact_fg, sc  # a thin band of blended pixels around a solid object
        # Blended pixels lie on the segment between the two colors (no other color leaks in).
        t = ((img[mixed] - bg) @ (fg - bg)) / ((fg - bg) @ (fg - bg))
        assert ((t > 0) & (t < 1)).all()
        assert np.abs(bg + t[:, None] * (fg - bg) - img[mixed]).max() <= 1.0


def test_relations_hold_in_pixels():
    pairs = [s for s in scenes(200, seed=4) if s.relation is not None][:40]
    px = rgb(render(pairs, 64))
    for sc, img in zip(pairs, px):
        (ay, ax), (by, bx) = (np.argwhere((img == COLORS[o.color]).all(-1)).mean(0) for o in sc.objects)
        along = {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[sc.relation]
        across = (by - ay) if sc.relation in ("left of", "right of") else (bx - ax)
        assert along > 0 and abs(across) < along, (sc.caption, along, across)


def test_rendered_area_matches_the_geometry():
    """Summed pixel coverage equals each shape's analytic area: exact distances, nothing clipped."""
    from unclip_cli.data.shapes import POLYGONS, RING_INNER

    def shoelace(v):
        return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(v, v[1:] + v[:1]))) / 2

    unit_area = {"circle": np.pi, "square": 2.0, "ring": np.pi * (1 - RING_INNER**2),
                 **{k: shoelace(v) for k, v in POLYGONS.items()}}
    assert unit_area["triangle"] == pytest.approx(3 * np.sqrt(3) / 4)
    size, r = 256, 0.2
    batch = [Scene("black", (ShapeObject(shape, "white", "medium", 0.47, 0.52, r, 0.2),), None, "")
             for shape in SHAPES]
    x = render(batch, size)
    bg, fg = torch.tensor(palette_value("black")), torch.tensor(palette_value("white"))
    for shape, t in zip(SHAPES, x):
        coverage = (t[0] - bg[0]) / (fg[0] - bg[0])  # (S, S) in [0, 1]
        assert float(coverage.sum()) == pytest.approx(unit_area[shape] * (r * size) ** 2, rel=0.003), shape


def test_sizes_order_pixel_area_per_shape():
    area: dict[tuple[str, str], list[float]] = {}
    singles = [s for s in scenes(300, seed=5) if len(s.objects) == 1]
    x = render(singles, 48)
    for sc, t in zip(singles, x):
        bg = torch.tensor(palette_value(sc.background))[:, None, None]
        covered = float((t != bg).any(0).sum())
        area.setdefault((sc.objects[0].shape, sc.objects[0].size), []).append(covered)
    for shape in SHAPES:
        small, medium, large = (area[(shape, z)] for z in SIZES)
        assert max(small) < min(medium) and max(medium) < min(large), shape


# ---------------------------------------------------------------------- sources


def _random_image(rng: np.random.Generator, w: int, h: int) -> bytes:
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


ITEMS = [("a/one", (40, 30)), ("a/two", (30, 52)), ("b/three", (24, 24)), ("four", (64, 20))]


@pytest.fixture
def dataset(tmp_path):
    """The same 4 items as a folder (with subfolders) and as a webdataset shard."""
    rng = np.random.default_rng(0)
    folder, shard = tmp_path / "folder", tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for key, (w, h) in sorted(ITEMS):
            data, caption = _random_image(rng, w, h), f"caption of {key}".encode()
            (folder / key).parent.mkdir(parents=True, exist_ok=True)
            (folder / f"{key}.png").write_bytes(data)
            (folder / f"{key}.txt").write_bytes(caption + b"\n")
            for name, payload in ((f"{key}.png", data), (f"{key}.txt", caption), (f"{key}.json", b"{}")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return folder, shard


def test_folder_and_shard_give_the_same_items(dataset):
    folder, shard = dataset
    a, b = open_source(str(folder)), open_source(str(shard))
    keys = sorted(k for k, _ in ITEMS)
    assert len(a) == len(b) == 4
    assert [a.caption(i) for i in range(4)] == [b.caption(i) for i in range(4)] == [f"caption of {k}" for k in keys]
    x = a.images([0, 1, 2, 3], 16)
    assert x.shape == (4, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, b.images([0, 1, 2, 3], 16))
    # Shortest side to 16 with PIL bicubic, then a centre crop (as CLIP's preprocessing).
    img = Image.open(folder / f"{keys[0]}.png").convert("RGB")  # 40x30
    ref = np.asarray(img.resize((21, 16), Image.BICUBIC).crop((2, 0, 18, 16)))
    assert np.array_equal(rgb(x[:1])[0], ref)


def test_shard_patterns_and_folders_of_shards(dataset, tmp_path):
    _, shard = dataset
    d = tmp_path / "shards"
    d.mkdir()
    for i in range(3):
        (d / f"{i:05d}.tar").write_bytes(shard.read_bytes())
    captions = [open_source(str(shard)).caption(i) for i in range(4)] * 3
    for src in (f"{d}/{{00000..00002}}.tar", f"{d}/*.tar", str(d), f"{d}/{{00000,00001,00002}}.tar"):
        s = open_source(src)
        assert [s.caption(i) for i in range(len(s))] == captions, src
    assert len(open_source(f"{d}/{{00000..00001}}.tar")) == 8
    with pytest.raises(UserError, match="00003.tar"):
        open_source(f"{d}/{{00000..00003}}.tar")
    with pytest.raises(UserError, match="matches no files"):
        open_source(f"{d}/*.tgz")


def test_bad_datasets_name_the_file(dataset, tmp_path):
    folder, _ = dataset
    (folder / "a" / "two.txt").unlink()
    with pytest.raises(UserError, match=r"two\.png.*caption"):
        open_source(str(folder))
    (folder / "a" / "two.png").unlink()
    (folder / "b" / "three.png").write_bytes(b"not an image at all")
    src = open_source(str(folder))
    with pytest.raises(UserError, match=r"three\.png: not a readable image"):
        src.images(list(range(len(src))), 16)

    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for name, payload in (("k1.png", _random_image(np.random.default_rng(1), 8, 8)), ("k1.txt", b"ok"),
                              ("k2.jpg", b"\xff\xd8\xff broken jpeg"), ("k2.txt", b"broken"), ("k3.png", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(UserError, match=r"k3\.png has no caption"):
        open_source(str(bad))

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        open_source(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no such"):
        open_source(str(tmp_path / "missing"))
    gz = tmp_path / "c.tar"
    with tarfile.open(gz, "w:gz") as tar:
        tar.add(folder / "four.png", "four.png")
    with pytest.raises(UserError, match="c.tar: not an uncompressed tar"):
        open_source(str(gz))


def test_corrupt_image_in_a_shard_names_the_member(tmp_path):
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for name, payload in (("k1.jpg", b"\xff\xd8\xff broken jpeg"), ("k1.txt", b"broken")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    src = open_source(str(bad))
    assert src.caption(0) == "broken"
    with pytest.raises(UserError, match=r"bad\.tar:k1\.jpg: not a readable image"):
        src.images([0], 8)


def test_shapes_source_and_seeded_sampling(dataset):
    shapes = open_source("shapes", seed=9)
    assert len(shapes) == 2**31
    assert shapes.caption(5) == scene_for_index(9, 5).caption
    assert torch.equal(shapes.images([5, 6], 32), render([scene_for_index(9, 5), scene_for_index(9, 6)], 32))
    for src in (shapes, open_source(str(dataset[0]))):
        x1, c1, i1 = src.sample(6, 16, torch.Generator().manual_seed(1))
        x2, c2, i2 = src.sample(6, 16, torch.Generator().manual_seed(1))
        assert torch.equal(x1, x2) and c1 == c2 and i1 == i2
        assert x1.shape == (6, 3, 16, 16) and c1 == [src.caption(i) for i in i1]
        assert all(0 <= i < len(src) for i in i1) and isinstance(src, ImageTextSource)
    assert shapes.sample(6, 8, torch.Generator().manual_seed(2))[2] != shapes.sample(6, 8, torch.Generator().manual_seed(1))[2]


# ---------------------------------------------------------------------- CLI and cache


def test_data_shapes_writes_a_folder_open_source_reads(cli, tmp_path):
    out = tmp_path / "shapes"
    ok(cli("data", "shapes", "--count", "4", "--size", "32", "-o", out, "--seed", "3", "-q"))
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}.{e}" for i in range(4) for e in ("png", "txt")]
    src = open_source(str(out))
    truth = [scene_for_index(3, i) for i in range(4)]
    assert [src.caption(i) for i in range(4)] == [s.caption for s in truth]
    assert Image.open(out / "000000.png").size == (32, 32)
    assert np.array_equal(rgb(src.images(range(4), 32)), rgb(render(truth, 32)))
    user_error(cli("data", "shapes", "--count", "2", "--size", "32", "-o", out), "not an empty folder")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_data_embed_caches_clip_embeddings(cli, tiny_set, tmp_path):
    from unclip_cli.modelset import ModelSet

    folder, cache_path = tmp_path / "d", tmp_path / "cache.safetensors"
    ok(cli("data", "shapes", "--count", "5", "--size", "48", "-o", folder, "-q"))
    ok(cli("data", "embed", "--data", folder, "--model", tiny_set, "-o", cache_path, "--batch-size", "2", "-q"))
    ms = ModelSet.open(str(tiny_set))
    clip = ms.load("clip")
    cache = EmbeddingCache.load(cache_path)
    assert len(cache) == 5 and cache.clip == ms.clip_identity and cache.source == str(folder)
    assert cache.indices.tolist() == list(range(5))
    captions = [(folder / f"{i:06d}.txt").read_text().strip() for i in range(5)]
    assert cache.captions == captions
    rows = cache.get(torch.tensor([4, 0, 2]))
    images = [Image.open(folder / f"{i:06d}.png") for i in (4, 0, 2)]
    torch.testing.assert_close(rows["image_embed"], clip.encode_image(images), rtol=1e-5, atol=1e-5)
    embed, hidden, mask = clip.encode_text([captions[i] for i in (4, 0, 2)])
    torch.testing.assert_close(rows["text_embed"], embed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows["text_hidden"], hidden, rtol=2e-3, atol=2e-3)  # stored as fp16
    assert rows["text_hidden"].dtype == torch.float32 and torch.equal(rows["text_mask"], mask)
    assert rows["index"].tolist() == [4, 0, 2]

    # A plain safetensors file: the library reads the same tensors.
    from safetensors.torch import load_file

    plain = load_file(cache_path)
    assert plain["text_hidden"].dtype == torch.float16 and plain["text_mask"].dtype == torch.bool
    assert torch.equal(plain["image_embed"][[4, 0, 2]], rows["image_embed"])

    user_error(cli("data", "embed", "--data", "shapes", "--model", tiny_set, "-o", cache_path), "--count")
    cache_path.write_bytes(cache_path.read_bytes()[:-10])
    with pytest.raises(UserError, match="damaged|truncated"):
        EmbeddingCache.load(cache_path)


def test_shapes_cache_renders_at_the_clip_size(tiny_set, tmp_path):
    from unclip_cli.modelset import ModelSet

    clip = ModelSet.open(str(tiny_set)).load("clip")
    src = open_source("shapes", seed=1)
    with pytest.raises(ValueError):
        build_embedding_cache(src, clip, tmp_path / "c.safetensors")
    calls = []
    build_embedding_cache(src, clip, tmp_path / "c.safetensors", indices=[7, 3, 11], batch_size=2,
                          callback=lambda i, n: calls.append((i, n)), clip_identity="x@1")
    cache = EmbeddingCache.load(tmp_path / "c.safetensors")
    assert calls == [(1, 3), (2, 3)] and cache.clip == "x@1" and cache.indices.tolist() == [7, 3, 11]
    images = tensor_to_images(render([scene_for_index(1, i) for i in (7, 3, 11)], clip.image_size))
    torch.testing.assert_close(cache.get(torch.arange(3))["image_embed"], clip.encode_image(images), rtol=1e-5, atol=1e-5)
