"""``python -m jaxtl.evaluate``: loss, top-1, top-5 and per-class accuracy of a trained model.

    python -m jaxtl.evaluate --checkpoint runs/default --data digits
    python -m jaxtl.evaluate --checkpoint runs/flowers --data path/to/images --split all

The data is split exactly as in training (same ``--val-fraction`` and seed,
read from the run's config.json when the checkpoint folder has one), so
``--split val`` (the default) evaluates the images training never saw.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxtl.cli import run_cli
from jaxtl.errors import DataError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxtl.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a training run's --output folder (or a converted model)")
    p.add_argument("--data", required=True, help="an ImageFolder path, 'digits' or tfds:NAME")
    p.add_argument("--data-dir", default=None, help="tensorflow-datasets data folder")
    p.add_argument("--split", choices=["val", "train", "all"], default="val", help="which part to evaluate")
    p.add_argument("--val-fraction", type=float, default=None, help="default: the run's (else 0.2)")
    p.add_argument("--seed", type=int, default=None, help="split seed (default: the run's, else 0)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    return p


def evaluate(args: argparse.Namespace) -> int:
    import jax

    from jaxtl.data.augment import eval_prepare
    from jaxtl.data.loader import Loader
    from jaxtl.data.sources import load_dataset
    from jaxtl.export import load_model
    from jaxtl.data.preprocessing import Preprocessing
    from jaxtl.training.evaluation import accumulate, metrics
    from jaxtl.training.report import confusion_matrix, per_class_accuracy
    from jaxtl.training.step import make_eval_step

    model, variables, meta = load_model(args.checkpoint)
    run_config = Path(args.checkpoint) / "config.json"
    saved = json.loads(run_config.read_text()) if run_config.is_file() else {}
    val_fraction = args.val_fraction if args.val_fraction is not None else saved.get("val_fraction", 0.2)
    seed = args.seed if args.seed is not None else saved.get("seed", 0)
    data = load_dataset(args.data, data_dir=args.data_dir, val_fraction=val_fraction, seed=seed)
    names = meta.get("class_names")
    if names is not None and list(names) != list(data.class_names):
        raise DataError(f"the model was trained on classes {names[:5]}..., the data has {data.class_names[:5]}...; "
                        "evaluate on data with the same class folders")
    if data.num_classes != int(meta["num_classes"]):
        raise DataError(f"the model has {meta['num_classes']} classes, the data {data.num_classes}")
    if args.split == "val":
        source = data.val
    elif args.split == "train":
        source = data.train
    else:
        source = _concat(data.train, data.val)
    pre = Preprocessing.from_dict(meta["preprocessing"])
    loader = Loader(source, pre, batch_size=args.batch_size, train=False, workers=args.workers)
    step = jax.jit(make_eval_step(lambda v, x: model.apply(v, eval_prepare(x, pre), train=False),
                                  num_classes=data.num_classes))
    sums, pred = accumulate(step(variables, batch) for batch in loader.epoch(0))
    pred = pred[:len(source)]
    keep = np.ones(len(source), bool)
    for i in range(len(source)):
        if source.describe(i) in loader.bad:
            keep[i] = False
    cm = confusion_matrix(source.labels[keep], pred[keep], data.num_classes)
    per_class = per_class_accuracy(cm)
    m = metrics(sums)
    result = {"checkpoint": str(args.checkpoint), "data": args.data, "split": args.split, "images": m["count"],
              "loss": m["loss"], "top1": m["top1"], "top5": m["top5"],
              "per_class_top1": {name: (None if np.isnan(a) else float(a)) for name, a in zip(data.class_names,
                                                                                              per_class)},
              "skipped": sorted(loader.bad)}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.split} split of {args.data}: {result['images']} images")
    print(f"  loss {result['loss']:.4f}   top-1 {result['top1']:.4f}   top-5 {result['top5']:.4f}")
    print("  per-class top-1:")
    width = max(len(str(c)) for c in data.class_names)
    for name, acc, total in zip(data.class_names, per_class, cm.sum(axis=1)):
        shown = "   n/a" if np.isnan(acc) else f"{acc:.4f}"
        print(f"    {str(name):<{width}}  {shown}  ({total} images)")
    if loader.bad:
        print(f"  skipped {len(loader.bad)} unreadable file(s): {', '.join(sorted(loader.bad)[:3])}")
    return 0


def _concat(a, b):
    from jaxtl.data.sources import Source

    class Both(Source):
        def __init__(self):
            self.class_names = a.class_names
            self.labels = np.concatenate([a.labels, b.labels])

        def image(self, i):
            return a.image(i) if i < len(a) else b.image(i - len(a))

        def describe(self, i):
            return a.describe(i) if i < len(a) else b.describe(i - len(a))

    return Both()


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(evaluate, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
