"""How many films ``mask_implausible`` flags when two lungs joined at the mediastinum count as two.

Reads the masks of an ``mmcli evaluate`` run (its ``predictions/masks``) and, per dataset, the
share of films each rule flags, the share with any flag (the run's other flags kept), and on
sets with reference masks the mean Dice of flagged and unflagged films (a flag should fall on
bad masks):

* ``pieces``: exactly two pieces of at least ``MIN_COMPONENT`` of the frame (the rule before v3);
* ``waist``: also one piece with a waist in the middle half of its column span, split there as
  :func:`mmcli.qa.mask.lung_sides` splits it (the rule now);
* ``fused``: also one piece without a waist but with at least ``MIN_SIDE_SHARE`` of it on each
  side of the mid column (``lung_sides``' fused lungs).

    python benchmarks/qa_mask_rule.py --eval runs/v3/C-vb-nocross/eval --json docs/results/qa-mask-rule-v3.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mmcli.io.writers import read_mask_png
from mmcli.qa import mask as M

RULES = ("pieces", "waist", "fused")


def lungs(m: np.ndarray, rule: str) -> np.ndarray:
    """Areas of the lungs ``rule`` sees in mask ``m``, largest first."""
    p = M._parts(m)
    areas = np.sort(p.area)[::-1]
    areas = areas[areas >= M.MIN_COMPONENT * m.size]
    if rule == "pieces" or areas.size != 1:
        return areas
    profile = np.count_nonzero(m, axis=0)
    cut = M._waist(profile)
    if cut is None and rule == "fused":
        half = m.shape[1] // 2
        share = profile[:half].sum() / profile.sum()
        cut = half if min(share, 1 - share) >= M.MIN_SIDE_SHARE else None
    return areas if cut is None else np.sort([profile[:cut].sum(), profile[cut:].sum()])[::-1].astype(float)


def implausible(m: np.ndarray, rule: str) -> bool:
    """``mask_implausible`` under ``rule`` (no pixel spacing: the share of the frame only)."""
    areas = lungs(m, rule)
    low, high = M.LUNG_FRACTION_RANGE
    return not low <= m.mean() <= high or areas.size != 2 or areas[0] > M.MAX_LARGEST_SHARE * areas.sum()


def measure(eval_dir: Path) -> dict[str, Any]:
    with open(eval_dir / "per_case.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    with open(eval_dir / "predictions.csv", newline="", encoding="utf-8") as f:
        masks = {r["source"]: r["mask"] for r in csv.DictReader(f)}
    out: dict[str, Any] = {}
    for row in rows:
        mask = read_mask_png(eval_dir / masks[row["source"]])
        other = any(f and f != "mask_implausible" for f in (row["qa_flags"] or "").split(";"))
        dice = float(row["dice"]) if row.get("dice") else None
        for rule in RULES:
            out.setdefault(row["dataset"], {}).setdefault(rule, []).append((implausible(mask, rule), other, dice))
    return {name: {rule: summarise(v) for rule, v in by_rule.items()} for name, by_rule in out.items()}


def summarise(cases: list[tuple[bool, bool, float | None]]) -> dict[str, Any]:
    flagged = [d for f, _, d in cases if f and d is not None]
    kept = [d for f, _, d in cases if not f and d is not None]
    return {"n": len(cases), "mask_implausible": float(np.mean([f for f, _, _ in cases])),
            "any_flag": float(np.mean([f or o for f, o, _ in cases])),
            "dice_flagged": float(np.mean(flagged)) if flagged else None, "n_flagged_with_reference": len(flagged),
            "dice_unflagged": float(np.mean(kept)) if kept else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval", type=Path, required=True, help="an mmcli evaluate --out folder")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    result = measure(args.eval)
    print("| set | n | " + " | ".join(f"{r}: mask / any" for r in RULES) + " |")
    print("|---|---|" + "---|" * len(RULES))
    for name, by_rule in result.items():
        cells = [f"{by_rule[r]['mask_implausible']:.3f} / {by_rule[r]['any_flag']:.3f}" for r in RULES]
        print(f"| {name} | {by_rule['pieces']['n']} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"eval": str(args.eval), "sets": result}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
