"""Benchmarks of `warren select`, each against a baseline measured in the same run.

    python bench/select_coreset.py                      # 1M x 768: int8 vs the float32 X @ X.T baseline
    python bench/select_coreset.py --quick              # 100k rows (a smoke test)
    python bench/select_coreset.py --memory 500000,2000000,8000000   # finish/report RSS vs rows (x 64)
    python bench/select_coreset.py --semdedup           # end to end vs SemDeDup's method, 200k x 512, k = 16
    python bench/select_coreset.py --global-scope       # what --dedup-scope global costs, 200k x 512
    python bench/select_coreset.py --gpu                # on a GPU machine: cuda vs 2 CPU cores, 1M x 768

Every arm runs in a fresh child process. Peak memory is the child's own VmHWM (printed
by the child: getrusage's ru_maxrss of a child started by vfork also counts the
parent's peak). Sources are read once before the arms (a warm page cache for all).

- Default: both arms run the same pipeline and differ only in the pairwise step:
  Warren's exact screens (the head screen where it pays, then the int8 product), symmetric,
  component-skipping blocks vs the SemDeDup approach, a float32 X @ X.T per cluster. Their coreset.parquet and rejects.parquet must be
  byte-identical. Pairwise GFLOP/s counts the flops of the full float32 product each
  cluster needs (2 d n_c^2), so the two figures compare like with like.
- --memory: a full run per size, then the finish stage and the report each rerun alone
  on the finished run's folder; their peak RSS should not grow with the rows.
- --semdedup: `warren select` (validate, k-means, dedup, bands, sample, outputs, report)
  against SemDeDup's method as its paper and released code describe it, re-derived
  here (`semdedup_method`): all embeddings in memory, spherical faiss k-means (100
  iterations), nearest centroid, per cluster the float32 similarity matrix, its upper
  triangle and column maxima, drop where the maximum exceeds 1 - eps.
"""
from __future__ import annotations

# Named select_coreset.py, not select.py: a bench/select.py shadows the standard
# library's `select` for every script in bench/ (sys.path[0] is the script's folder).
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

HWM = ("import atexit\n"
       "def _hwm():\n"
       "    for l in open('/proc/self/status'):\n"
       "        if l.startswith('VmHWM:'): print('HWM', int(l.split()[1]) / 2**20, flush=True)\n"
       "atexit.register(_hwm)\n")


def make_source(path: str, n: int, dim: int, seed: int, avg_cluster: int = 20_000) -> None:
    if os.path.exists(os.path.join(path, "truth.parquet")):
        return
    t = time.perf_counter()
    # in a child: the generator's memory must not count in the arms' parent
    code = ("from pipelines.synth import embeddings as s; s.generate(s.SynthConfig("
            f"n={n}, dim={dim}, seed={seed}, shards={max(1, n // 100_000)}, "
            f"avg_cluster={avg_cluster}, giant_share=0.01), {path!r}, progress=True)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    print(f"  synthetic source: {n:,} x {dim} in {time.perf_counter() - t:.0f} s", file=sys.stderr)


def warm_cache(path: str) -> None:
    """Read the source once so that no arm pays for the first, cold read of it."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                while f.read(1 << 26):
                    pass


def child(args: list[str], env: dict | None = None, prefix: list[str] | None = None) -> dict:
    """Run a Python child (a module's argv or ["-c", code]); wall, CPU seconds, VmHWM."""
    if args[0] == "-c":
        args = ["-c", HWM + args[1]]
    else:
        args = ["-c", HWM + f"import runpy, sys; sys.argv = {args!r}; "
                f"runpy.run_module({args[0]!r}, run_name='__main__')"]
    t = time.perf_counter()
    p = subprocess.Popen((prefix or []) + [sys.executable] + args, cwd=ROOT, stdout=subprocess.PIPE,
                         text=True, env={**os.environ, **(env or {})})
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)      # CPU seconds: steadier than wall on a busy machine
    wall = time.perf_counter() - t
    if status != 0:
        raise SystemExit(f"child failed: {args}")
    hwm = [float(ln.split()[1]) for ln in out.splitlines() if ln.startswith("HWM ")]
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_gb": hwm[-1] if hwm else float("nan"),
            "stdout": [ln for ln in out.splitlines() if not ln.startswith("HWM ")]}


def select_args(src: str, out: str, k: int, *extra: str) -> list[str]:
    return ["flows.cli", "select", "--input", src, "--output", out, "--k", str(k), "--quiet",
            *extra]


def run_arm(src: str, out: str, method: str, k: int, *extra: str) -> dict:
    r = child(select_args(src, out, k, "--method", method, *extra))
    stats = json.load(open(os.path.join(out, "stats.json")))
    d = stats["dedup"]
    dim = json.load(open(os.path.join(out, "_work", "plan.json")))["dim"]
    full_flops = 4.0 * d["pairs"] * dim       # 2 d n^2 per cluster, n^2 ~ 2 * pairs
    return {"method": method, "rows": stats["input_rows"], "wall_s": r["wall_s"],
            "rows_per_s": stats["input_rows"] / r["wall_s"], "peak_rss_gb": r["peak_rss_gb"],
            "dedup_s": d["seconds"], "pairwise_gflops": full_flops / max(d["seconds"], 1e-9) / 1e9,
            "executed_gflops": d["flops"] / max(d["seconds"], 1e-9) / 1e9,
            "skipped_blocks": d["skipped_blocks"], "rechecked": d["rechecked"],
            "largest_cluster": d["largest_cluster"], "coreset_rows": stats["coreset_rows"],
            "stage_s": stats.get("seconds", {}), "stage_cpu_s": stats.get("cpu_seconds", {}),
            "stage_peak_rss_gb": stats.get("peak_rss_gb", {}), "out": out}


def same_bytes(a: str, b: str, files=("coreset.parquet", "rejects.parquet")) -> bool:
    return all(open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read()
               for f in files)


# -- the default: int8 against the float32 baseline --------------------------------------
def bench_pairwise(a, work: str) -> dict:
    src = os.path.join(work, f"src-{a.n}-{a.dim}")
    make_source(src, a.n, a.dim, a.seed)
    k = max(1, round(a.n / 20_000))
    warm_cache(src)
    runs = {}
    for method in ("int8", "baseline"):
        out = tempfile.mkdtemp(prefix=f"sel-{method}-", dir=work)
        print(f"  running {method} arm on {a.n:,} rows (k={k})", file=sys.stderr)
        runs[method] = run_arm(src, out, method, k, "--device", "faiss")
    w, b = runs["int8"], runs["baseline"]
    identical = same_bytes(w["out"], b["out"])
    print(f"\nselect on {a.n:,} x {a.dim} float16, k={k}, largest cluster {w['largest_cluster']:,}")
    print(f"{'':28}{'warren':>12}{'baseline':>12}{'ratio':>9}")
    for label, key, higher in (("end-to-end rows/s", "rows_per_s", True),
                               ("pairwise GFLOP/s (full-eq.)", "pairwise_gflops", True),
                               ("dedup seconds", "dedup_s", False), ("peak RSS GB", "peak_rss_gb", False),
                               ("wall seconds", "wall_s", False)):
        ratio = w[key] / b[key] if higher else b[key] / w[key]
        print(f"{label:28}{w[key]:12.2f}{b[key]:12.2f}{ratio:8.2f}x")
    print(f"executed GFLOP/s (warren int8, upper triangle): {w['executed_gflops']:.1f}; "
          f"blocks skipped {w['skipped_blocks']}, pairs rechecked exactly {w['rechecked']:,}")
    for name, r in (("warren", w), ("baseline", b)):
        print(f"stage seconds, {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["stage_s"].items()))
        print(f"stage CPU seconds, {name}: "
              + ", ".join(f"{k} {v:.1f}" for k, v in r["stage_cpu_s"].items()))
    print(f"identical keep/drop decisions (coreset + rejects bytes): {identical}")
    if not identical:
        raise SystemExit("decisions differ between the arms")
    return {"n": a.n, "dim": a.dim, "k": k, "warren": w, "baseline": b, "identical": identical}


# -- finish and report memory against rows ---------------------------------------------
def bench_memory(a, work: str) -> dict:
    sizes = [int(x) for x in a.memory.split(",")]
    rows = []
    for n in sizes:
        src = os.path.join(work, f"src-{n}-{a.memory_dim}-{a.memory_avg}")
        make_source(src, n, a.memory_dim, a.seed, a.memory_avg)
        k = max(1, round(n / a.memory_avg))
        out = os.path.join(work, f"mem-{n}-{a.memory_dim}-{a.memory_avg}")
        if not os.path.exists(os.path.join(out, "stats.json")):
            warm_cache(src)
            print(f"  select on {n:,} x {a.memory_dim} (k={k})", file=sys.stderr)
            run = child(select_args(src, out, k))
        else:
            run = {"wall_s": float("nan"), "peak_rss_gb": float("nan")}
        cfg = json.load(open(os.path.join(out, "_work", "plan.json")))["config"]
        fin = child(["-c", "from pipelines import select\n"
                     f"select.stage_finish(select.SelectConfig.from_dict({cfg!r}), {src!r}, {out!r})"])
        rep = child(["-c", f"from pipelines import report\nreport.write({out!r})"])
        stats = json.load(open(os.path.join(out, "stats.json")))
        rows.append({"rows": n, "k": k, "run_s": run["wall_s"], "run_peak_gb": run["peak_rss_gb"],
                     "finish_s": fin["wall_s"], "finish_peak_gb": fin["peak_rss_gb"],
                     "report_s": rep["wall_s"], "report_peak_gb": rep["peak_rss_gb"],
                     "coreset_rows": stats["coreset_rows"], "rejected_rows": stats["rejected_rows"]})
    base = rows[0]
    print(f"\nfinish and report rerun alone on a finished run (x {a.memory_dim}, avg cluster "
          f"{a.memory_avg:,}); peak RSS as the child's VmHWM")
    print(f"{'rows':>11}{'k':>7}{'coreset':>10}{'rejects':>11}{'finish s':>10}{'finish GB':>11}"
          f"{'vs first':>9}{'report s':>10}{'report GB':>11}{'vs first':>9}")
    for r in rows:
        print(f"{r['rows']:>11,}{r['k']:>7}{r['coreset_rows']:>10,}{r['rejected_rows']:>11,}"
              f"{r['finish_s']:>10.1f}{r['finish_peak_gb']:>11.3f}"
              f"{r['finish_peak_gb'] / base['finish_peak_gb']:>8.2f}x{r['report_s']:>10.1f}"
              f"{r['report_peak_gb']:>11.3f}{r['report_peak_gb'] / base['report_peak_gb']:>8.2f}x")
    return {"memory": rows}


# -- end to end against SemDeDup's method --------------------------------------------------
def semdedup_method(src: str, out: str, k: int, eps: float, niter: int = 100, seed: int = 1234) -> None:
    """SemDeDup's method, re-derived (not its code): embeddings in memory, spherical
    faiss k-means, each row to its nearest centroid, clusters sorted by similarity to the
    centroid (hardest first kept), per cluster the float32 similarity matrix with its
    diagonal zeroed, its upper triangle's column maxima, and a row dropped when that
    maximum (its similarity to an earlier-ranked row) exceeds 1 - eps."""
    import glob

    import faiss
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    files = sorted(glob.glob(os.path.join(src, "img_emb", "*.npy")))
    x = np.concatenate([np.load(f).astype(np.float32) for f in files])
    uids = pa.concat_arrays([pq.read_table(f, columns=["key"]).column(0).combine_chunks()
                             for f in sorted(glob.glob(os.path.join(src, "metadata", "*.parquet")))])
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False)
    km.train(x)
    sim_to_cent, nearest = km.index.search(x, 1)
    sim_to_cent, nearest = sim_to_cent[:, 0], nearest[:, 0]
    keep = np.ones(len(x), bool)
    for c in range(k):
        members = np.flatnonzero(nearest == c)
        if len(members) < 2:
            continue
        members = members[np.argsort(sim_to_cent[members], kind="stable")]   # least similar first
        reps = torch.from_numpy(x[members])
        sim = reps @ reps.T
        sim.fill_diagonal_(0.0)
        col_max = torch.triu(sim, diagonal=1).max(dim=0).values
        keep[members[(col_max > 1 - eps).numpy()]] = False
    os.makedirs(out, exist_ok=True)
    pq.write_table(pa.table({"uid": uids.filter(pa.array(keep))}), os.path.join(out, "kept.parquet"))


def bench_semdedup(a, work: str) -> dict:
    n, dim, k = 200_000, 512, 16
    src = os.path.join(work, f"src-{n}-{dim}-12500")
    make_source(src, n, dim, a.seed, avg_cluster=12_500)
    warm_cache(src)
    res = {}
    for arm in a.semdedup_order.split(","):
        out = tempfile.mkdtemp(prefix=f"sd-{arm}-", dir=work)
        print(f"  running {arm} on {n:,} x {dim}, k={k}", file=sys.stderr)
        if arm == "warren":
            res[arm] = child(select_args(src, out, k))
            st = json.load(open(os.path.join(out, "stats.json")))
            res[arm]["stage_s"], res[arm]["stage_cpu_s"] = st["seconds"], st.get("cpu_seconds", {})
        else:
            res[arm] = child(["-c", "import sys; sys.path.insert(0, 'bench')\n"
                              "from select_coreset import semdedup_method\n"
                              f"semdedup_method({src!r}, {out!r}, {k}, eps={1 - 0.86})"])
    w, b = res["warren"], res["semdedup"]
    print(f"\nend to end on {n:,} x {dim} float16, k = {k} (each arm a fresh process)")
    print(f"{'':24}{'warren':>10}{'SemDeDup method':>17}{'ratio':>9}")
    print(f"{'wall seconds':24}{w['wall_s']:10.1f}{b['wall_s']:17.1f}{b['wall_s'] / w['wall_s']:8.1f}x")
    print(f"{'peak RSS GB':24}{w['peak_rss_gb']:10.2f}{b['peak_rss_gb']:17.2f}")
    print("warren stage seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in w["stage_s"].items()))
    print("warren stage CPU seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in w["stage_cpu_s"].items()))
    print(f"CPU seconds (user+sys of the whole process): warren {w['cpu_s']:.1f}, "
          f"SemDeDup method {b['cpu_s']:.1f}: {b['cpu_s'] / w['cpu_s']:.1f}x")
    return {"semdedup": {"warren": w, "baseline": b, "ratio": b["wall_s"] / w["wall_s"],
                         "cpu_ratio": b["cpu_s"] / w["cpu_s"]}}


# -- what the global dedup scope costs -------------------------------------------------------
def bench_global(a, work: str) -> dict:
    n, dim, k = 200_000, 512, 16
    src = os.path.join(work, f"src-{n}-{dim}-12500")
    make_source(src, n, dim, a.seed, avg_cluster=12_500)
    warm_cache(src)
    res = {}
    for scope in ("cluster", "global"):
        out = tempfile.mkdtemp(prefix=f"scope-{scope}-", dir=work)
        r = child(select_args(src, out, k, "--dedup-scope", scope))
        st = json.load(open(os.path.join(out, "stats.json")))
        visitors = sum(json.load(open(os.path.join(out, "_work", "_completions", f)))
                       .get("visitors", 0) for f in os.listdir(os.path.join(out, "_work", "_completions"))
                       if f.startswith("assign-"))
        res[scope] = {"wall_s": r["wall_s"], "stage_s": st["seconds"], "visitors": visitors,
                      "stage_cpu_s": st.get("cpu_seconds", {}),
                      "dedup_kept": st["funnel"]["dedup"], "cross": st["dedup"].get("cross_border")}
    c, g = res["cluster"], res["global"]
    print(f"\n--dedup-scope on {n:,} x {dim}, k = {k}")
    print(f"{'':26}{'cluster':>10}{'global':>10}")
    for key in ("assign", "dedup", "finish", "total"):
        print(f"{key + ' seconds':26}{c['stage_s'][key]:10.2f}{g['stage_s'][key]:10.2f}")
    for key in ("assign", "dedup", "finish"):
        print(f"{key + ' CPU seconds':26}{c['stage_cpu_s'][key]:10.2f}{g['stage_cpu_s'][key]:10.2f}")
    print(f"{'rows after dedup':26}{c['dedup_kept']:10,}{g['dedup_kept']:10,}")
    print(f"visitor rows (compared across a border): {g['visitors']:,} "
          f"({g['visitors'] / n:.2%} of rows); cross-border: {g['cross']}")
    return {"global_scope": res}


# -- GPU against 2 CPU cores -----------------------------------------------------------------
def bench_gpu(a, work: str) -> dict:
    n, dim = a.gpu_n, 768
    src = os.path.join(work, f"src-{n}-{dim}")
    make_source(src, n, dim, a.seed)
    k = max(1, round(n / 20_000))
    warm_cache(src)
    cuda_out = tempfile.mkdtemp(prefix="gpu-cuda-", dir=work)
    cpu_out = tempfile.mkdtemp(prefix="gpu-cpu-", dir=work)
    g = child(select_args(src, cuda_out, k, "--device", "cuda"))
    two = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}
    c = child(select_args(src, cpu_out, k, "--device", "cpu"), env=two,
              prefix=["taskset", "-c", "0,1"])
    same = same_bytes(cuda_out, cpu_out, ("coreset.parquet", "rejects.parquet", "centroids.npy"))
    print(f"\n{n:,} x {dim}, k = {k}: cuda {n / g['wall_s']:,.0f} rows/s, 2 CPU cores "
          f"{n / c['wall_s']:,.0f} rows/s: {c['wall_s'] / g['wall_s']:.1f}x; identical outputs: {same}")
    for name, out in (("cuda", cuda_out), ("cpu", cpu_out)):
        st = json.load(open(os.path.join(out, "stats.json")))["seconds"]
        print(f"stage seconds, {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in st.items()))
    if not same:
        raise SystemExit("cuda and cpu outputs differ")
    return {"gpu": {"cuda": g, "cpu": c, "identical": same}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="keeps generated sources between runs")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--memory", default=None, help="row counts for the finish/report memory rows")
    ap.add_argument("--memory-dim", type=int, default=64)
    ap.add_argument("--memory-avg", type=int, default=1000, help="average cluster size of those runs")
    ap.add_argument("--semdedup", action="store_true")
    ap.add_argument("--semdedup-order", default="semdedup,warren")
    ap.add_argument("--global-scope", action="store_true")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--gpu-n", type=int, default=1_000_000)
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args()
    if a.quick:
        a.n = 100_000
    work = a.workdir or tempfile.mkdtemp(prefix="warren-bench-")
    os.makedirs(work, exist_ok=True)
    result = {}
    if a.memory:
        result.update(bench_memory(a, work))
    if a.semdedup:
        result.update(bench_semdedup(a, work))
    if a.global_scope:
        result.update(bench_global(a, work))
    if a.gpu:
        result.update(bench_gpu(a, work))
    if not (a.memory or a.semdedup or a.global_scope or a.gpu):
        result.update(bench_pairwise(a, work))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()
