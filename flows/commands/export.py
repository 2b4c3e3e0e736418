"""`warren export`: a trained model in a format other tools load as it is."""
from __future__ import annotations

HELP = ("write a trained model as transformers' Llava (--format llava-hf): "
        "LlavaForConditionalGeneration and AutoProcessor load the folder, no trust_remote_code")


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="an exported model folder (<run>/stage2/final), or a run/stage folder, "
                             "whose latest final model is used")
    parser.add_argument("--format", required=True, choices=["llava-hf"],
                        help="llava-hf: config.json + safetensors + processor + chat template")
    parser.add_argument("--output", required=True, help="folder to write (replaced if it holds an export)")
    parser.add_argument("--drop-head-bias", action="store_true",
                        help="export an LM whose output head has a bias (Phi) although Llava's lm_head "
                             "has none: every logit shifts by that bias; the model card records it")


def resolve(path: str) -> str:
    """An export folder, or the newest final model under a run or stage folder."""
    import os

    from mllm import export
    from pipelines.errors import InputError
    for candidate in (path, os.path.join(path, "final"), os.path.join(path, "stage2", "final"),
                      os.path.join(path, "stage1", "final")):
        if os.path.isdir(candidate) and export.kind(candidate) is not None:
            return candidate
    if not os.path.exists(path):
        raise InputError("not found", path=path)
    raise InputError("not a model folder (no warren_vlm.json or Llava config.json here, nor in "
                     "final/, stage2/final/ or stage1/final/)", path=path)


def run(args) -> int:
    import json

    from mllm import export, lineage, llava_hf
    from pipelines.runkey import check_apart

    folder = resolve(args.checkpoint)
    check_apart(args.output, [folder])
    loaded = export.load(folder)
    out = llava_hf.save(loaded.model, loaded.tokenizer, loaded.template, args.output,
                        loaded.meta.get("image_aspect", "pad"), loaded.model_cfg,
                        drop_head_bias=args.drop_head_bias, lineage_doc=lineage.read(folder),
                        source=folder)
    print(json.dumps({"format": args.format, "from": folder, "output": out,
                      "template": loaded.template.name,
                      "image_tokens": loaded.model.num_image_tokens}))
    return 0
