"""One module per benchmark; importing this package registers them all in
`mllm.eval.types.REGISTRY`.

    pope, scienceqa, gqa, textvqa, vqav2, mme, mmbench, seed, vizwiz, vsr, hateful_memes

Each reads its published layout (docs/eval.md) and scores as its official script does.
`fixtures` writes small synthetic copies of those layouts (tests, the demo).
"""
from mllm.eval.benchmarks import (gqa, hateful_memes, mmbench, mme, pope, scienceqa,  # noqa: F401
                                  seed, textvqa, vizwiz, vqav2, vsr)
