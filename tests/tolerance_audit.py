"""Measure the noise floor of every tolerance comparison in the unit tests (writes ``docs/tolerances.md``).

    .venv/bin/python tests/tolerance_audit.py [--load] [--configs native2,native1,avx2,nosimd] [-- extra pytest args]

Runs the unit tests once per configuration with ``ICM_TOLERANCE_LOG`` set (``tests/tolerance_log.py`` records, for
every ``pytest.approx`` / ``allclose`` / ``assert_close``, how much of its tolerance the comparison used) and, with
``--load``, two busy-looping processes beside it (a 2-core busy load). Configurations change what differs between
machines: the intra-op thread count (reduction order) and the CPU kernels PyTorch, oneDNN and MKL dispatch to
(AVX-512, AVX2, no SIMD), as on the older and newer CPUs of this project's machines. The report lists, per assertion,
the tolerance, the largest fraction of it used in any configuration (the floor) and the failure it is there to catch.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "native2": ("2 threads, native kernels", {}),
    "native1": ("1 thread, native kernels", {"ICM_TEST_THREADS": "1"}),
    "avx2": ("2 threads, AVX2 kernels", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                        "MKL_ENABLE_INSTRUCTIONS": "AVX2"}),
    "nosimd": ("2 threads, no-SIMD kernels", {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                                             "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}),
}


def _busy() -> None:
    while True:
        pass


def run_config(name: str, log: Path, pytest_args: list[str]) -> dict:
    _, env_extra = CONFIGS[name]
    env = {**os.environ, **env_extra, "ICM_TOLERANCE_LOG": str(log), "ICM_NO_NETWORK": "1"}
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not browser", *pytest_args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    return {"config": name, "rc": proc.returncode, "seconds": round(time.time() - t0, 1), "summary": tail}


def aggregate(logs: dict[str, Path]) -> dict[str, dict]:
    sites: dict[str, dict] = defaultdict(lambda: {"used": {}, "tol": None, "n": 0, "negative": False, "test": ""})
    for cfg, path in logs.items():
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            r = json.loads(line)
            s = sites[r["site"]]
            s["n"] += 1
            s["test"] = s["test"] or r["test"]
            if not r["ok"]:  # a comparison that is meant to fail (``!= approx``: "the resample changes the metric")
                s["negative"] = True
                continue
            if r["used"] >= s["used"].get(cfg, -1):
                s["used"][cfg] = r["used"]
                if s["tol"] is None or r["used"] >= max(s["used"].values()):
                    s["tol"] = r["tol"]
    return sites


def source_line(site: str) -> str:
    path, line = site.rsplit(":", 1)
    try:
        return (ROOT / path).read_text().splitlines()[int(line) - 1].strip()
    except (OSError, IndexError, ValueError):
        return ""


def markdown(out: dict, names: list[str]) -> str:
    """The audit as a table: per comparison site its tolerance, the largest share of it used in any configuration
    (the floor; 1.0 = at the bound), and the head room (bound / floor)."""
    configs = ", ".join(f"`{n}` ({CONFIGS[n][0]})" for n in names)
    lines = [
        "# Tolerance audit of the unit tests",
        "",
        f"Written by `tests/tolerance_audit.py{' --load' if out['load'] else ''}`. Configurations: {configs}"
        + ("; beside a 2-core busy load (two busy-looping processes)." if out["load"] else "."),
        "",
        "| configuration | result | seconds |", "|---|---|---|",
        *(f"| {r['config']} | {r['summary']} | {r['seconds']} |" for r in out["runs"]),
        "",
        "Every `pytest.approx` / `allclose` / `assert_close` is logged (`tests/tolerance_log.py`). *floor* = the",
        "largest share of its tolerance a comparison used in any configuration (0 = exact); *head room* = 1 / floor.",
        "Bare `<` asserts on float differences are not logged: each carries its floor, bound and failure in a",
        "comment (`tests/test_distributed.py`, `tests/test_training_eval.py::test_bpp_estimated_and_bitstream_agree`).",
        "Comparisons meant to fail (`!= approx`) are marked *negative*.",
        "",
        "| site | tolerance | floor (share used) | head room | source |", "|---|---|---|---|---|",
    ]
    rows = sorted(out["sites"].items(), key=lambda kv: -kv[1]["max_used"])
    for site, v in rows:
        used = v["max_used"]
        room = "negative" if v["negative"] and not v["used"] else ("exact" if used == 0 else f"{1 / used:.3g}x")
        source = v["source"].replace("|", "\\|")[:100]
        tol = "n/a" if v["tol"] is None else f"{v['tol']:.3g}"
        lines.append(f"| `{site}` | {tol} | {used:.3g} | {room} | `{source}` |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--load", action="store_true", help="two busy-looping processes beside the tests")
    ap.add_argument("--out", default=str(ROOT / "docs" / "tolerances_measured.json"))
    ap.add_argument("pytest_args", nargs="*", default=["tests"])
    args = ap.parse_args(argv)
    names = [c for c in args.configs.split(",") if c]
    tmp = Path(tempfile.mkdtemp(prefix="tolerance_audit_"))
    busy = [mp.Process(target=_busy, daemon=True) for _ in range(2)] if args.load else []
    for p in busy:
        p.start()
    runs, logs = [], {}
    try:
        for name in names:
            logs[name] = tmp / f"{name}.jsonl"
            runs.append(run_config(name, logs[name], args.pytest_args))
            print(json.dumps(runs[-1]), flush=True)
    finally:
        for p in busy:
            p.terminate()
    sites = aggregate(logs)
    out = {"load": args.load, "runs": runs,
           "sites": {k: {**v, "max_used": max(v["used"].values(), default=0.0), "source": source_line(k)}
                     for k, v in sorted(sites.items())}}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    md = Path(args.out).with_name("tolerances.md")
    md.write_text(markdown(out, names))
    print(f"wrote {args.out} and {md}: {len(sites)} comparison sites")
    worst = sorted(out["sites"].items(), key=lambda kv: -kv[1]["max_used"])[:15]
    for k, v in worst:
        print(f"{v['max_used']:9.3g}  {k}  {v['source'][:90]}")
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
