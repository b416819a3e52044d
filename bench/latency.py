"""The search's latency lookup table for a supernet run: build time and error against whole networks.

    python bench/latency.py runs/bench-supernet-c10 --batches 1,32 --check 20 --threads 1

For each batch size, builds the per-choice table exactly as `effcifar search --max-latency-ms`
does (the run's space, widths, channels_last; the search's device and precision), then times
`--check` whole standalone networks of random architectures and prints the table's error
against them (mean and max absolute %, mean signed % as the bias) and the build time.
"""

from __future__ import annotations

import argparse
import json

import torch

from effcifar.nas.latency import LatencyTable, Target
from effcifar.nas.supernet import load_supernet
from effcifar.train import resolve_device, resolve_precision


def main() -> None:
    """Print one line and one JSON record per batch size."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("supernet", help="a finished supernet run directory")
    parser.add_argument("--batches", default="1,32", help="comma-separated images per timed forward")
    parser.add_argument("--check", type=int, default=20, help="whole random networks timed against the table")
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
        table = LatencyTable.measure(space, sconfig.channels(), num_classes, target, check=args.check)
        print(table.summary(), flush=True)
        v = table.validation
        print(json.dumps({"batch": batch, "build_seconds": round(table.build_seconds, 2),
                          "check_seconds": round(v["seconds"], 2),
                          "mean_abs_pct": round(v["mean_abs_pct"], 2), "max_abs_pct": round(v["max_abs_pct"], 2),
                          "bias_pct": round(v["bias_pct"], 2),
                          "measured_ms": [round(p["measured_ms"], 3) for p in v["pairs"]],
                          "predicted_ms": [round(p["predicted_ms"], 3) for p in v["pairs"]]}), flush=True)


if __name__ == "__main__":
    main()
