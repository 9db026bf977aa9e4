"""Batch jobs: send every line of a JSONL file once, resumably, and write each answer.

``await trio_llm.run_batch(input_path, output_path, client=client)`` or, from a shell,
``trio-llm batch INPUT.jsonl -o OUTPUT.jsonl`` (``via="provider"`` / ``--via provider``:
through the provider's Batch API). See ``docs/batch.md``.
"""

from ._runner import DEFAULT_MAX_CONSECUTIVE_FAILURES as DEFAULT_MAX_CONSECUTIVE_FAILURES
from ._runner import BatchSummary as BatchSummary
from ._runner import ProviderBatch as ProviderBatch
from ._runner import ViaProvider as ViaProvider
from ._runner import run_batch as run_batch

__all__ = [
    "DEFAULT_MAX_CONSECUTIVE_FAILURES",
    "BatchSummary",
    "ProviderBatch",
    "ViaProvider",
    "run_batch",
]
