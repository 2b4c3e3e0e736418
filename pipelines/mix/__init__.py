"""The instruction mix: recipe-driven, streamed, validated (Bunny-695K and friends).

    recipe.load(path) -> Recipe          configs/mix/*.yaml into frozen dataclasses
    build.run(recipe, output) -> stats   mix.parquet, rejects.parquet, stats.json, manifest.json
    export.to_llava(mix, path)           mix.parquet back to a LLaVA JSON list (or JSON Lines)
    stage1.run(cfg, coreset, output)     a curation coreset as a stage-1 caption table (MIX schema)
    tasks                                TinyGPT-V task identifiers and boxes (tags MIX records)
(synthetic sources in the real formats: pipelines.synth.mix)

Modules: readers (streamed JSON list / JSON Lines, format adapters, the LLaVA/Bunny
normalisation of turns and image paths), validate (per-record rules, duplicate and
sampling keys), images (the image root listed once, header checks in parallel), build
(prepare per source, keyed by its inputs; assemble). No Prefect here; flows/mix.py wires
the steps.
"""
