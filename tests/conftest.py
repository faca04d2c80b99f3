"""Shared fixtures: a tiny random model set, and an in-process CLI runner with bytes stdin/stdout."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from unclip_cli.cli import app
from unclip_cli.modelset import init_model_set


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sets") / "tiny"
    init_model_set(path, "tiny", seed=0)
    return path


@pytest.fixture(scope="session")
def other_set(tmp_path_factory) -> Path:
    """Another tiny set with a differently initialized CLIP (a different CLIP identity)."""
    path = tmp_path_factory.mktemp("sets") / "other"
    init_model_set(path, "tiny", seed=1)
    return path


class Run:
    def __init__(self, result):
        self.code = result.exit_code
        self.out = result.stdout_bytes
        self.err = result.stderr
        self.exception = result.exception

    def __repr__(self) -> str:
        return f"Run(code={self.code}, err={self.err!r}, exception={self.exception!r})"


@pytest.fixture
def cli():
    """cli(*args, stdin=b"") -> Run with .code, .out (bytes), .err (str)."""

    def run(*args: str, stdin: bytes = b"", env: dict | None = None) -> Run:
        result = CliRunner().invoke(app, [str(a) for a in args], input=stdin, env=env)
        return Run(result)

    return run


def png_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def write_png(path: Path, size: tuple[int, int], color=(200, 30, 30)) -> Path:
    img = Image.new("RGB", size, color)
    for x in range(size[0] // 4, size[0] // 2):
        for y in range(size[1] // 4, size[1] // 2):
            img.putpixel((x, y), (20, 60, 220))
    img.save(path)
    return path
