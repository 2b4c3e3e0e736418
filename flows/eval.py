"""Prefect flow `eval`: answer and score benchmarks with an exported model.

The flow wraps `mllm.eval.run.evaluate` (what `warren eval` runs) in one task, then
publishes the scores as a table artifact (`eval-scores`: benchmark, key, value, n) and
a markdown artifact (`eval-summary`) on the flow run. Outputs are evaluate's:
`<output>/<benchmark>/answers.jsonl`, `results.json`, `scores.parquet`, and the scores
in the model's lineage (its model card). A retried run resumes: answered questions are
not asked again.

Served by `warren serve` as the deployment `eval/eval` (and listed in prefect.yaml):

    prefect deployment run 'eval/eval' --param model=runs/demo/train/stage2/final \\
        --param 'benchmarks=["pope","gqa"]' --param data=runs/demo/bench \\
        --param output=runs/demo/eval-again --watch
"""
from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE


@task(name="evaluate", cache_policy=NO_CACHE, persist_result=False)
def evaluate_task(model: str, benchmarks: list[str], data: str, output: str, batch_size: int,
                  workers: int, limit: int | None, device: str, restart: bool = False,
                  max_new_tokens: int | None = None) -> dict:
    from mllm.eval import run
    return run.evaluate(model=model, benchmarks=benchmarks, data=data, output=output,
                        batch_size=batch_size, workers=workers, limit=limit, device=device,
                        progress=False, restart=restart, max_new_tokens=max_new_tokens)


def score_rows(results: dict) -> list[dict]:
    """One row per score (what scores.parquet holds), for the table artifact."""
    from mllm.eval.run import flatten
    return [{"benchmark": b, "key": k, "value": v, "n": r["n"]}
            for b, r in sorted(results["benchmarks"].items()) for k, v in flatten(r["scores"])]


def summary_markdown(results: dict, names: list[str] | None = None) -> str:
    lines = [f"# Evaluation of `{results['model']}`", "",
             "| benchmark | headline | value | n | questions/s |", "|---|---|---:|---:|---:|"]
    for b, r in sorted(results["benchmarks"].items()):
        if names is not None and b not in names:
            continue
        head = r.get("headline") or {}
        qps = r.get("questions_per_s")
        lines.append(f"| {b} | {head.get('key', '')} | {head.get('value', '')} | {r['n']} | "
                     f"{'' if qps is None else qps} |")
    lines += ["", f"Answers: `<output>/<benchmark>/answers.jsonl`; every score in "
              f"`scores.parquet` and the `eval-scores` table artifact."]
    return "\n".join(lines)


def publish(results: dict, names: list[str] | None = None, key_prefix: str = "eval") -> None:
    """The scores as Prefect artifacts on the current flow run."""
    rows = [r for r in score_rows(results) if names is None or r["benchmark"] in names]
    create_table_artifact(rows, key=f"{key_prefix}-scores",
                          description=f"scores of {results['model']}")
    create_markdown_artifact(summary_markdown(results, names), key=f"{key_prefix}-summary",
                             description=f"evaluation of {results['model']}")


@flow(name="eval", log_prints=True)
def eval_flow(model: str, benchmarks: list[str] | str, data: str, output: str,
              batch_size: int = 16, workers: int = 2, limit: int | None = None,
              device: str = "auto", restart: bool = False,
              max_new_tokens: int | None = None) -> dict:
    """Answer and score `benchmarks` (a list, or comma-separated names) from `data`
    (LLaVA's playground/data/eval layout) into `output`; returns results.json's content."""
    from mllm.eval.run import benchmark_names
    names = benchmark_names(benchmarks)
    log = get_run_logger()
    res = evaluate_task(model, names, data, output, batch_size, workers, limit, device, restart,
                        max_new_tokens)
    for b in names:
        r = res["benchmarks"][b]
        head = r.get("headline")
        log.info("%s: %d questions (%d asked now)%s", b, r["n"], r["asked"],
                 f", {head['key']} {head['value']:.4g}" if head else "")
    publish(res, names)
    return res


def deployment():
    """`eval/eval` for `warren serve`: every parameter is given at run time."""
    return eval_flow.to_deployment(name="eval", tags=["warren", "eval"],
                                   description="answer and score benchmarks with an exported model")
