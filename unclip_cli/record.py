"""What a result records: the fields every stage file and PNG carries, and the command line that remakes it.

A record is a flat dict of field -> JSON value, the same names in stage files (safetensors
metadata, values JSON-encoded where not strings) and in PNGs (one `tEXt` chunk named `unclip`
holding the record as a JSON object, readable by any PNG tool). Fields:

  unclip_version, model, model_identity, model_dir, clip, clip_dim   what made it
  stages        the commands that made it, in order, e.g. ["encode-text", "prior", "decode"]
  prompts       the prompts (a batch: all of them), index (this image's place in its batch)
  seed          `generate`'s one seed; the stage commands record prior_seed, decoder_seed, upsampler_seed
  size, prior_kind, prior_steps, prior_guidance, prior_candidates (and the AR prior's
  prior_temperature, prior_top_p, prior_similarity_percentile), decoder_steps, decoder_guidance,
  decoder_eta, upsampler_256_steps, upsampler_1024_steps
  precision     the networks' weights (fp32, bf16, fp16) of the last stage that ran

`command_line(record, output)` turns a record back into one shell line that makes the same pixels
from scratch: the `unclip generate ...` line with its seed, or the pipe of stage commands.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

# stages whose input is a file the record does not hold: their results cannot be remade from scratch
FROM_FILES = {"encode-image", "invert", "vary", "interpolate", "text-diff", "mix", "slerp"}


def to_meta(record: dict) -> dict[str, str]:
    """A record as safetensors metadata: strings as they are, other values as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in record.items() if v is not None}


def from_meta(meta: dict[str, str]) -> dict:
    """Stage-file metadata -> a record (JSON values decoded where they parse; the file-format fields dropped)."""
    out = {}
    for k, v in meta.items():
        if k in ("format", "version", "kind"):
            continue
        try:
            out[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[k] = v
    return out


def png_text(record: dict) -> str:
    return json.dumps({k: v for k, v in record.items() if v is not None}, sort_keys=True)


def from_png_text(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class NotReproducible(ValueError):
    """The record does not hold what remaking the result needs."""


def _opt(flag: str, value) -> list[str]:
    return [] if value is None else [flag, str(value)]


def _model_args(record: dict) -> list[str]:
    return ["--model", record["model_dir"]] if record.get("model_dir") else []


def _sampling_args(record: dict) -> list[str]:
    """--model, and --precision for the commands that sample (auto would pick another on another device)."""
    return _model_args(record) + _opt("--precision", record.get("precision"))


def _batch_output(output: str, record: dict) -> str:
    """The -o a batch command needs so that this image lands at `output` (out-1.png -> out.png)."""
    index, prompts = record.get("index"), record.get("prompts") or []
    p = Path(output)
    if index is not None and len(prompts) > 1 and p.stem.endswith(f"-{index}"):
        return str(p.with_name(p.stem[: -len(f"-{index}")] + p.suffix))
    return output


def _prior_args(r: dict) -> list[str]:
    args = ["--kind", r["prior_kind"]] + _opt("--steps", r.get("prior_steps")) + _opt("--guidance", r.get("prior_guidance"))
    args += _opt("--seed", r.get("prior_seed"))
    if r.get("prior_candidates", 1) != 1:
        args += ["--candidates", str(r["prior_candidates"])]
    for key, flag in (("temperature", "--temperature"), ("top_p", "--top-p"), ("similarity_percentile", "--similarity-percentile")):
        args += _opt(flag, r.get(f"prior_{key}"))
    return args


def command_line(record: dict, output: str) -> str:
    """One shell command line that remakes the pixels `record` describes into `output`."""
    stages = record.get("stages") or []
    made_from = sorted(set(stages) & FROM_FILES)
    if not stages:
        raise NotReproducible("it carries no unclip record")
    if made_from:
        raise NotReproducible(f"it was made by `unclip {made_from[0]}` from an input file the record does not hold")
    if "array" in stages:
        raise NotReproducible("it was decoded from a bare .npy embedding, which the record does not hold")
    if "prompts" not in record:
        raise NotReproducible("its record has no prompts")
    model = _model_args(record)
    out = ["-o", _batch_output(output, record)]
    if stages == ["generate"]:
        r = record
        args = ["unclip", "generate", *r["prompts"], "--size", str(r["size"]), "--seed", str(r["seed"]), *_sampling_args(r)]
        args += ["--prior-kind", r["prior_kind"]] + _opt("--prior-steps", r.get("prior_steps"))
        args += _opt("--prior-guidance", r.get("prior_guidance"))
        args += _opt("--decoder-steps", r.get("decoder_steps")) + _opt("--decoder-guidance", r.get("decoder_guidance"))
        ups = {r.get(f"upsampler_{s}_steps") for s in (256, 1024) if r.get(f"upsampler_{s}_steps") is not None}
        if len(ups) == 1:
            args += ["--upsampler-steps", str(ups.pop())]
        elif len(ups) > 1:
            args += ["--upsampler-256-steps", str(r["upsampler_256_steps"]), "--upsampler-1024-steps", str(r["upsampler_1024_steps"])]
        return shlex.join(args + out)
    if stages[:2] != ["encode-text", "prior"] or any(s not in ("decode", "upsample") for s in stages[2:]):
        raise NotReproducible(f"its stages {' | '.join(stages)} are not a text-to-image run")
    sampling = _sampling_args(record)
    parts = [["unclip", "encode-text", *record["prompts"], *model], ["unclip", "prior", *_prior_args(record), *sampling]]
    for i, stage in enumerate(stages[2:]):
        if stage == "decode":
            r = record
            parts.append(["unclip", "decode", *_opt("--steps", r.get("decoder_steps")), *_opt("--guidance", r.get("decoder_guidance")),
                          *_opt("--eta", r.get("decoder_eta")), *_opt("--seed", r.get("decoder_seed")), *sampling])
        else:
            size = 256 if i == 1 else 1024
            parts.append(["unclip", "upsample", *_opt("--steps", record.get(f"upsampler_{size}_steps")),
                          *_opt("--seed", record.get(f"upsampler_{size}_seed")), *sampling])
    if len(parts) == 2:
        raise NotReproducible("it is an embedding, not an image")
    parts[-1] += out
    return " | ".join(shlex.join(p) for p in parts)
