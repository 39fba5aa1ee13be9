"""The generation driver's per-unit state without Ray: what the driver holds for N committed units.

    python benchmarks/bench_driver_state.py [--units 100000] [--dir /tmp/bench-driver-state]

An ``IndexWriter`` (the driver's one record of committed units) is filled with N one-shard units
(entries shaped like the stand-in generator's), writes the final index, then ``remove_stale``
runs over a shards folder of N tars and N manifests (created once, empty tars), as at the end of
``generate_shards``. Printed: the driver's RSS growth while holding them and its peak above the
start, after each step (MB). Each size in its own process.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import chimera_ray.pipelines.generate  # noqa: E402,F401 - the driver's imports, in the baseline  # pyflakes: ignore
from chimera_ray.shards import UNITS_DIR, IndexWriter, remove_stale  # noqa: E402


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _entry(u: int) -> dict:
    return {"name": f"shard-{u:06d}-000-58328e65.tar", "samples": 4, "bytes": 20480,
            "sha256": "25e6d61be02f3e52e2198977d9b5c01267141025631f2987ba497c1c473d6288",
            "class_counts": {f"class_{(u * 4 + i) % 2500:05d}": 1 for i in range(4)},
            "first_key": "class_00015__00000108", "last_key": "class_00005__00000006", "unit": u, "part": 0,
            "signature": "022a983ff0c4dda4cc9014d1d7b72a8f"}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=100_000)
    ap.add_argument("--dir", default="/tmp/bench-driver-state", help="the shards folder (reused if complete)")
    args = ap.parse_args(argv)
    out = Path(f"{args.dir}-{args.units}")
    if not (out / ".made").exists():
        (out / UNITS_DIR).mkdir(parents=True, exist_ok=True)
        for u in range(args.units):
            (out / f"shard-{u:06d}-000-58328e65.tar").touch()
            (out / UNITS_DIR / f"{u:06d}.json").write_text(json.dumps({"unit": u, "shards": [_entry(u)]}))
        (out / ".made").touch()
    gc.collect()
    base = _rss_mb()
    result = {"units": args.units, "rss_start_mb": round(base, 1)}
    writer = IndexWriter(str(out), min_interval_s=0, growth=1e9, max_lag_s=None)
    for u in range(args.units):
        writer.add([_entry(u)])
    result["held"] = {"rss_mb": round(_rss_mb() - base, 1), "peak_mb": round(_peak_mb() - base, 1)}
    writer.flush(complete=True)
    result["after_final_index"] = {"rss_mb": round(_rss_mb() - base, 1), "peak_mb": round(_peak_mb() - base, 1)}
    removed = remove_stale(str(out), writer, keep_units=writer)
    result["after_remove_stale"] = {"rss_mb": round(_rss_mb() - base, 1), "peak_mb": round(_peak_mb() - base, 1),
                                    "removed": len(removed)}
    result["index_bytes"] = os.path.getsize(out / "index.json")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
