#!/usr/bin/env python3
"""paired.py RESULTS.tsv [A] [B] -- compare two targets of a compare.sh run cell by cell.

With ORDER=cell, compare.sh runs every cell on each target back to back, so the i-th sample
of A and the i-th sample of B of a cell were taken under the same machine conditions. This
prints, per cell, both medians and the median of the paired ratios A/B for TPS and for proxy
CPU per 1000 transactions, and in how many rounds A had at least B's TPS.
Defaults: A = pglifeguard, B = pgbouncer-session. Rows whose status is not ok are skipped.
"""
import csv
import statistics
import sys
from collections import defaultdict


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    path = sys.argv[1]
    a = sys.argv[2] if len(sys.argv) > 2 else "pglifeguard"
    b = sys.argv[3] if len(sys.argv) > 3 else "pgbouncer-session"
    samples = defaultdict(list)  # (target, workload, protocol, clients) -> [(tps, cpu)]
    with open(path, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if row["status"] != "ok":
                continue
            key = (row["target"], row["workload"], row["protocol"], int(row["clients"]))
            cpu = float(row["proxy_cpu_s_per_1k_txn"]) if row["proxy_cpu_s_per_1k_txn"] not in ("", "-") else float("nan")
            samples[key].append((float(row["tps"]), cpu))
    cells = sorted({k[1:] for k in samples if k[0] == a} & {k[1:] for k in samples if k[0] == b})
    if not cells:
        print(f"no cell has samples of both {a} and {b}", file=sys.stderr)
        return 1
    print(f"| workload | protocol | clients | rounds | {a} TPS | {b} TPS | TPS ratio | rounds {a} ≥ {b} "
          f"| {a} CPU s/1k | {b} CPU s/1k | CPU ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for wl, proto, clients in cells:
        xs, ys = samples[(a, wl, proto, clients)], samples[(b, wl, proto, clients)]
        n = min(len(xs), len(ys))
        tps_ratios = [xs[i][0] / ys[i][0] for i in range(n)]
        cpu_ratios = [xs[i][1] / ys[i][1] for i in range(n) if ys[i][1] > 0]
        wins = sum(r >= 1.0 for r in tps_ratios)
        med = statistics.median
        print(f"| {wl} | {proto} | {clients} | {n} | {med(x[0] for x in xs):.0f} | {med(y[0] for y in ys):.0f} "
              f"| {med(tps_ratios):.3f} | {wins}/{n} | {med(x[1] for x in xs):.4f} | {med(y[1] for y in ys):.4f} "
              f"| {med(cpu_ratios) if cpu_ratios else float('nan'):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
