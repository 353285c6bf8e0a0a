"""Structured outputs: grammars that constrain what a request may generate.

params.py is plain Python (requests carry it through the engine); backend.py,
manager.py and bitmask.py compile grammars with xgrammar and apply them to
the logits, in the engine core's process only.
"""

from pagedllm.structured_output.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
