"""Same seed, same bits: run the same fits on two source trees and compare them.

    python bench/identical.py OLD_SRC NEW_SRC [--out DIR]

Each case runs ``layerwise fit`` on the embedded digits in a subprocess whose ``PYTHONPATH``
puts one tree's ``src`` first. ``metrics.jsonl`` must match row for row (times and paths
left out: they differ between any two runs) and ``best.safetensors`` byte for byte. The
precision and memory format are given, so no timed numerics trial can choose differently.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

COMMON = ["--precision", "fp32", "--no-channels-last", "--quiet", "--seed", "0", "--workers", "0", "--cache", "ram",
          "--check-data", "off"]
SMALL = ["--img-size", "32"]
CASES: dict[str, list[str]] = {
    "full": ["--strategy", "full", "--epochs", "2", "--batch-size", "64", *SMALL],
    "gradual": ["--strategy", "gradual", "--epochs", "3", "--batch-size", "64", *SMALL],
    "lp-ft": ["--strategy", "lp-ft", "--epochs", "2", "--batch-size", "64", *SMALL],
    "auto": ["--strategy", "auto", "--epochs", "2", *SMALL],
    "lr-auto": ["--strategy", "discriminative", "--epochs", "1", "--batch-size", "64", "--lr", "auto", *SMALL],
    # make demo's command, every default left alone (the embedded digits' own image size)
    "demo": ["--strategy", "full", "--label-smoothing", "0.1", "--epochs", "1"],
}
# Wall-clock fields: they differ between any two runs of the same tree.
TIMES = ("epoch_seconds", "images_per_second", "elapsed_seconds")


def run(src: Path, case: str, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-m", "layerwise", "fit", *CASES[case], *COMMON, "--out", str(out), "--overwrite"]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)


def rows(run_dir: Path) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append({k: v for k, v in r.items() if k not in TIMES})
    return out


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old", type=Path, help="the old tree's src folder")
    p.add_argument("new", type=Path, help="the new tree's src folder")
    p.add_argument("--out", type=Path, default=Path("runs/identical"))
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)}")
    args = p.parse_args()
    same = True
    for case in args.cases.split(","):
        dirs = {side: args.out / side / case for side in ("old", "new")}
        run(args.old.resolve(), case, dirs["old"])
        run(args.new.resolve(), case, dirs["new"])
        m_ok = rows(dirs["old"]) == rows(dirs["new"])
        w = {side: digest(d / "best.safetensors") for side, d in dirs.items()}
        ok = m_ok and w["old"] == w["new"]
        same &= ok
        print(f"{case:<8} metrics {'same' if m_ok else 'DIFFER'} · best.safetensors {w['old']} / {w['new']} "
              f"· {'identical' if ok else 'DIFFERENT'}", flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
