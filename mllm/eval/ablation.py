"""Comparing arms of an ablation: scores per arm, the difference to the baseline (the
random arm), and a paired bootstrap 95 % interval of that difference over questions.

Every arm answered the same questions, so the comparison is paired: per question, the
difference of the two arms' credits (the benchmark's `per_question`: 1/0 for exact
match and yes/no, VQA's min(#humans/3, 1), ...). The interval resamples questions with
replacement (`n_boot` times, seeded) and takes the 2.5 and 97.5 percentiles of the mean
difference. Differences are in points of mean credit (x 100); the benchmark's own
headline score and its difference are reported beside them.

    rows = compare(arms, baseline="random")        # list of dicts, ABLATION's columns
    write_table(rows, "ablation.parquet"); write_html(rows, "ablation.html", meta)
"""
from __future__ import annotations

import html
import io
import json
import math

import numpy as np
import pyarrow as pa

from pipelines import storage

ABLATION = pa.schema([
    pa.field("arm", pa.string(), nullable=False),
    pa.field("baseline", pa.string(), nullable=False),   # the arm differences are taken to
    pa.field("benchmark", pa.string(), nullable=False),
    pa.field("size", pa.int64(), nullable=False),        # training rows of the arm (its coreset)
    pa.field("n", pa.int64(), nullable=False),           # questions compared (paired)
    pa.field("key", pa.string()),                        # the headline score's dotted key
    pa.field("score", pa.float64()),                     # the headline score, official units
    pa.field("score_diff", pa.float64()),                # headline - baseline's headline
    pa.field("credit", pa.float64(), nullable=False),    # mean per-question credit x 100
    pa.field("diff", pa.float64(), nullable=False),      # credit - baseline's credit (points)
    pa.field("ci_low", pa.float64(), nullable=False),    # bootstrap 95 % interval of diff
    pa.field("ci_high", pa.float64(), nullable=False),
    pa.field("selection", pa.string(), nullable=False),  # how the arm was drawn (JSON)
])


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """(mean(a - b), low, high): the percentile bootstrap interval of the mean paired
    difference, resampling the pairs with replacement."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    n = len(d)
    if n == 0:
        raise ValueError("no paired questions to compare")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 4_000_000 // n)          # resamples per block: bounded memory at any n
    for s in range(0, n_boot, chunk):
        m = min(chunk, n_boot - s)
        means[s:s + m] = d[rng.integers(0, n, size=(m, n))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(d.mean()), float(lo), float(hi)


def compare(arms: dict[str, dict], baseline: str, n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """Rows of ABLATION. `arms[name]` = {"size": rows, "selection": {...}, "benchmarks":
    {bench: {"credits": {qid: credit}, "headline": (key, value) or None}}}; every arm
    must have the baseline's benchmarks. Questions are paired by id."""
    base = arms[baseline]
    rows = []
    for arm, info in arms.items():
        for bench in sorted(base["benchmarks"]):
            mine, ref = info["benchmarks"][bench], base["benchmarks"][bench]
            ids = [q for q in ref["credits"] if q in mine["credits"]]
            a = np.array([mine["credits"][q] for q in ids], np.float64)
            b = np.array([ref["credits"][q] for q in ids], np.float64)
            diff, lo, hi = paired_bootstrap(a, b, n_boot, seed)
            head, ref_head = mine.get("headline"), ref.get("headline")
            rows.append({
                "arm": arm, "baseline": baseline, "benchmark": bench, "size": int(info["size"]),
                "n": len(ids), "key": head[0] if head else None,
                "score": head[1] if head else None,
                "score_diff": head[1] - ref_head[1] if head and ref_head else None,
                "credit": 100.0 * float(a.mean()), "diff": 100.0 * diff,
                "ci_low": 100.0 * lo, "ci_high": 100.0 * hi,
                "selection": json.dumps(info.get("selection", {}), sort_keys=True)})
    return rows


def write_table(rows: list[dict], path: str) -> None:
    storage.write_table(pa.Table.from_pylist(rows, schema=ABLATION), path, ABLATION)


# -- the page ---------------------------------------------------------------------------------
def _plot(rows: list[dict]) -> str:
    """Differences to the baseline with their intervals, one panel per benchmark, as
    an inline SVG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = sorted({r["benchmark"] for r in rows})
    arms = [a for a in dict.fromkeys(r["arm"] for r in rows)]
    fig, axes = plt.subplots(1, len(benches), figsize=(4.2 * len(benches), 0.6 * len(arms) + 1.4),
                             squeeze=False)
    for ax, bench in zip(axes[0], benches):
        sub = [r for r in rows if r["benchmark"] == bench]
        y = np.arange(len(sub))[::-1]
        d = np.array([r["diff"] for r in sub])
        err = np.array([[r["diff"] - r["ci_low"] for r in sub], [r["ci_high"] - r["diff"] for r in sub]])
        colors = ["#888" if r["arm"] == r["baseline"] else
                  ("#2a7" if r["ci_low"] > 0 else "#c33" if r["ci_high"] < 0 else "#37c") for r in sub]
        for yi, di, lo_hi, col in zip(y, d, err.T, colors):
            ax.errorbar([di], [yi], xerr=[[lo_hi[0]], [lo_hi[1]]], fmt="o", color=col,
                        ecolor=col, capsize=4, lw=2)
        ax.axvline(0, color="#555", lw=1, ls="--")
        ax.set_yticks(y, [r["arm"] for r in sub])
        ax.set_title(bench)
        ax.set_xlabel(f"difference to {sub[0]['baseline']} (points, 95% CI)")
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})  # no date: same rows, same page
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


def _fmt(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{digits}f}" if isinstance(v, float) else html.escape(str(v))


def render_html(rows: list[dict], meta: dict) -> str:
    """One self-contained page: the arms, the table, the plot, how to read them."""
    e = html.escape
    baseline = rows[0]["baseline"] if rows else ""
    head = ["arm", "rows", "questions", "headline", "score", "Δ score", "credit", "Δ credit",
            "95% interval", "verdict"]
    body = []
    for bench in sorted({r["benchmark"] for r in rows}):
        body.append(f"<tr class='bench'><th colspan='{len(head)}'>{e(bench)}</th></tr>")
        for r in (x for x in rows if x["benchmark"] == bench):
            if r["arm"] == r["baseline"]:
                verdict = "baseline"
            elif r["ci_low"] > 0:
                verdict = "better"
            elif r["ci_high"] < 0:
                verdict = "worse"
            else:
                verdict = "no clear difference"
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in (
                e(r["arm"]), r["size"], r["n"], e(r["key"] or "—"), _fmt(r["score"], 4),
                _fmt(r["score_diff"], 4), _fmt(r["credit"]), _fmt(r["diff"]),
                f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]", verdict)) + "</tr>")
    arms = "".join(f"<li><b>{e(r['arm'])}</b>: {e(r['selection'])}</li>"
                   for r in {x["arm"]: x for x in rows}.values())
    facts = "".join(f"<li>{e(str(k))}: <code>{e(str(v))}</code></li>" for k, v in meta.items())
    plot = _plot(rows) if rows else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Ablation</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
td:first-child {{ text-align: left; }}
tr.bench th {{ background: #eef; text-align: left; }}
code {{ background: #f4f4f4; padding: 0 3px; }}
</style></head><body>
<h1>Ablation: same training, different data</h1>
<p>Each arm is a training set of the same size drawn from one source; every arm was
trained with the identical recipe and seed and evaluated on the same questions.</p>
<h2>How to read this</h2>
<ul>
<li><b>score</b> is the benchmark's headline in its official units; <b>credit</b> is the
mean per-question credit × 100 (what the interval is computed on).</li>
<li><b>Δ credit</b> is the arm's credit minus the <b>{e(baseline)}</b> arm's, question by
question (paired). The <b>95% interval</b> is a bootstrap over questions: resample the
questions with replacement, recompute the mean difference, take the 2.5th and 97.5th
percentiles.</li>
<li>An arm is <b>better</b> than {e(baseline)} when its whole interval lies above 0,
<b>worse</b> when it lies below 0; an interval that contains 0 means these questions
cannot tell the arms apart. The interval covers question sampling only, not training
noise (one seed per arm).</li>
</ul>
<h2>Arms</h2><ul>{arms}</ul>
<h2>Scores</h2>
<table><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>{''.join(body)}</table>
<h2>Differences to {e(baseline)}</h2>
{plot}
<h2>Run</h2><ul>{facts}</ul>
</body></html>
"""


def write_html(rows: list[dict], path: str, meta: dict) -> str:
    storage.write_bytes(path, render_html(rows, meta).encode("utf-8"))
    return path

