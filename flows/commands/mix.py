"""`warren mix`: build an instruction mix from a recipe file.

By default the pipeline runs in this process (no Prefect server to start: fastest for a
one-off build). `--prefect` runs the same steps through the Prefect flow `mix`
(flows/mix.py), which records the run and its tasks in Prefect. The recipe and the
output path are checked before Prefect starts, so a bad recipe is one line either way.
"""
from __future__ import annotations

HELP = "build an instruction mix (e.g. Bunny-695K) from a recipe: mix.parquet, rejects, stats, manifest"


def EPILOG() -> str:  # noqa: N802 — the CLI's name for a lazily built epilog
    from pipelines import config
    from pipelines.mix.recipe import Recipe
    return config.help_text(Recipe, "recipe keys (YAML; `sources` is a list of the sources.* groups):",
                            skip=("path",))


def add_arguments(p) -> None:
    p.add_argument("--recipe", required=True, help="recipe YAML (see configs/mix/)")
    p.add_argument("--output", required=True,
                   help="output folder, apart from every input (a rerun resumes only when the "
                        "sources, their settings and the image root are unchanged)")
    p.add_argument("--data-root", default=None,
                   help="folder the recipe's source paths and image_root resolve under "
                        "(default: the recipe's data_root, relative to the recipe file)")
    p.add_argument("--image-root", default=None, help="override the recipe's image_root")
    p.add_argument("--export-llava", default=None, metavar="FILE",
                   help="also write the mix as a LLaVA JSON list (.jsonl: JSON Lines)")
    p.add_argument("--restart", action="store_true",
                   help="start over: forget what an earlier run prepared in --output (needed when an input changed)")
    p.add_argument("--prefect", action="store_true", help="run through the Prefect flow `mix`")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    import json
    import sys

    from pipelines.mix import build, export, recipe

    r = recipe.load(args.recipe, data_root=args.data_root, image_root=args.image_root)
    build.check_paths(r, args.output, args.export_llava)
    if not args.restart:
        build.check_unchanged(r, args.output)     # a changed input is one line, before any work
    if args.prefect:
        from flows import apiserver, console
        verbose = getattr(args, "verbose", False)
        # Warren's own API server (a child that dies with this process), not Prefect's
        # temporary one, which would outlive a killed run.
        with apiserver.api():
            from flows.mix import mix, quiet_http_logs
            quiet_http_logs(verbose)
            console.quiet_prefect(verbose)
            stats = mix(recipe_path=args.recipe, output=args.output, data_root=args.data_root,
                        image_root=args.image_root, export_llava_path=args.export_llava,
                        restart=args.restart)
    else:
        stats = build.run(r, args.output, progress=not args.quiet, restart_run=args.restart)
        if args.export_llava:
            stats["exported"] = export.to_llava(f"{args.output.rstrip('/')}/mix.parquet", args.export_llava)
    for name, s in stats["sources"].items():
        print(f"{name}: {s['input']:,} in -> {s['kept']:,} kept, {s['rejected']:,} rejected "
              f"({', '.join(f'{k} {v:,}' for k, v in s['reasons'].items()) or 'none'})"
              + (f"; tasks: {', '.join(f'{k} {v:,}' for k, v in s['tasks'].items())}" if s.get("tasks") else ""),
              file=sys.stderr)
    out = args.output.rstrip("/")
    summary = {"mix": f"{out}/mix.parquet", "rejects": f"{out}/rejects.parquet",
               "stats": f"{out}/stats.json", "manifest": f"{out}/manifest.json",
               "kept": stats["kept"], "rejected": stats["rejected"],
               "text_only_share": stats["text_only_share"]}
    if args.export_llava:
        summary["llava"] = args.export_llava
        summary["exported"] = stats["exported"]
    print(json.dumps(summary))
    return 0
