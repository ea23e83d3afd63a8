"""The few numbers that say what bounds a kernel, from ``ncu --csv --page raw`` output: time,
issue activity, warps per scheduler, instructions, DRAM throughput, the pipes' utilization and
the largest warp-stall reasons (cycles per issued instruction).

    ncu --csv --page raw --clock-control none --kernel-name regex:fast_decode --section WarpStateStats \\
        --section SchedulerStats --section ComputeWorkloadAnalysis --section SpeedOfLight \\
        --section Occupancy --section LaunchStats python3 ... > ncu.csv
    python3 benchmarks/kv_int_ncu_summary.py ncu.csv
"""

import csv
import io
import sys

KEYS = ("gpu__time_duration.sum", "smsp__issue_active.avg.pct_of_peak_sustained_active",
        "smsp__warps_active.avg.per_cycle_active", "smsp__warps_eligible.avg.per_cycle_active",
        "smsp__inst_executed.sum", "launch__registers_per_thread", "dram__throughput.avg.pct_of_peak_sustained_elapsed",
        "gpc__cycles_elapsed.avg.per_second", "smsp__average_warp_latency_per_inst_issued.ratio")


def num(x):
    try:
        return float((x or "0").replace(",", ""))
    except ValueError:
        return 0.0


def main(path):
    text = open(path).read()
    start = text.find('"ID"')
    rows = list(csv.reader(io.StringIO(text[start:])))
    if len(rows) < 3:
        print("ncu: no rows", text[-300:])
        return
    head, units = rows[0], rows[1]
    for r in rows[2:]:
        v = dict(zip(head, r))
        u = dict(zip(head, units))
        print(f"ncu kernel {v.get('Kernel Name', '?')[:30]} id={v.get('ID')}")
        print("  " + " ".join(f"{k.split('__')[1][:40]}={v[k]}{u.get(k, '')}" for k in KEYS if k in v))
        pipes = sorted(((num(v[k]), k) for k in head if k.startswith("sm__inst_executed_pipe_")
                        and k.endswith("pct_of_peak_sustained_active")), reverse=True)[:6]
        print("  pipes: " + " ".join(f"{k[len('sm__inst_executed_pipe_'):].split('.')[0]}={x:.1f}%" for x, k in pipes))
        stalls = sorted(((num(v[k]), k) for k in head if k.startswith("smsp__average_warps_issue_stalled_")
                         and k.endswith("per_issue_active.ratio")), reverse=True)[:9]
        print("  stalls/issue: " + " ".join(
            f"{k[len('smsp__average_warps_issue_stalled_'):-len('_per_issue_active.ratio')]}={x:.2f}" for x, k in stalls))


if __name__ == "__main__":
    main(sys.argv[1])
