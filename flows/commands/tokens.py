"""`warren tokens`: how a conversation file is fed to the model, record by record."""
from __future__ import annotations

HELP = ("show the input_ids and labels a template gives each record of a LLaVA JSON/JSONL "
        "file or a mix.parquet (image = one -200, untrained = -100)")


def add_arguments(p) -> None:
    p.add_argument("--input", required=True, help="LLaVA JSON or JSON Lines file, or a mix.parquet")
    p.add_argument("--template", required=True, help="template name (plain, bunny, vicuna_v1, llama3, qwen2, ...)")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer folder (or hub name) AutoTokenizer loads; <image> is added as the trainer adds it")
    p.add_argument("--jsonl", default=None, metavar="OUT",
                   help="write one JSON line per record here (default: stdout, unless --show is given)")
    p.add_argument("--show", type=int, default=0, metavar="N",
                   help="print the first N records for a person: trained tokens in colour on a "
                        "terminal, inside [ ] otherwise")


def run(args) -> int:
    import json
    import sys

    from mllm import templates, tokens
    from mllm import tokenizer as tok_mod
    from pipelines import storage
    from pipelines.errors import InputError

    template = templates.get(args.template)
    try:
        tokenizer = tok_mod.load(args.tokenizer)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load a tokenizer ({str(e).splitlines()[0]})", path=args.tokenizer) from None
    template.check_tokenizer(tokenizer)
    if args.show < 0:
        raise InputError("--show must be >= 0")
    write_stdout = args.jsonl is None and not args.show
    colour = sys.stdout.isatty()
    counts = {"records": 0, "encoded": 0, "errors": 0}

    def lines(out):
        for k, line in enumerate(tokens.dump(args.input, template, tokenizer)):
            if out is None and k >= args.show:
                break  # --show alone: only the first N records
            counts["records"] += 1
            counts["errors" if "error" in line else "encoded"] += 1
            if out is not None:
                out.write((json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode())
            if k < args.show:
                print(tokens.show(line, tokenizer, colour), flush=True)

    if args.jsonl is not None:
        with storage.atomic_open(args.jsonl, "wb") as f:
            lines(f)
    else:
        lines(sys.stdout.buffer if write_stdout else None)
    where = f" -> {args.jsonl}" if args.jsonl else ""
    print(f"tokens: {counts['records']:,} records, {counts['encoded']:,} encoded, "
          f"{counts['errors']:,} errors{where}", file=sys.stderr)
    return 0
