"""`warren import-tinygptv`: a TinyGPT-V checkpoint as a Warren model folder."""
from __future__ import annotations

HELP = "load a TinyGPT-V checkpoint (.pth) onto Warren's model and write an export folder"


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="TinyGPT-V checkpoint: checkpoint_N.pth, TinyGPT-V_for_StageN.pth, "
                                           "or a .safetensors state dict")
    parser.add_argument("--output", required=True, help="the export folder to write")
    parser.add_argument("--lm", default="microsoft/phi-2",
                        help="base Phi-2 weights in transformers' layout (hub name or folder)")
    parser.add_argument("--blip2", default="Salesforce/blip2-flan-t5-xxl",
                        help="BLIP-2 weights for the EVA tower and the Q-Former (hub name or folder)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer (default: --lm)")
    parser.add_argument("--stage", type=int, choices=[1, 2, 3, 4], default=None,
                        help="TinyGPT-V stage the checkpoint is from (default: read from its config); "
                             "picks the prompt format and image size (stage 4: 448 px)")
    parser.add_argument("--image-size", type=int, default=None, help="override the image size")
    parser.add_argument("--template", default=None,
                        help="override the prompt template (tinygptv-pretrain, tinygptv-instruct, tinygptv)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--lora-alpha", type=float, default=None,
                        help="LoRA alpha when the checkpoint has no config (TinyGPT-V: 16)")


def run(args) -> int:
    import json
    import os

    from mllm import tinygptv_checkpoint
    from pipelines.errors import OutputError
    from pipelines.runkey import check_apart

    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise OutputError(args.output, "it exists and is not a folder")
    # the export replaces --output whole: it must not hold the checkpoint or base weights
    check_apart(args.output, [p for p in (args.checkpoint, args.lm, args.blip2, args.tokenizer)
                              if p and os.path.exists(p)])
    summary = tinygptv_checkpoint.import_checkpoint(
        args.checkpoint, args.output, lm=args.lm, blip2=args.blip2, tokenizer=args.tokenizer,
        stage=args.stage, image_size=args.image_size, template=args.template, dtype=args.dtype,
        lora_alpha=args.lora_alpha)
    print(json.dumps(summary))
    return 0
