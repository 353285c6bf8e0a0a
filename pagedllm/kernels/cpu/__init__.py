"""Native CPU kernels: C++ sources (csrc/), their build and loader (build.py), one table of their C signatures
(signatures.py), and the Python wrappers: ops.py (fused element-wise steps, argmax, grammar masks),
skinny_gemm.py (decode-sized products), packed_linear.py (linear layers on oneDNN-packed weights and those
products), attention.py (paged decode and prefill attention), cpu_info.py (what this CPU can do)."""
