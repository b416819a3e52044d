"""The search's latency lookup table for a supernet run: build time, raw and calibrated error on held-out networks.

    python bench/latency.py runs/bench-supernet-c10 --batches 1,32 --calibrate 10 --check 20 --threads 1

For each batch size, builds the per-choice table exactly as `effcifar search --max-latency-ms`
does (the run's space, widths, channels_last; the search's device and precision): it times each
op, then `--calibrate` whole standalone networks of random architectures to fit its scale and
`--check` other ones held out. Prints the held-out error of the raw sum and of the calibrated
table (mean and max absolute %, mean signed % as the bias), Spearman's rho between the table and
the held-out networks, the scale and the build time, and the load average of the machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from effcifar.device import resolve_device, resolve_precision
from effcifar.nas.latency import LatencyTable, Target
from effcifar.nas.ranking import spearman_rho
from effcifar.nas.supernet import load_supernet


def rounded(errors: dict[str, float]) -> dict[str, float]:
    """The error figures to two decimals (the count as is)."""
    return {k: round(v, 2) if k != "networks" else v for k, v in errors.items()}


def main() -> None:
    """Print one line and one JSON record per batch size."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("supernet", help="a finished supernet run directory")
    parser.add_argument("--batches", default="1,32", help="comma-separated images per timed forward")
    parser.add_argument("--calibrate", type=int, default=10, help="whole random networks the scale is fitted on")
    parser.add_argument("--check", type=int, default=20, help="other whole random networks held out")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    net, space, sconfig = load_supernet(args.supernet)
    device = resolve_device(args.device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(args.precision, device))
    for batch in (int(b) for b in args.batches.split(",")):
        target = Target(device, amp_dtype, sconfig.channels_last, batch)
        num_classes = net.head[2].out_features  # the head's linear layer
        table = LatencyTable.measure(space, sconfig.channels(), num_classes, target, calibrate=args.calibrate,
                                     check=args.check)
        print(table.summary(), flush=True)
        v, held_out = table.validation, table.validation["held_out"]
        print(json.dumps({"batch": batch, "scale": round(table.scale, 3),
                          "build_seconds": round(table.build_seconds, 2), "check_seconds": round(v["seconds"], 2),
                          "raw": rounded(v["raw"]), "calibrated": rounded(v["calibrated"]),
                          "spearman": round(spearman_rho([p["table_ms"] for p in held_out],
                                                         [p["measured_ms"] for p in held_out]), 3),
                          "measured_ms": [round(p["measured_ms"], 3) for p in held_out],
                          "predicted_ms": [round(table.scale * p["table_ms"], 3) for p in held_out],
                          "loadavg": Path("/proc/loadavg").read_text().split()[:3]}), flush=True)


if __name__ == "__main__":
    main()
