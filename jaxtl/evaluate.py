"""``python -m jaxtl.evaluate``: loss, top-1, top-5, balanced accuracy, calibration error (ECE, 15 bins)
and per-class recall of a trained model.

    python -m jaxtl.evaluate --checkpoint runs/default --data digits
    python -m jaxtl.evaluate --checkpoint runs/flowers --data path/to/images --split all
    python -m jaxtl.evaluate --checkpoint runs/ft --data digits --target-data digits-shifted --wise-ft-sweep

The data is split exactly as in training (same ``--val-fraction`` and seed,
read from the run's config.json when the checkpoint folder has one), so
``--split val`` (the default) evaluates the images training never saw.

``--wise-ft-sweep [A,B,...]`` evaluates WiSE-FT (:mod:`jaxtl.wise_ft`): the run's backbone
interpolated with the pretrained one it started from, for each mixing coefficient (default 0, 0.1,
..., 1), on ``--data`` and on ``--target-data``'s validation split.
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
    p.add_argument("--target-data", help="--wise-ft-sweep: also evaluate on this domain's validation split")
    p.add_argument("--wise-ft-sweep", nargs="?", const="", default=None, metavar="A,B,...",
                   help="evaluate WiSE-FT mixtures of the pretrained and the fine-tuned backbone (the head stays "
                        "fine-tuned); default coefficients 0,0.1,...,1")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    return p


def make_evaluator(model, pre, num_classes: int, batch_size: int, workers: int):
    """``(variables, source) -> (metric sums, predictions, unreadable files)`` for ``model`` in eval mode."""
    import jax

    from jaxtl.data.augment import eval_prepare
    from jaxtl.data.loader import Loader
    from jaxtl.training.evaluation import accumulate
    from jaxtl.training.step import make_eval_step

    step = jax.jit(make_eval_step(lambda v, x: model.apply(v, eval_prepare(x, pre), train=False),
                                  num_classes=num_classes))

    def run(variables, source, with_confidence: bool = False):
        loader = Loader(source, pre, batch_size=batch_size, train=False, workers=workers)
        outputs = [step(variables, batch) for batch in loader.epoch(0)]
        sums, pred = accumulate(outputs)
        if with_confidence:
            confidence = np.concatenate([np.asarray(o["confidence"]) for o in outputs])[:len(source)]
            return sums, pred[:len(source)], loader.bad, confidence
        return sums, pred[:len(source)], loader.bad

    return run


def evaluate(args: argparse.Namespace) -> int:
    from jaxtl.data.sources import load_dataset
    from jaxtl.export import load_model
    from jaxtl.data.preprocessing import Preprocessing
    from jaxtl.training.evaluation import balanced_accuracy, expected_calibration_error, metrics
    from jaxtl.training.report import confusion_matrix, per_class_accuracy

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
    pre = Preprocessing.from_dict(meta["preprocessing"])
    run = make_evaluator(model, pre, data.num_classes, args.batch_size, args.workers)
    if args.wise_ft_sweep is not None:
        return wise_ft_sweep(args, variables, meta, data, run, val_fraction, seed)
    if args.target_data:
        raise DataError("--target-data goes with --wise-ft-sweep; to evaluate on another domain, pass it as --data")
    if args.split == "val":
        source = data.val
    elif args.split == "train":
        source = data.train
    else:
        source = _concat(data.train, data.val)
    sums, pred, bad, confidence = run(variables, source, with_confidence=True)
    keep = np.ones(len(source), bool)
    for i in range(len(source)):
        if source.describe(i) in bad:
            keep[i] = False
    cm = confusion_matrix(source.labels[keep], pred[keep], data.num_classes)
    per_class = per_class_accuracy(cm)
    m = metrics(sums)
    ece = expected_calibration_error(confidence[keep], pred[keep] == source.labels[keep])
    result = {"checkpoint": str(args.checkpoint), "data": args.data, "split": args.split, "images": m["count"],
              "loss": m["loss"], "top1": m["top1"], "top5": m["top5"],
              "balanced_accuracy": balanced_accuracy(per_class), "ece": ece,
              "per_class_top1": {name: (None if np.isnan(a) else float(a)) for name, a in zip(data.class_names,
                                                                                              per_class)},
              "skipped": sorted(bad)}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.split} split of {args.data}: {result['images']} images")
    print(f"  loss {result['loss']:.4f}   top-1 {result['top1']:.4f}   top-5 {result['top5']:.4f}")
    print(f"  balanced accuracy {result['balanced_accuracy']:.4f}   expected calibration error (15 bins) "
          f"{result['ece']:.4f}")
    print("  per-class recall (top-1):")
    width = max(len(str(c)) for c in data.class_names)
    for name, acc, total in zip(data.class_names, per_class, cm.sum(axis=1)):
        shown = "   n/a" if np.isnan(acc) else f"{acc:.4f}"
        print(f"    {str(name):<{width}}  {shown}  ({total} images)")
    if bad:
        print(f"  skipped {len(bad)} unreadable file(s): {', '.join(sorted(bad)[:3])}")
    return 0


def wise_ft_sweep(args: argparse.Namespace, finetuned: dict, meta: dict, data, run, val_fraction: float,
                  seed: int) -> int:
    """Validation (and target-domain) accuracy of WiSE-FT at each mixing coefficient."""
    from jaxtl.data.sources import load_dataset
    from jaxtl.errors import ConfigError
    from jaxtl.registry import get_spec
    from jaxtl.training.evaluation import metrics
    from jaxtl.training.start import pretrained_of_run
    from jaxtl.wise_ft import HEAD_KEPT, interpolate, parse_alphas

    alphas = parse_alphas(args.wise_ft_sweep or None)
    done = meta.get("wise_ft")
    if done and done.get("alpha") != 1:
        raise ConfigError(f"{args.checkpoint} exported a WiSE-FT mixture (alpha {done.get('alpha')}), not the "
                          "fine-tuned model the sweep starts from; train without --wise-ft to sweep")
    pretrained = pretrained_of_run(Path(args.checkpoint), meta)
    target = None
    if args.target_data:
        target = load_dataset(args.target_data, data_dir=args.data_dir, val_fraction=val_fraction,
                              seed=seed)
        if list(target.class_names) != list(data.class_names):
            raise DataError(f"--target-data {args.target_data} has other classes than --data {args.data}; "
                            "the target accuracy needs the same classes")
    head = get_spec(meta["backbone"]).head_path
    rows = []
    for alpha in alphas:
        variables = interpolate(pretrained, finetuned, alpha, keep=head)
        row = {"alpha": alpha, "val_top1": metrics(run(variables, data.val)[0])["top1"]}
        if target is not None:
            row["target_val_top1"] = metrics(run(variables, target.val)[0])["top1"]
        rows.append(row)
    result = {"checkpoint": str(args.checkpoint), "data": args.data, "target_data": args.target_data,
              "head": HEAD_KEPT, "wise_ft": rows}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"WiSE-FT sweep of {args.checkpoint} ({meta['backbone']}; head: {HEAD_KEPT}); validation top-1")
    print(f"  {'alpha':>5}  {args.data:>14}" + (f"  {args.target_data:>16}" if target is not None else ""))
    for row in rows:
        print(f"  {row['alpha']:>5.2f}  {row['val_top1']:>14.4f}"
              + (f"  {row['target_val_top1']:>16.4f}" if target is not None else ""))
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
