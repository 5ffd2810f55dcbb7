"""What every bench script shares: its command line and how a run's report is saved."""
from __future__ import annotations

import argparse
import datetime
import json
import os
from typing import Callable

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(description: str) -> argparse.Namespace:
    """``--kind`` (required), ``--ranks`` (default: every visible GPU), ``--quick``, ``--out``.
    Sets NCCL_NVLS_ENABLE=0 for the ranks it will spawn (never NVLink multicast here)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--kind", required=True, help="device kind, e.g. nvidia-h200-x2")
    parser.add_argument("--ranks", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="small sizes, few iterations")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    args.ranks = args.ranks or torch.cuda.device_count()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    return args


def today() -> str:
    return datetime.date.today().isoformat()


def save(report: dict, args: argparse.Namespace, suffix: str,
         markdown: Callable[[dict], str]) -> str:
    """Write ``<out>/<kind>-<date><suffix>[-quick].{json,md}``, print the markdown; returns the
    path stem (for extra files such as plots)."""
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out,
                        f"{args.kind}-{report['date']}{suffix}{'-quick' if args.quick else ''}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text)
    return stem
