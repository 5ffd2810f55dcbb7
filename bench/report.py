"""What every bench script shares: its command line and how a run's report is saved."""
from __future__ import annotations

import argparse
import datetime
import json
import os
from typing import Callable

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def detected_kind() -> str:
    """What this machine is, as results are labelled: GPU name and count, e.g. nvidia-h200-x1."""
    n = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0).lower().replace(" ", "-") if n else "cpu"
    return f"{name}-x{n}"


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None
               ) -> argparse.Namespace:
    """``--kind`` (default: detected), ``--ranks`` (default: every visible GPU, or 2 per GPU
    with ``--ranks-per-gpu``), ``--ranks-per-gpu`` (several ranks share a GPU under MPS),
    ``--quick``, ``--out``. Sets NCCL_NVLS_ENABLE=0 for the ranks it will spawn."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--kind", default=None,
                        help="label of the results (default: the GPU name and count found)")
    parser.add_argument("--ranks", type=int, default=None,
                        help="ranks in all (default: GPUs x ranks-per-gpu)")
    parser.add_argument("--ranks-per-gpu", type=int, default=1,
                        help="ranks sharing each GPU under MPS, each with 100/N %% of its SMs")
    parser.add_argument("--quick", action="store_true", help="small sizes, few iterations")
    parser.add_argument("--out", default=RESULTS)
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if args.ranks_per_gpu < 1:
        parser.error("--ranks-per-gpu must be >= 1")
    args.ranks = args.ranks or torch.cuda.device_count() * args.ranks_per_gpu
    args.kind = args.kind or detected_kind()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    return args


def run_label(args: argparse.Namespace) -> str:
    """How the ranks ran, for file names and titles: ``R2`` or ``R4-4pergpu``."""
    per = f"-{args.ranks_per_gpu}pergpu" if args.ranks_per_gpu > 1 else ""
    return f"R{args.ranks}{per}"


def today() -> str:
    return datetime.date.today().isoformat()


def save(report: dict, args: argparse.Namespace, suffix: str,
         markdown: Callable[[dict], str]) -> str:
    """Write ``<out>/<kind>-<R..>-<date><suffix>[-quick].{json,md}``, print the markdown;
    returns the path stem (for extra files such as plots)."""
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{args.kind}-{run_label(args)}-{report['date']}{suffix}"
                                  f"{'-quick' if args.quick else ''}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text)
    return stem
