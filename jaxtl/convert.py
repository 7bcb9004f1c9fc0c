"""``python -m jaxtl.convert``: torchvision/timm weights -> a jaxtl model folder.

    python -m jaxtl.convert --backbone resnet50 --source torchvision --out converted/resnet50 --verify

Finds the published file (embedded package, torch hub / Hugging Face cache, or
a download), or reads ``--weights-file``; writes ``model.msgpack`` +
``meta.json`` (backbone, source, file name and sha256, classes,
preprocessing) that training (``--weights-file DIR``) and
``jaxtl.load_model`` read. ``--verify`` runs the PyTorch model and the Flax
model on one random batch and prints max |delta| (needs ``jaxtl[torch]``).
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import numpy as np

from jaxtl.cli import run_cli
from jaxtl.errors import ConfigError, HeadlessCheckpoint

VERIFY_TOLERANCE = 1e-4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxtl.convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", required=True, help="registered name, e.g. resnet50 (see jaxtl.list_models())")
    p.add_argument("--source", choices=["torchvision", "timm"], default=None,
                   help="whose weights and tensor names (default: the backbone's default source)")
    p.add_argument("--tag", default=None, help="which published weights, e.g. IMAGENET1K_V1 (default: the first known)")
    p.add_argument("--weights-file", default=None,
                   help="a local .pth/.pt/.safetensors state dict instead of the published file")
    p.add_argument("--out", required=True, help="output folder (model.msgpack + meta.json)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="replace the head with a fresh N-way classifier (default: keep the checkpoint's head)")
    p.add_argument("--img-size", type=int, default=None,
                   help="build the model for another input size (ViT position embeddings are resampled)")
    p.add_argument("--no-download", action="store_true", help="never download; only use local files and caches")
    p.add_argument("--verify", action="store_true",
                   help="compare with the PyTorch model on a random batch and print max |delta| (needs jaxtl[torch])")
    p.add_argument("--seed", type=int, default=0, help="seed of a new head and of the --verify batch")
    return p


def convert(args: argparse.Namespace) -> int:
    from jaxtl.export import save_model
    from jaxtl.pretrained import load_pretrained

    model_kwargs = {"img_size": args.img_size} if args.img_size else {}
    t0 = time.perf_counter()
    load = partial(load_pretrained, args.backbone, args.source, tag=args.tag, weights_file=args.weights_file,
                   seed=args.seed, allow_download=not args.no_download, use_cache=False, **model_kwargs)
    try:   # the checkpoint's own head first: --verify compares it
        model, variables, info = load()
    except HeadlessCheckpoint:
        if args.num_classes is None:
            raise
        model, variables, info = load(num_classes=args.num_classes)
    n_params = sum(int(np.prod(x.shape)) for x in _leaves(variables["params"]))
    origin = f"{info.tag} " if info.tag else ""
    print(f"read {info.source} {origin}{Path(info.file).name} (sha256 {info.sha256[:12]}...): "
          f"{n_params / 1e6:.2f} M parameters, {info.checkpoint_num_classes} classes "
          f"[{time.perf_counter() - t0:.1f} s]")
    if args.verify:
        verify(args, model, variables, info)
    if args.num_classes is not None and args.num_classes != info.num_classes:
        from jaxtl.models import create_model
        from jaxtl.pretrained import replace_head
        from jaxtl.registry import get_spec

        variables = replace_head(variables, get_spec(info.backbone).head_path, args.num_classes, args.seed)
        info.num_classes, info.class_names = args.num_classes, None
        model = create_model(info.backbone, args.num_classes, source=info.source, **model_kwargs)
        print(f"replaced the head: {args.num_classes} classes, freshly initialised (seed {args.seed})")
    path = save_model(args.out, variables, info.to_meta())
    print(f"wrote {path} and {path.with_name('meta.json')}")
    return 0


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def verify(args, model, variables, info) -> float:
    """Same random batch through PyTorch and Flax; prints and checks max |delta|."""
    import jax

    from jaxtl.torch_ref import load_torch_reference, torch_features, torch_forward
    from jaxtl.weights import read_state_dict

    size = info.preprocessing.input_size
    # A checkpoint without a classifier (DINOv2, CLIP, SigLIP) is compared on its features.
    headless = not info.checkpoint_num_classes
    tmodel = load_torch_reference(info.backbone, info.source, read_state_dict(info.file), img_size=args.img_size,
                                  num_classes=info.checkpoint_num_classes or None)
    x = np.random.default_rng(args.seed).standard_normal((2, size, size, 3)).astype(np.float32)
    ref = torch_features(info.backbone, info.source, tmodel, x) if headless else torch_forward(tmodel, x)
    with jax.default_matmul_precision("highest"):
        out = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False, features_only=headless))(variables, x))
    delta = float(np.abs(out - ref).max())
    scale = float(np.abs(ref).max())
    ok = delta <= VERIFY_TOLERANCE * scale
    what = "features" if headless else "logits"
    print(f"verify: max |delta| = {delta:.3g} (max |{what}| {scale:.3g}, relative {delta / scale:.2g}) on a random "
          f"batch of 2 at {size} px: {'OK' if ok else 'MISMATCH'}")
    if not ok:
        raise ConfigError(f"--verify failed: jaxtl and PyTorch differ by {delta:.3g} "
                          f"(> {VERIFY_TOLERANCE} x {scale:.3g}); please report this")
    return delta


def main(argv: list[str] | None = None) -> int:
    return run_cli(convert, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
