"""`warren train`: one stage of the VLM trainer on what a manifest lists."""
from __future__ import annotations

HELP = ("train the VLM on a manifest: stage 1 (projector) or 2 (LoRA); "
        "for DDP run `torchrun --nproc_per_node N -m mllm.train` with the same flags")


def add_arguments(parser) -> None:
    from mllm.cli_args import add_train_arguments
    add_train_arguments(parser)


def run(args) -> int:
    import json

    from mllm import config as config_mod
    from mllm import train

    cfg = config_mod.load(args.config, dict(config_mod.parse_override(o) for o in args.set))
    summary = train.train(cfg, args.manifest, args.output, args.stage, args.resume,
                          progress=not args.no_progress, device=args.device)
    print(json.dumps(summary, indent=2, default=str))
    return 0
