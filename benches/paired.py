#!/usr/bin/env python3
"""paired.py RESULTS.tsv [RESULTS.tsv ...] [A] [B] -- compare two targets cell by cell.

With ORDER=cell, compare.sh runs every cell on each target back to back, so the i-th sample
of A and the i-th sample of B of a cell were taken under the same machine conditions. This
prints, per cell, both medians and the median of the paired ratios A/B for TPS and for proxy
CPU per 1000 transactions, and in how many rounds A had at least B's TPS. Below the table,
the geometric mean of every paired ratio of all cells together, with a 95 % bootstrap
interval (resampling rounds within each cell): whether one target is ahead overall, or the
two differ by less than the machine's noise.
Each row also gets the geometric mean of its own paired ratios with a 95 % bootstrap interval
(resampling its rounds): a row whose interval lies below 1 (TPS) or above 1 (CPU) is behind
by more than its own run-to-run spread; the last lines count such rows. Several results
files (runs of the same matrix) are pooled, each run's samples paired within that run.
Defaults: A = pglifeguard, B = pgbouncer-session. Rows whose status is not ok are skipped.
"""
import csv
import math
import random
import statistics
import sys
from collections import defaultdict


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    paths = [x for x in sys.argv[1:] if x.endswith(".tsv")]
    names = [x for x in sys.argv[1:] if not x.endswith(".tsv")]
    a = names[0] if names else "pglifeguard"
    b = names[1] if len(names) > 1 else "pgbouncer-session"
    # (target, workload, protocol, clients) -> [(tps, cpu)], per results file, so that a
    # round of one run is never paired with a round of another.
    runs = [load(p) for p in paths]
    cells = sorted({k[1:] for s in runs for k in s if k[0] == a} & {k[1:] for s in runs for k in s if k[0] == b})
    if not cells:
        print(f"no cell has samples of both {a} and {b}", file=sys.stderr)
        return 1
    print(f"| workload | protocol | clients | rounds | {a} TPS | {b} TPS | TPS ratio | TPS ratio, mean (95 %) "
          f"| rounds {a} ≥ {b} | {a} CPU s/1k | {b} CPU s/1k | CPU ratio | CPU ratio, mean (95 %) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    all_tps, all_cpu = [], []
    for cell in cells:
        xs, ys, tps_ratios, cpu_ratios = [], [], [], []
        for run in runs:
            rx, ry = run.get((a, *cell), []), run.get((b, *cell), [])
            n = min(len(rx), len(ry))
            xs += rx[:n]
            ys += ry[:n]
            tps_ratios += [rx[i][0] / ry[i][0] for i in range(n)]
            cpu_ratios += [rx[i][1] / ry[i][1] for i in range(n) if ry[i][1] > 0]
        all_tps.append(tps_ratios)
        all_cpu.append(cpu_ratios)
        wins = sum(r >= 1.0 for r in tps_ratios)
        med = statistics.median
        wl, proto, clients = cell
        print(f"| {wl} | {proto} | {clients} | {len(xs)} | {med(x[0] for x in xs):.0f} | {med(y[0] for y in ys):.0f} "
              f"| {med(tps_ratios):.3f} | {interval(tps_ratios)} | {wins}/{len(xs)} "
              f"| {med(x[1] for x in xs):.4f} | {med(y[1] for y in ys):.4f} "
              f"| {med(cpu_ratios) if cpu_ratios else float('nan'):.3f} | {interval(cpu_ratios)} |")
    print()
    for name, per_cell in (("TPS", all_tps), ("CPU per transaction", all_cpu)):
        mean, low, high = pooled(per_cell)
        print(f"All cells, {name} {a}/{b}: geometric mean {mean:.3f} (95 % interval {low:.3f}-{high:.3f})")
    # The question "is A at least B in every row" counted: by each row's geometric mean, and
    # by its interval (behind by more than the row's own spread).
    print()
    for name, per_cell, behind in (("TPS below", all_tps, lambda m, lo, hi: (m < 1, hi < 1)),
                                   ("CPU per transaction above", all_cpu, lambda m, lo, hi: (m > 1, lo > 1))):
        flags = [behind(*pooled([c])) for c in per_cell if c]
        print(f"Rows with {a}'s {name} {b}'s: {sum(f[0] for f in flags)} of {len(flags)} by their mean, "
              f"{sum(f[1] for f in flags)} beyond their interval")
    return 0


def load(path):
    samples = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if row["status"] != "ok":
                continue
            key = (row["target"], row["workload"], row["protocol"], int(row["clients"]))
            cpu = float(row["proxy_cpu_s_per_1k_txn"]) if row["proxy_cpu_s_per_1k_txn"] not in ("", "-") else float("nan")
            samples[key].append((float(row["tps"]), cpu))
    return samples


def interval(ratios):
    mean, low, high = pooled([ratios])
    return f"{mean:.3f} ({low:.3f}-{high:.3f})"


def geomean(ratios):
    return math.exp(statistics.fmean(math.log(r) for r in ratios))


def pooled(per_cell, draws=2000):
    """Geometric mean of all ratios, and a bootstrap interval that resamples each cell's
    rounds (so every cell keeps its weight). Seeded: the same results give the same interval."""
    cells = [c for c in per_cell if c]
    if not cells:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(1)
    means = sorted(
        geomean([r for c in cells for r in rng.choices(c, k=len(c))]) for _ in range(draws)
    )
    return geomean([r for c in cells for r in c]), means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


if __name__ == "__main__":
    sys.exit(main())
