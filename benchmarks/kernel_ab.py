"""Summarise `benchmarks/kernel_ab.sh` runs: per mode, each version's median step time and the
new/old ratio round by round (the machine drifts between rounds; a round's pair shares its state)."""

from __future__ import annotations

import collections
import json
import statistics
import sys
from pathlib import Path


def main(folder: Path) -> None:
    times: dict[tuple[str, str], dict[str, float]] = collections.defaultdict(dict)
    for path in sorted(folder.glob("*.json")):
        mode, version, round_ = path.stem.rsplit("-", 2)
        times[mode, version][round_] = json.loads(path.read_text())["rows"][0]["latency_ms"]
    for mode in sorted({m for m, _ in times}):
        old, new = times[mode, "old"], times[mode, "new"]
        ratios = [new[r] / old[r] for r in sorted(old) if r in new]
        print(
            f"{mode}: old median {statistics.median(old.values()):.1f} ms, new median "
            f"{statistics.median(new.values()):.1f} ms, new/old by round {[round(x, 3) for x in ratios]}, "
            f"median {statistics.median(ratios):.3f}"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
