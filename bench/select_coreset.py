"""Benchmark of `warren select` against the plain float32 baseline, in the same run.

    python bench/select_coreset.py                      # 1M x 768 float16, avg cluster ~20k, then 4M
    python bench/select_coreset.py --quick              # 100k rows, no scale run (a smoke test)

Both arms run the same pipeline in a fresh child process (peak RSS from wait4); they
differ only in the pairwise step: Warren's int8-screened, symmetric, component-skipping
blocks vs the SemDeDup approach, a float32 X @ X.T per cluster (row-chunked so that it
fits in memory). Their coreset.parquet and rejects.parquet must be byte-identical.
Both arms read the source from a warm page cache (it is read once before them).
Pairwise GFLOP/s counts the flops of the full float32 product each cluster needs
(2 d n_c^2), so the two figures compare like with like.
"""
from __future__ import annotations

# Named select_coreset.py, not select.py: a bench/select.py shadows the standard
# library's `select` for every script in bench/ (sys.path[0] is the script's folder).
import argparse
import os
import sys
import json
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_source(path: str, n: int, dim: int, seed: int) -> None:
    from pipelines.synth import embeddings as synth
    if os.path.exists(os.path.join(path, "truth.parquet")):
        return
    t = time.perf_counter()
    synth.generate(synth.SynthConfig(n=n, dim=dim, seed=seed, shards=max(1, n // 100_000),
                                     avg_cluster=20_000, giant_share=0.01), path, progress=True)
    print(f"  synthetic source: {n:,} x {dim} in {time.perf_counter() - t:.0f} s", file=sys.stderr)


def warm_cache(path: str) -> None:
    """Read the source once so that neither arm pays for the first, cold read of it."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                while f.read(1 << 26):
                    pass


def run_arm(src: str, out: str, method: str, k: int) -> dict:
    cmd = [sys.executable, "-m", "flows.cli", "select", "--input", src, "--output", out,
           "--k", str(k), "--method", method, "--quiet"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if status != 0:
        raise SystemExit(f"{method} arm failed: {' '.join(cmd)}")
    stats = json.load(open(os.path.join(out, "stats.json")))
    d = stats["dedup"]
    dim = json.load(open(os.path.join(out, "_work", "plan.json")))["dim"]
    full_flops = 4.0 * d["pairs"] * dim       # 2 d n^2 per cluster, n^2 ~ 2 * pairs
    return {"method": method, "rows": stats["input_rows"], "wall_s": wall,
            "rows_per_s": stats["input_rows"] / wall, "peak_rss_gb": usage.ru_maxrss / 2**20,
            "dedup_s": d["seconds"], "pairwise_gflops": full_flops / d["seconds"] / 1e9,
            "executed_gflops": d["flops"] / d["seconds"] / 1e9, "skipped_blocks": d["skipped_blocks"],
            "rechecked": d["rechecked"], "largest_cluster": d["largest_cluster"],
            "coreset_rows": stats["coreset_rows"], "stage_s": stats.get("seconds", {}),
            "stage_peak_rss_gb": stats.get("peak_rss_gb", {})}


def same_bytes(a: str, b: str) -> bool:
    return all(open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read()
               for f in ("coreset.parquet", "rejects.parquet"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--scale-n", type=int, default=4_000_000, help="0 to skip the scale run")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="keeps generated sources between runs")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args()
    if a.quick:
        a.n, a.scale_n = 100_000, 0
    work = a.workdir or tempfile.mkdtemp(prefix="warren-bench-")
    os.makedirs(work, exist_ok=True)
    src = os.path.join(work, f"src-{a.n}-{a.dim}")
    make_source(src, a.n, a.dim, a.seed)
    k = max(1, round(a.n / 20_000))
    runs = {}
    warm_cache(src)
    for method in ("int8", "baseline"):
        out = tempfile.mkdtemp(prefix=f"sel-{method}-", dir=work)
        print(f"  running {method} arm on {a.n:,} rows (k={k})", file=sys.stderr)
        runs[method] = run_arm(src, out, method, k)
        runs[method]["out"] = out
    w, b = runs["int8"], runs["baseline"]
    identical = same_bytes(w["out"], b["out"])
    print(f"\nselect on {a.n:,} x {a.dim} float16, k={k}, largest cluster {w['largest_cluster']:,}")
    print(f"{'':28}{'warren':>12}{'baseline':>12}{'ratio':>9}")
    rows = [("end-to-end rows/s", "rows_per_s", True), ("pairwise GFLOP/s (full-eq.)", "pairwise_gflops", True),
            ("dedup seconds", "dedup_s", False), ("peak RSS GB", "peak_rss_gb", False),
            ("wall seconds", "wall_s", False)]
    for label, key, higher in rows:
        ratio = w[key] / b[key] if higher else b[key] / w[key]
        print(f"{label:28}{w[key]:12.2f}{b[key]:12.2f}{ratio:8.2f}x")
    print(f"executed GFLOP/s (warren int8, upper triangle): {w['executed_gflops']:.1f}; "
          f"blocks skipped {w['skipped_blocks']}, pairs rechecked exactly {w['rechecked']:,}")
    for name, r in (("warren", w), ("baseline", b)):
        print(f"stage seconds, {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["stage_s"].items()))
    print(f"identical keep/drop decisions (coreset + rejects bytes): {identical}")
    result = {"n": a.n, "dim": a.dim, "k": k, "warren": w, "baseline": b, "identical": identical}
    if a.scale_n:
        ssrc = os.path.join(work, f"src-{a.scale_n}-{a.dim}")
        make_source(ssrc, a.scale_n, a.dim, a.seed)
        sk = max(1, round(a.scale_n / 20_000))
        warm_cache(ssrc)
        s = run_arm(ssrc, tempfile.mkdtemp(prefix="sel-scale-", dir=work), "int8", sk)
        print(f"\nscale: {a.scale_n:,} rows (k={sk}): {s['rows_per_s']:,.0f} rows/s, peak RSS "
              f"{s['peak_rss_gb']:.2f} GB ({s['peak_rss_gb'] / w['peak_rss_gb']:.2f}x the "
              f"{a.n:,}-row run for {a.scale_n / a.n:.0f}x the rows)")
        for name, r in ((f"{a.n:,}", w), (f"{a.scale_n:,}", s)):
            print(f"peak RSS (GB) as of the end of each stage, {name} rows: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in r["stage_peak_rss_gb"].items()))
        result["scale"] = s
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    if not identical:
        raise SystemExit("decisions differ between the arms")


if __name__ == "__main__":
    main()
