"""A compact table of ``kv_int_decode_bench.py``'s records (one line a variant), for a device log.

    python benchmarks/kv_int_summary.py kv_int_bench.jsonl
"""

from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    for line in open(path):
        r = json.loads(line)
        if r.get("name") == "copy":
            print(f"copy {r['TBps']:.3f} TB/s {r['device']}")
        elif "error" in r:
            print(f"{r.get('kv')} {r.get('variant')} {r.get('block_n')},{r.get('warps')},{r.get('stages')},"
                  f"{r.get('splits')} ERROR {r['error'][:90]}")
        elif r.get("name") == "paged_decode":
            print(f"{r['kv']} paged_decode {r['us']:.1f} us {100 * r['frac_of_copy']:.1f}%")
        else:
            diff = r.get("max_abs_diff")
            print(f"{r['kv']} {r['variant']} {r.get('block_n')},{r.get('warps')},{r.get('stages')},{r.get('splits')}"
                  f" {r.get('what')} {r['us']:.1f} us {100 * r['frac_of_copy']:.1f}%"
                  + (f" d={diff:.1e}" if diff is not None else ""))


if __name__ == "__main__":
    main(sys.argv[1])
