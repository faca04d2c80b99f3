"""Training of every component of a model set; never imported by the inference commands.

`train(component, model_dir, data, TrainOptions(...))` is what `unclip train` runs.
"""

from unclip_cli.train.loop import TRAINABLE, TrainOptions, train

__all__ = ["TRAINABLE", "TrainOptions", "train"]
