"""Evaluation on the standard VLM benchmarks, scored as their official scripts score them.

    mllm.eval.types       Question, Benchmark (the contract between loaders and the engine)
    mllm.eval.benchmarks  one module per benchmark: its loader and its official metric
"""
