"""Where a run starts from: the backbone's starting variables, their preprocessing, and the file its
frozen layers come from (every checkpoint records it, since checkpoints hold only what trains)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from jaxtl.data.preprocessing import Preprocessing
from jaxtl.errors import CheckpointError, ConfigError
from jaxtl.export import load_model, read_variables_file
from jaxtl.models import abstract_variables, built_for_one_size, create_model, has_option, init_variables
from jaxtl.pretrained import load_pretrained, replace_head
from jaxtl.registry import BackboneSpec, resolve
from jaxtl.training.config import CONFIG_FILE, TrainConfig
from jaxtl.weights import sha256_file

# A random-init run's starting variables, written once: its frozen groups are constants read from here.
INITIAL_FILE = "initial_variables.msgpack"
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclass
class Start:
    variables: dict                 # the whole model's starting variables (host arrays)
    preprocessing: Preprocessing    # at the run's input size
    model_kwargs: dict              # what the model is built with besides the registry's (img_size, ...)
    origin: dict                    # where the weights came from, for the exported model's meta
    frozen_ref: dict                # {"file", "sha256"} of the frozen layers' source (sha256 None until known)


def starting_point(cfg: TrainConfig, spec: BackboneSpec, source: str, num_classes: int, out: Path, *,
                   resume_needs_frozen: Callable[[], bool], log: Callable[[str], None]) -> Start:
    """Where the run starts from: pretrained weights (a new head sized by the data), a jaxtl model
    folder, random init, or, for a resume whose weights file is gone, nothing to read at all (when the
    checkpoint holds every layer that still trains)."""
    model_kwargs = {"img_size": cfg.img_size} if cfg.img_size and built_for_one_size(spec) else {}
    if cfg.drop_path is not None:
        if not has_option(spec, "drop_path_rate"):
            raise ConfigError(f"--drop-path: {spec.name} has no stochastic depth; the families with it are "
                              "EfficientNet, ConvNeXt and the ViTs (DINOv2, DINOv3, CLIP, SigLIP)")
        model_kwargs["drop_path_rate"] = cfg.drop_path
    if cfg.grad_checkpointing:
        if not has_option(spec, "grad_checkpointing"):
            raise ConfigError(f"--grad-checkpointing: {spec.name} does not offer it; the families that do are "
                              "ResNet and the ViTs (DINOv2, CLIP, SigLIP)")
        model_kwargs["grad_checkpointing"] = True
    if cfg.probe_blocks is not None:
        if not has_option(spec, "probe_blocks"):
            raise ConfigError(f"--probe-blocks is for backbones whose features read several blocks (DINOv2, "
                              f"DINOv3); {spec.name} has none")
        model_kwargs["probe_blocks"] = cfg.probe_blocks
    origin: dict[str, Any] = {}
    if cfg.weights == "none":
        written = out / INITIAL_FILE
        if cfg.resume and written.is_file():
            variables = read_variables_file(written)
        else:
            model = create_model(spec.name, num_classes, source=source, **model_kwargs)
            variables = jax.device_get(init_variables(model, spec, cfg.seed))
        pre = spec.preprocessing_for(source)
        origin = {"weights": "random init"}
        frozen_ref = {"file": str(written.absolute()), "sha256": None}  # known once written
    elif cfg.weights_file and Path(cfg.weights_file).is_dir():
        model_dir = Path(cfg.weights_file)
        _, variables, meta = load_model(model_dir)
        if meta["backbone"] != spec.name:
            raise ConfigError(f"--weights-file {cfg.weights_file} holds a {meta['backbone']}, not {spec.name}")
        if int(meta["num_classes"]) != num_classes:
            variables = replace_head(variables, spec.head_path, num_classes, cfg.seed)
        pre = Preprocessing.from_dict(meta["preprocessing"])
        if meta.get("model_kwargs", {}).get("probe_blocks", 1) != model_kwargs.get("probe_blocks", 1) \
                and "probe_blocks" in model_kwargs:
            raise ConfigError(f"--weights-file {cfg.weights_file} was trained with probe_blocks="
                              f"{meta['model_kwargs'].get('probe_blocks', 1)}; its head reads those features: "
                              "drop --probe-blocks or give the same")
        model_kwargs = {**meta.get("model_kwargs", {}), **model_kwargs}
        origin = {"weights": str(cfg.weights_file)}
        frozen_ref = {"file": str((model_dir / "model.msgpack").absolute()),
                      "sha256": sha256_file(model_dir / "model.msgpack")}
    elif (cfg.resume and cfg.weights_file and Path(cfg.weights_file).suffix in WEIGHT_FILE_SUFFIXES
          and not Path(cfg.weights_file).exists() and not resume_needs_frozen()):
        # Every layer the rest of the run uses is in the checkpoint: the starting values are not read.
        model = create_model(spec.name, num_classes, source=source, **model_kwargs)
        variables = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract_variables(model, spec))
        pre = spec.preprocessing_for(source)
        origin = {"weights": str(cfg.weights_file)}
        frozen_ref = {"file": str(cfg.weights_file), "sha256": None}
        log(f"{cfg.weights_file} is gone; not needed: the checkpoint holds every layer that trains from "
            "here on")
    else:
        _, variables, info = load_pretrained(spec.name, source, tag=cfg.weights_tag,
                                             weights_file=cfg.weights_file, allow_download=cfg.allow_download,
                                             num_classes=num_classes, seed=cfg.seed, **model_kwargs)
        # Transfer learning: the head is always new, sized by the data.
        variables = replace_head(variables, spec.head_path, num_classes, cfg.seed)
        pre = info.preprocessing
        origin = info.to_meta()["weights"]
        frozen_ref = {"file": str(Path(info.file).absolute()), "sha256": info.sha256}
        log(f"weights: {spec.name} {info.source} {info.tag or ''} ({Path(info.file).name}, "
            f"sha256 {info.sha256[:8]}); new {num_classes}-class head")
    return Start(variables, pre.at_size(cfg.img_size) if cfg.img_size else pre, model_kwargs, origin, frozen_ref)


def pretrained_of_run(run_dir: Path, meta: dict) -> dict:
    """The variables the run in ``run_dir`` started from (read again from its weights, as a resume
    would), for WiSE-FT against the model it exported."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no {CONFIG_FILE}: WiSE-FT needs a training run's folder, which says "
                              "which pretrained weights the run started from")
    cfg = TrainConfig.from_dict(json.loads(path.read_text()))
    if cfg.weights == "none":
        raise ConfigError(f"the run in {run_dir} started from random weights; WiSE-FT interpolates towards "
                          "pretrained ones")
    spec, _ = resolve(meta["backbone"])
    start = starting_point(dataclasses.replace(cfg, resume=False), spec, meta.get("source") or cfg.source,
                           int(meta["num_classes"]), Path(run_dir), resume_needs_frozen=lambda: True,
                           log=lambda line: None)
    return start.variables
