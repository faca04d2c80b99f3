"""Model sets: a folder with a manifest (model.json), a CLIP and the networks of the unCLIP stages.

  manifest.py     model.json: read, checked and written in one place; the CLIP's identity
  components.py   one component folder: config.json + model.safetensors; building a network from its config
  folder.py       finding a set (--model, $UNCLIP_MODEL, the shipped default) and `ModelSet`, its facts and loading
  create.py       a new set from a preset (models/presets.py), a component added to a set
  export.py       a set's weights, configs and manifest copied out (`unclip model export`)
"""

from unclip_cli.models.presets import PRESETS
from unclip_cli.modelset.components import CONFIG_TYPES, build_component, save_component, seeded_component
from unclip_cli.modelset.create import ClipWriter, add_component, init_model_set
from unclip_cli.modelset.export import SHIPPED_FILE_LIMIT, export_model_set
from unclip_cli.modelset.folder import (
    ENV_VAR,
    ModelSet,
    default_model_dir,
    name_default,
    resolve_model_dir,
    shipped_weights_dirs,
)
from unclip_cli.modelset.manifest import (
    COMPONENTS,
    DEFAULT_SAMPLING,
    MANIFEST,
    MANIFEST_FORMAT,
    clip_identity,
    clip_name,
    is_model_set,
    read_manifest,
    refresh_clip_identity,
    save_manifest,
    write_manifest,
)

__all__ = [
    "CONFIG_TYPES", "COMPONENTS", "DEFAULT_SAMPLING", "ENV_VAR", "MANIFEST", "MANIFEST_FORMAT", "PRESETS",
    "SHIPPED_FILE_LIMIT", "ClipWriter", "ModelSet", "add_component", "build_component", "clip_identity", "clip_name",
    "default_model_dir", "export_model_set", "init_model_set", "is_model_set", "name_default", "read_manifest",
    "refresh_clip_identity", "resolve_model_dir", "save_component", "save_manifest", "seeded_component",
    "shipped_weights_dirs", "write_manifest",
]
