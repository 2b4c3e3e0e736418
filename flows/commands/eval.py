"""`warren eval`: ask a model the standard benchmarks, or score an answers file alone.

    warren eval --model DIR --benchmark NAME[,NAME...] --data PATH --output DIR
                [--batch-size N] [--workers N] [--limit N] [--device auto]
    warren eval score --benchmark NAME --data PATH --answers FILE [--limit N]

`score` prints one JSON object, {"benchmark", "n", "scores"}, each score in the official
script's unit and precision; it reads LLaVA's, Bunny's and Warren's answers.jsonl alike.
"""
from __future__ import annotations

HELP = "evaluate a model on VLM benchmarks, or score an answers file (`warren eval score`)"


def _limit(text: str) -> int:
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_arguments(p) -> None:
    p.add_argument("--model", metavar="DIR", help="an exported model folder (warren export / train's final/)")
    p.add_argument("--benchmark", metavar="NAME[,NAME...]", help="benchmark name(s), comma-separated: pope, scienceqa, gqa, "
                                       "textvqa, vqav2, mme, mmbench, seed, vizwiz, vsr, hateful_memes")
    p.add_argument("--data", metavar="PATH", help="the eval root (LLaVA's playground/data/eval/), or one "
                                  "benchmark's own folder")
    p.add_argument("--output", metavar="DIR", help="output folder: answers, results.json, scores.parquet "
                                    "(a rerun resumes in it)")
    p.add_argument("--batch-size", metavar="N", type=int, default=16, help="questions per generation batch")
    p.add_argument("--workers", metavar="N", type=int, default=2, help="image-decoding worker processes")
    p.add_argument("--limit", metavar="N", type=_limit, default=None,
                   help="ask only the first N questions of each benchmark")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--restart", action="store_true",
                   help="start the benchmarks over (drop their answers in --output)")
    p.add_argument("--max-new-tokens", metavar="N", type=_limit, default=None,
                   help="cap every answer at N tokens (default: each benchmark's own budget)")
    sub = p.add_subparsers(dest="eval_action", metavar="score", required=False)
    s = sub.add_parser("score", help="score an answers.jsonl as the official script does",
                       description="Score an answers.jsonl (LLaVA's form) as the benchmark's "
                                   "official script does; prints one JSON object.")
    s.add_argument("--benchmark", dest="score_benchmark", metavar="NAME", required=True,
                   help="benchmark name")
    s.add_argument("--data", dest="score_data", metavar="PATH", required=True,
                   help="the eval root (LLaVA's playground/data/eval/), or the benchmark's folder")
    s.add_argument("--answers", metavar="FILE", required=True, help="answers.jsonl (question_id, prompt, text, ...)")
    s.add_argument("--limit", dest="score_limit", metavar="N", type=_limit, default=None,
                   help="score as if the question file held only its first N questions")


def run(args) -> int:
    if getattr(args, "eval_action", None) == "score":
        return _score(args)
    return _evaluate(args)


def _score(args) -> int:
    import json

    from mllm.eval import scoring

    result = scoring.score(args.score_benchmark, args.score_data, args.answers, args.score_limit)
    print(json.dumps(result))
    return 0


def _evaluate(args) -> int:
    import json

    from mllm.eval import scoring
    from pipelines.errors import ConfigError, WarrenError

    missing = [flag for flag, value in (("--model", args.model), ("--benchmark", args.benchmark),
                                        ("--data", args.data), ("--output", args.output))
               if not value]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)} (or score an answers file: "
                          "`warren eval score --benchmark NAME --data PATH --answers FILE`)")
    names = [n.strip() for n in args.benchmark.split(",") if n.strip()]
    for name in names:                         # fail before any model loads
        scoring.get(name).root(args.data)
    try:
        from mllm.eval.run import evaluate
    except ModuleNotFoundError as e:
        if e.name not in ("mllm.eval.run",):
            raise
        raise WarrenError("this install has no evaluation engine (mllm.eval.run); "
                          "`warren eval score` still scores answers files") from None
    result = evaluate(model=args.model, benchmarks=names, data=args.data, output=args.output,
                      batch_size=args.batch_size, workers=args.workers, limit=args.limit,
                      device=args.device, progress=True, restart=args.restart,
                      max_new_tokens=args.max_new_tokens)
    print(json.dumps(result, default=str))
    return 0
