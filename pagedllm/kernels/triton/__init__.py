"""Triton GPU kernels (attention.py: the KV store and paged attention). Imported only where the triton backend is
chosen: importing pagedllm never needs triton."""
