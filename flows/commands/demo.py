"""`warren demo`: build a small LAION-like pool, serve it locally, curate it, build the
stage-1 table and the instruction mix, train the tiny VLM and ask it one question.

`warren demo --serve-pool DIR` serves a pool a demo already drew (e.g. runs/demo/source)
on 127.0.0.1 again, writes its metadata for that address and prints the curate command
to run against it; it serves until interrupted. (The demo's own server lives only as
long as the demo: its metadata's URLs are dead once it ends.)"""
from __future__ import annotations

HELP = "the whole system on a generated pool served on 127.0.0.1 (tiny random CLIP; minutes on a laptop)"


def add_arguments(p) -> None:
    p.add_argument("--output", default="runs/demo", help="demo folder (default runs/demo)")
    p.add_argument("--n", type=int, default=3000, help="pool rows to generate")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of configs/curate/demo.yaml (repeatable)")
    p.add_argument("--train-steps", type=int, default=30,
                   help="optimizer steps per training stage (0: stop after the mix)")
    p.add_argument("--serve-pool", default=None, metavar="DIR",
                   help="only serve an existing demo pool (DIR: a demo's source/ folder) on "
                        "127.0.0.1 until interrupted, and print the curate command for it")
    p.add_argument("--port", type=int, default=0,
                   help="--serve-pool: port to listen on (default: a free one)")


def serve_pool(root: str, port: int = 0, log=print, ready=None) -> int:
    """Serve `root` and keep serving until interrupted; `ready(base_url, metadata)` (tests)
    is called once the metadata for this address is written."""
    import os
    import time

    from pipelines import storage
    from pipelines.errors import InputError
    from pipelines.synth import demo_pool

    if not storage.exists(storage.join(root, "truth.parquet")):
        raise InputError("not a demo pool (no truth.parquet; a demo's pool is <output>/source)",
                         path=root)
    with demo_pool.serve(root, port) as base:
        meta = demo_pool.write_metadata(root, base)
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        config = os.path.relpath(os.path.join(here, "configs", "curate", "demo.yaml"))
        out = os.path.join(os.path.dirname(os.path.abspath(root).rstrip(os.sep)), "curate-again")
        log(f"serving the demo pool {root} at {base} (Ctrl-C to stop)")
        log(f"metadata: {meta}")
        log(f"curate it: warren curate --config {config} --set source.path={meta} --output {out}")
        if ready is not None:
            ready(base, meta)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            log("stopped")
    return 0


def run(args) -> int:
    import json
    import logging
    import sys

    from pipelines.errors import set_setting_style

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.serve_pool:
        return serve_pool(args.serve_pool, args.port, log)

    set_setting_style("set")            # hints name `--set select.k=`
    from flows import apiserver, console
    console.enable(True)
    with apiserver.api():
        from flows import demo
        from flows.curate import summarize
        console.quiet_prefect(args.verbose)
        # keep the console to the flow's own lines (the CLI logs at INFO)
        logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)
        try:
            r = demo.demo_flow(args.output, n=args.n, sets=args.overrides, log=log,
                               train_steps=args.train_steps)
        finally:
            from pipelines import embed
            embed.shutdown()
    paths = r.curate["paths"]
    log(f"funnel: {summarize(r.curate)}")
    log(demo.MODEL_NOTE)
    log(f"coreset:  {paths['coreset']}  ({r.curate['coreset_rows']:,} rows)")
    log(f"images:   {paths['images']}")
    log(f"rejects:  {paths['rejects']}  ({r.curate['rejected_rows']:,} rows, with stage and reason)")
    log(f"manifest: {paths['manifest']}")
    log(f"report:   {paths['report']}")
    out = {"output": r.output, **paths}
    mp = r.mix["paths"]
    log(f"stage-1:  {mp['stage1']}  ({r.mix['stage1']['kept']:,} rows)")
    log(f"mix:      {mp['mix']}  ({r.mix['mix']['kept']:,} rows; rejects {mp['mix_rejects']})")
    log(f"training manifest: {mp['manifest']}")
    out.update(stage1=mp["stage1"], mix=mp["mix"], mix_rejects=mp["mix_rejects"],
               train_manifest=mp["manifest"])
    if r.train is not None:
        q = r.train["coreset_question"]
        log(f"model:    {r.train['model']}")
        log(f"ask it:   warren generate --checkpoint {r.train['model']} --image {q['image']} "
            f"--prompt '{q['question']}'")
        out.update(model=r.train["model"], answer=q["answer"], question_image=q["image"],
                   metrics=r.train["stage2"]["metrics"], loss_plot=r.train["stage2"]["plot"])
    if r.eval is not None:
        log(f"eval:     {r.output}/eval/results.json, scores.parquet, <benchmark>/answers.jsonl")
        out.update(eval=f"{r.output}/eval", eval_data=f"{r.output}/bench")
    log("done in " + ", ".join(f"{k} {v:.0f} s" for k, v in r.seconds.items() if k != "total")
        + f": {r.seconds['total']:.0f} s in all; run folder {r.output}")
    print(json.dumps(out))
    return 0
