"""unclip: unCLIP (DALL-E 2) as Unix-style command-line stages, and the Python API behind them.

    from unclip_cli import Pipeline, load_stage, save_stage
    pipe = Pipeline.load()                                  # the shipped set (or $UNCLIP_MODEL, or a folder)
    images = pipe.generate(["a large red star on a blue background"], size=64, seed=3)

`Pipeline` (pipeline.py) runs every stage; `ModelSet` (modelset/) is a model-set folder;
`load_stage` / `save_stage` read and write the stage files the commands pass between them (io.py),
and `StageFile` is what they hold. The names load on first use, so `unclip`'s start-up stays lean.
"""

__version__ = "0.1.0"

__all__ = ["Pipeline", "ModelSet", "StageFile", "load_stage", "save_stage", "__version__"]

_EXPORTS = {
    "Pipeline": ("unclip_cli.pipeline", "Pipeline"),
    "ModelSet": ("unclip_cli.modelset", "ModelSet"),
    "StageFile": ("unclip_cli.io", "StageFile"),
    "load_stage": ("unclip_cli.io", "load_stage"),
    "save_stage": ("unclip_cli.io", "save_stage"),
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'unclip_cli' has no attribute {name!r}")
