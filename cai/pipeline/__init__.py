"""The batch pipeline: ``python -m cai.pipeline run pipelines/<recipe>.yaml [--set key=value ...]``.

A recipe's stages run over whole batches and record their output in a run store
(:mod:`cai.store`), so a job killed at any moment resumes when re-run with the same
command, and ``--shard k/n`` splits it across machines.
"""
