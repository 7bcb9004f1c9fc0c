"""The recommended first strategy end to end: feature extraction for 10 epochs.

Same data, split, preprocessing, backbone (torchvision's ImageNet MobileNetV2,
the embedded file), optimizer (SGD momentum 0.9, lr 0.01, constant), batch 32
and epochs on both sides; wall time of the whole job and the final validation
accuracy:

* jaxtl: ``python -m jaxtl.train --strategy feature_extract --cache-features``
  (the backbone runs once; the head trains on cached features);
* PyTorch, as the transfer-learning guides write it: ``requires_grad=False`` on
  the backbone, new head, ``model.train()``, every epoch forwards every image
  through the backbone (whose BatchNorm statistics drift in train mode);
* PyTorch done right: backbone in eval mode under ``no_grad`` (still a full
  backbone forward every epoch).

Images are preprocessed identically on both sides (resize 256, centre crop
224, ImageNet mean/std, no augmentation: the cached-features setting).
Datasets: scikit-learn's digits, and the same digits written as real-size
JPEG files in an ImageFolder (to include decoding).

    python benchmarks/bench_end_to_end.py            # ~25 min on 2 cores
    python benchmarks/bench_end_to_end.py --quick    # 1 epoch, digits only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import log, machine, markdown_table, write_json

ROOT = Path(__file__).resolve().parents[1]


def make_jpeg_folder(root: Path, size=(500, 375)) -> Path:
    """The digits set as an ImageFolder of real-size JPEGs (grey digit on a textured background)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    for i, (img, label) in enumerate(zip(d.images, d.target)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        digit = Image.fromarray(np.round(img * 255 / 16).astype(np.uint8)).resize((300, 300), Image.BILINEAR)
        noise = rng.integers(0, 40, (size[1], size[0]), dtype=np.uint8)
        canvas = Image.fromarray(noise).convert("L")
        canvas.paste(digit, ((size[0] - 300) // 2 + int(rng.integers(-50, 50)), (size[1] - 300) // 2))
        canvas.convert("RGB").save(folder / f"{i:04d}.jpg", quality=90)
    return root


def run_jaxtl(data: str, epochs: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "jaxtl.train", "--backbone", "mobilenet_v2", "--data", data, "--strategy",
           "feature_extract", "--cache-features", "--epochs", str(epochs), "--opt", "sgd", "--lr", "0.01",
           "--momentum", "0.9", "--sched", "constant", "--batch-size", "32", "--output", str(out), "--no-progress"]
    t0 = time.perf_counter()
    # A cold run: no compiled steps from an earlier run (jaxtl's compilation cache is off for this).
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "JAXTL_NO_COMPILE_CACHE": "1"})
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"wall_s": wall, "val_top1": last["val_top1"]}


TORCH_LOOP = r'''
import json, sys, time
t_start = time.perf_counter()
import numpy as np, torch, torchvision
from torchvision import transforms as T
sys.path.insert(0, sys.argv[4])
from jaxtl.data.sources import load_dataset
from jaxtl.hub import embedded_weight_dirs

data, epochs, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
ds = load_dataset(data, seed=0)   # the same split as jaxtl
tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

class Wrap(torch.utils.data.Dataset):
    def __init__(self, src): self.src = src
    def __len__(self): return len(self.src)
    def __getitem__(self, i): return tf(self.src.image(i)), int(self.src.labels[i])

train = torch.utils.data.DataLoader(Wrap(ds.train), batch_size=32, shuffle=True, drop_last=True, num_workers=2)
val = torch.utils.data.DataLoader(Wrap(ds.val), batch_size=32, num_workers=2)
model = torchvision.models.mobilenet_v2()
path = [d / "mobilenet_v2-b0353104.pth" for d in embedded_weight_dirs()][0]
model.load_state_dict(torch.load(path, weights_only=True))
for p in model.parameters():
    p.requires_grad_(False)
model.classifier[1] = torch.nn.Linear(1280, ds.num_classes)
opt = torch.optim.SGD(model.classifier[1].parameters(), lr=0.01, momentum=0.9)
loss_fn = torch.nn.CrossEntropyLoss()
for epoch in range(epochs):
    if mode == "guide":
        model.train()
    else:  # backbone in eval mode, head in train mode
        model.eval(); model.classifier.train()
    for x, y in train:
        opt.zero_grad()
        if mode == "guide":
            out = model(x)
        else:
            with torch.no_grad():
                feats = model.features(x)
                feats = torch.nn.functional.adaptive_avg_pool2d(feats, 1).flatten(1)
            out = model.classifier(feats)
        loss_fn(out, y).backward()
        opt.step()
    model.eval()
    correct = n = 0
    with torch.no_grad():
        for x, y in val:
            correct += (model(x).argmax(1) == y).sum().item(); n += len(y)
print(json.dumps({"wall_in_process_s": time.perf_counter() - t_start, "val_top1": correct / n}))
'''


def run_torch(data: str, epochs: int, mode: str) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", TORCH_LOOP, data, str(epochs), mode, str(ROOT)], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "JAXTL_NO_XLA_FLAGS": "1", "JAXTL_NO_MALLOC_TUNING": "1"})
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "val_top1": out["val_top1"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--datasets", default="digits,jpegs")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.datasets = 1, "digits"
    results, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.datasets.split(","):
            data = "digits" if name == "digits" else str(make_jpeg_folder(tmp / "jpegs"))
            # alternate jaxtl and PyTorch
            jx = run_jaxtl(data, args.epochs, tmp / f"run-{name}")
            log(f"{name}: jaxtl {jx}")
            tg = run_torch(data, args.epochs, "guide")
            log(f"{name}: torch guide {tg}")
            tb = run_torch(data, args.epochs, "eval_backbone")
            log(f"{name}: torch eval-backbone {tb}")
            rec = {"dataset": name, "epochs": args.epochs, "jaxtl": jx, "torch_guide": tg, "torch_eval_backbone": tb,
                   "wall_ratio_vs_guide": jx["wall_s"] / tg["wall_s"],
                   "wall_ratio_vs_eval_backbone": jx["wall_s"] / tb["wall_s"]}
            results.append(rec)
            rows.append([name, args.epochs, jx["wall_s"], jx["val_top1"], tg["wall_s"], tg["val_top1"], tb["wall_s"],
                         tb["val_top1"], rec["wall_ratio_vs_guide"], rec["wall_ratio_vs_eval_backbone"]])
    table = markdown_table(["data", "epochs", "jaxtl s", "jaxtl top-1", "PyTorch guide s", "guide top-1",
                            "PyTorch eval-backbone s", "eval-backbone top-1", "time jaxtl/guide",
                            "time jaxtl/eval-backbone"], rows)
    info = machine()
    name = "end_to_end_quick.json" if args.quick else "end_to_end.json"
    path = write_json(name, {"machine": info, "results": results, "table": table})
    print(f"Machine: {info.get('cpu', '?')}, {info.get('cpus')} cores\n\n{table}\n\nJSON: {path}")


if __name__ == "__main__":
    main()
