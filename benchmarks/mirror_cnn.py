"""Can a left-right mirrored film be caught from its pixels by a small CNN? Measured per set.

The linear probes of ``mirror_probe.py`` catch 86-100 % of mirrored held-out films but call
13-14 % of the real adult films mirrored. This script trains a small CNN (five conv blocks,
global average pooling, one logit) on every training film of the six ``runs/v3/data``
training folders and its horizontal mirror (label 1 = mirrored), with light augmentation that
never flips (shifts, contrast and gamma jitter). Two scorers are trained the same way:

* ``plain``: the logit ``s(x)`` of the film.
* ``antisym``: ``s(x) - s(mirror(x))``, antisymmetric, so a film and its mirror get opposite
  scores (the mirror is flagged exactly when the film scores below minus the threshold).

A validation part of the training films (by file, ``--val-fraction`` of each folder) picks the
epoch (highest catch at the threshold, then the lowest loss) and the decision threshold (the
``1 - --val-fa`` quantile of the validation originals' scores); the scorer with the higher
validation catch is the one reported as ``chosen``. On every ``*-test`` folder: the false-alarm
rate (real films flagged), the catch rate (their mirrors flagged), each with a 95 % Wilson
interval, and the ROC AUC of the score (real vs mirrored). Thumbnails are cached under
``runs/mirror-cnn/``.

    OMP_NUM_THREADS=1 python benchmarks/mirror_cnn.py --data runs/v3/data \\
        --json docs/results/mirror-cnn.json
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from mmcli.io.readers import read_radiograph
from mmcli.qa.image import film_thumbnails, thumbnail

ROOT = Path(__file__).resolve().parents[1]
SETS = ("seg-in", "seg-cross", "seg-adult", "cls-in", "cls-cross", "cls-adult")
SUFFIXES = (".png", ".jpg", ".jpeg")
FA_MAX, CATCH_MIN = 0.02, 0.90
CACHE_SIDE = 128


def list_films(folder: Path) -> list[Path]:
    """Image files under ``folder`` (any depth), masks/ folders left out, sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES
                  and "masks" not in p.relative_to(folder).parts and p.is_file())


def load_folder(folder: Path, cache: Path, size: int) -> np.ndarray:
    """(n, size, size) float32 box-average thumbnails of the films in ``folder``; 128 x 128 ones are cached."""
    files = list_films(folder)
    path = cache / f"{folder.name}-{CACHE_SIDE}.npz"
    names = np.array([str(f.relative_to(folder)) for f in files])
    z = np.load(path) if path.exists() else None
    if z is not None and np.array_equal(z["names"], names):
        x = z["x"]
    else:
        x = np.stack([thumbnail(film_thumbnails(read_radiograph(f).pixels)[0], CACHE_SIDE) for f in files])
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=x.astype(np.float32), names=names)
    if size == CACHE_SIDE:
        return x.astype(np.float32)
    return np.stack([thumbnail(t, size) for t in x]).astype(np.float32)


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2))


class MirrorNet(nn.Module):
    """Five conv blocks (16-64 channels), global average pooling, one logit per film."""

    def __init__(self, antisym: bool) -> None:
        super().__init__()
        chans = (1, 16, 32, 48, 64, 64)
        self.features = nn.Sequential(*[block(a, b) for a, b in zip(chans[:-1], chans[1:], strict=True)])
        self.head = nn.Linear(chans[-1], 1)
        self.antisym = antisym

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3))).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.antisym:
            return self.logit(x)
        s = self.logit(torch.cat([x, torch.flip(x, dims=[3])]))
        return s[: len(x)] - s[len(x):]


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Per-image z-scores of (n, 1, h, w)."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (x - mean) / x.std(dim=(2, 3), keepdim=True).clamp_min(1e-4)


def augment(x: torch.Tensor, gen: torch.Generator, shift: int) -> torch.Tensor:
    """Gamma and contrast jitter and shifts of up to ``shift`` pixels; never a flip."""
    n = len(x)
    gamma = torch.exp(torch.empty(n, 1, 1, 1).uniform_(-0.35, 0.35, generator=gen))
    x = x.clamp(0, 1) ** gamma
    gain = torch.empty(n, 1, 1, 1).uniform_(0.8, 1.2, generator=gen)
    x = (x - x.mean(dim=(2, 3), keepdim=True)) * gain
    pad = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    off = torch.randint(0, 2 * shift + 1, (n, 2), generator=gen)
    h, w = x.shape[2:]
    return torch.stack([pad[i, :, a: a + h, b: b + w] for i, (a, b) in enumerate(off.tolist())])


def mirrored_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The films and their mirrors in one batch, with labels 0 (real) and 1 (mirrored)."""
    return torch.cat([x, torch.flip(x, dims=[3])]), torch.cat([torch.zeros(len(x)), torch.ones(len(x))])


@torch.no_grad()
def scores(model: MirrorNet, x: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the real films and of their mirrors."""
    model.eval()
    real, mirr = [], []
    for i in range(0, len(x), batch):
        t = standardise(torch.from_numpy(x[i: i + batch]).unsqueeze(1))
        real.append(model(t))
        mirr.append(model(torch.flip(t, dims=[3])))
    return torch.cat(real).numpy(), torch.cat(mirr).numpy()


def val_metrics(model: MirrorNet, x: np.ndarray, fa: float) -> dict[str, float]:
    """Threshold at the ``1 - fa`` quantile of the validation originals, the catch there, loss and AUC."""
    real, mirr = scores(model, x)
    thr = float(np.quantile(real, 1 - fa, method="higher"))
    s = torch.from_numpy(np.r_[real, mirr])
    y = torch.from_numpy(np.r_[np.zeros(len(real)), np.ones(len(mirr))]).float()
    return {"threshold": thr, "catch": float(np.mean(mirr > thr)), "false_alarm": float(np.mean(real > thr)),
            "loss": float(F.binary_cross_entropy_with_logits(s, y)), "auc": auc(real, mirr)}


def train_epoch(model: MirrorNet, opt: torch.optim.Optimizer, x: np.ndarray, gen: torch.Generator,
                args: argparse.Namespace) -> float:
    """One pass over the training films in batches of ``args.batch`` films (plus their mirrors)."""
    model.train()
    order = torch.randperm(len(x), generator=gen).numpy()
    total = 0.0
    for i in range(0, len(x), args.batch):
        t = augment(torch.from_numpy(x[order[i: i + args.batch]]).unsqueeze(1), gen, args.size // 16)
        t, y = mirrored_pairs(standardise(t))
        loss = F.binary_cross_entropy_with_logits(model(t), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item() * len(t)
    return total / (2 * len(x))


def fit(antisym: bool, train: np.ndarray, val: np.ndarray, args: argparse.Namespace) -> tuple[MirrorNet, dict]:
    """Train a scorer; keep the epoch with the best validation catch at the threshold (then loss)."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = MirrorNet(antisym)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    best, best_state, history = None, None, []
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        loss = train_epoch(model, opt, train, gen, args)
        sched.step()
        m = {"epoch": epoch, "train_loss": loss, **val_metrics(model, val, args.val_fa),
             "seconds": time.perf_counter() - t0}
        history.append(m)
        print(f"  {'antisym' if antisym else 'plain'} epoch {epoch}: train loss {loss:.4f}, val loss {m['loss']:.4f},"
              f" val catch {m['catch']:.3f} at fa {m['false_alarm']:.3f}, auc {m['auc']:.4f} ({m['seconds']:.0f} s)",
              flush=True)
        if best is None or (m["catch"], -m["loss"]) > (best["catch"], -best["loss"]):
            best, best_state = m, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model, {"best": best, "history": history}


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """95 % Wilson score interval of a proportion k / n."""
    if n == 0:
        return [math.nan, math.nan]
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, mid - half), min(1.0, mid + half)]


def auc(real: np.ndarray, mirr: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.zeros(len(real)), np.ones(len(mirr))], np.r_[real, mirr]))


def evaluate(model: MirrorNet, x: np.ndarray, thr: float, names: list[str]) -> dict:
    """False alarm and catch at ``thr`` with Wilson intervals, and the AUC, on held-out films ``x`` (files
    ``names``); the files of the real films flagged, to look at."""
    real, mirr = scores(model, x)
    n, fa, ca = len(real), int(np.sum(real > thr)), int(np.sum(mirr > thr))
    return {"n": n, "false_alarm": fa / n, "false_alarm_ci95": wilson(fa, n), "false_alarms": fa,
            "catch": ca / n, "catch_ci95": wilson(ca, n), "caught": ca, "auc": auc(real, mirr),
            "flagged": [names[i] for i in np.flatnonzero(real > thr)]}


def split_train_val(data: Path, cache: Path, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, dict]:
    """All training films of the six sets, ``args.val_fraction`` of each folder (by file) held out."""
    rng = np.random.default_rng(args.seed)
    train, val, counts = [], [], {}
    for name in SETS:
        x = load_folder(data / f"{name}-train", cache, args.size)
        perm = rng.permutation(len(x))
        k = round(args.val_fraction * len(x))
        val.append(x[perm[:k]])
        train.append(x[perm[k:]])
        counts[name] = {"train": len(x) - k, "val": k}
        print(f"{name}-train: {len(x)} films ({k} for validation)", flush=True)
    return np.concatenate(train), np.concatenate(val), counts


def summarise(per_set: dict[str, dict]) -> dict:
    worst_fa = max(per_set, key=lambda k: per_set[k]["false_alarm"])
    worst_catch = min(per_set, key=lambda k: per_set[k]["catch"])
    met = all(v["false_alarm"] <= FA_MAX and v["catch"] >= CATCH_MIN for v in per_set.values())
    return {"worst_false_alarm": {"set": worst_fa, "value": per_set[worst_fa]["false_alarm"]},
            "worst_catch": {"set": worst_catch, "value": per_set[worst_catch]["catch"]},
            "criterion_met": met}


def table(name: str, thr: float, per_set: dict[str, dict]) -> str:
    rows = [f"\n**{name}** (threshold {thr:.3f})\n",
            "| set | n | false alarm (95% CI) | catch (95% CI) | AUC |", "|---|---:|---|---|---:|"]
    for k, v in per_set.items():
        fa, ca = v["false_alarm_ci95"], v["catch_ci95"]
        rows.append(f"| {k} | {v['n']} | {v['false_alarm']:.3f} ({fa[0]:.3f}-{fa[1]:.3f}) |"
                    f" {v['catch']:.3f} ({ca[0]:.3f}-{ca[1]:.3f}) | {v['auc']:.4f} |")
    return "\n".join(rows)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unknown"
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "unknown")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT / "runs" / "v3" / "data", help="the v3 train/test folders")
    p.add_argument("--cache", type=Path, default=ROOT / "runs" / "mirror-cnn")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--size", type=int, default=64, help="thumbnail side (box average)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch", type=int, default=32, help="films per batch (each with its mirror)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--val-fa", type=float, default=0.01, help="false-alarm rate on validation originals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scorers", nargs="+", default=["plain", "antisym"], choices=["plain", "antisym"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    train, val, counts = split_train_val(args.data, args.cache, args)
    tests = {name: load_folder(args.data / f"{name}-test", args.cache, args.size) for name in SETS}
    names = {name: [str(f.relative_to(args.data / f"{name}-test")) for f in list_films(args.data / f"{name}-test")]
             for name in SETS}
    timing = {"load_s": time.perf_counter() - start}
    result: dict = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "seed": args.seed, "thumbnail": args.size, "films": counts, "scorers": {}}
    for kind in args.scorers:
        t0 = time.perf_counter()
        model, fitted = fit(kind == "antisym", train, val, args)
        thr = fitted["best"]["threshold"]
        per_set = {name: evaluate(model, x, thr, names[name]) for name, x in tests.items()}
        timing[f"{kind}_s"] = time.perf_counter() - t0
        result["scorers"][kind] = {"epoch": fitted["best"]["epoch"], "threshold": thr, "validation": fitted["best"],
                                   "history": fitted["history"], "test": per_set, **summarise(per_set)}
        print(table(kind, thr, per_set), flush=True)
    chosen = max(result["scorers"], key=lambda k: (result["scorers"][k]["validation"]["catch"],
                                                   -result["scorers"][k]["validation"]["loss"]))
    result["chosen"] = chosen
    result["criterion"] = {"false_alarm_max": FA_MAX, "catch_min": CATCH_MIN,
                           "met": result["scorers"][chosen]["criterion_met"]}
    result["timing"] = {**timing, "total_s": time.perf_counter() - start, "cpu": cpu_name(), "torch_threads": 1}
    fa, ca = result["scorers"][chosen]["worst_false_alarm"], result["scorers"][chosen]["worst_catch"]
    print(f"\nchosen by validation: {chosen}; worst false alarm {fa['value']:.3f} ({fa['set']}),"
          f" worst catch {ca['value']:.3f} ({ca['set']});"
          f" ship criterion (fa <= {FA_MAX} and catch >= {CATCH_MIN} in every set)"
          f" {'MET' if result['criterion']['met'] else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
