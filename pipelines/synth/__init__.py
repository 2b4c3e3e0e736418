"""Synthetic data, all in one place: nothing here is needed on real data.

    embeddings   LAION-layout embeddings with planted clusters and duplicates (`warren synth-embeddings`)
    demo_pool    the demo's procedurally drawn image pool and its local HTTP server
    mix          instruction sources in the published LLaVA / SVIT / WizardLM formats, 1/N scale
"""
