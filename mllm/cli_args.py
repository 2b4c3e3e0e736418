"""Command-line flags of the trainer, shared by `warren train` and `python -m mllm.train`
(what torchrun launches). Imports nothing heavy, so `warren --help` stays fast."""
from __future__ import annotations


def add_train_arguments(parser) -> None:
    parser.add_argument("--manifest", required=True, help="manifest.json listing the tables")
    parser.add_argument("--config", required=True, help="trainer YAML (see configs/train/)")
    parser.add_argument("--stage", type=int, choices=[1, 2], default=None,
                        help="1 = projector only, 2 = LoRA + projector (default: run.stage)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint of the stage")
    parser.add_argument("--output", default=None, help="output folder (default: run.output_dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. stage1.max_steps=10 (repeatable)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
