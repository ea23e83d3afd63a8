"""One line per record of kv_int_engine_shape_bench.py's jsonl: shape, variant, time, share of
the copy rate, d (max |difference| from the plain kernel).

    python3 benchmarks/kv_int_shape_summary.py $OUT/kv_int_engine_shape.jsonl
"""

import json
import sys


def main(path):
    for line in open(path):
        r = json.loads(line)
        if r.get("name") == "copy":
            print(f"copy {r['TBps']:.3f} TB/s {r['device']}")
        elif "error" in r:
            print(f"ERR {r.get('shape')} {r.get('variant')} {r['error'][:150]}")
        else:
            d = f" d={r['d']:.1e}" if "d" in r else ""
            print(f"{r['name']} {r['shape']} {r['variant']} {r['us']:.1f}us {100 * r['frac']:.1f}%{d}")


if __name__ == "__main__":
    main(sys.argv[1])
