"""`warren generate`: answer a prompt about an image with a trained model."""
from __future__ import annotations

HELP = "answer a prompt about an image with an exported model (greedy decoding)"


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="an exported model folder (<run>/stage2/final), or a run/stage "
                             "folder, whose latest final model is used")
    parser.add_argument("--image", default=None, help="image file (omit for a text-only prompt)")
    parser.add_argument("--prompt", required=True, help="the question or instruction")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weight dtype (default: as exported)")
    parser.add_argument("--quantize", default="none", choices=["none", "int8-dynamic", "8bit", "4bit"],
                        help="LM weights for small devices: int8-dynamic (CPU, torch.ao), "
                             "8bit / 4bit (CUDA, bitsandbytes through quantization_config)")


def run(args) -> int:
    import os

    from mllm import export, generate, quantize
    from pipelines.errors import InputError

    folder = args.checkpoint
    for candidate in (folder, os.path.join(folder, "final"), os.path.join(folder, "stage2", "final"),
                      os.path.join(folder, "stage1", "final")):
        if os.path.exists(os.path.join(candidate, export.META)):
            folder = candidate
            break
    if args.image is not None and not os.path.isfile(args.image):
        raise InputError("image file not found", path=args.image)
    loaded = quantize.load(folder, args.quantize, dtype=args.dtype, device=args.device)
    print(generate.answer(loaded, args.image, args.prompt, args.max_new_tokens))
    return 0
