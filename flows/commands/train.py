"""`warren train`: one stage of the VLM trainer on what a manifest lists."""
from __future__ import annotations

HELP = ("train the VLM on a manifest: stage 1 (projector) or 2 (LoRA); "
        "for DDP run `torchrun --nproc_per_node N -m mllm.train` with the same flags")


def EPILOG() -> str:  # noqa: N802 — the CLI's name for a lazily built epilog
    from mllm import config as config_mod
    return config_mod.help_text()


def add_arguments(parser) -> None:
    from mllm.cli_args import add_train_arguments
    add_train_arguments(parser)


def run(args) -> int:
    import json

    from mllm import config as config_mod
    from pipelines.errors import set_setting_style

    set_setting_style("set")
    cfg = config_mod.load(args.config, list(args.set))
    from mllm import train
    summary = train.train(cfg, args.manifest, args.output, args.stage, args.resume,
                          progress=not args.no_progress, device=args.device)
    print(json.dumps(summary, indent=2, default=str))
    return 0
