"""Side-by-side and component benchmarks, each a module run from the repository root: python -m benchmarks.NAME.

A package so that the scripts import one another (benchmarks.report) and the tests import them
(from benchmarks import sharing) without path edits. Not installed with pagedllm: pyproject.toml
packages only pagedllm*.
"""
