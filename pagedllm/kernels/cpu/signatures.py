"""The C signature of every native CPU function, in one table.

Each library is one source in csrc/ (`csrc/<name>.cpp`); `build.load(name)`
compiles it, loads it and sets the argtypes and restype of each function
listed here before any wrapper calls it. A function a source exports must be
listed here to be called: ctypes would otherwise pass every argument as a C
int.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


@dataclass(frozen=True)
class Library:
    fast_math: bool  # compiled with -ffast-math (build.py says what that changes)
    functions: dict  # name -> (argtypes, restype)


_DECODE = [p, i64, p, p, p, i64, p, p, i32, i32, i32, i32, i32, f32, i32, f32]
_DECODE_INT8 = [p, i64, p, p, i64, p, i64, p, p, i32, i32, i32, i32, i32, f32, i32, f32]
_ROPE_STORE = [p, i64, i32, p, p, p, i32, i32, i32, p, p, p]

LIBRARIES: dict[str, Library] = {
    # Fused element-wise steps (ops.py): rounded as torch rounds, so no fast math.
    "cpu_ops": Library(fast_math=False, functions={
        "rms_norm_bf16": ([p, i64, p, p, p, i32, i32, f32], None),
        "rms_norm_f32": ([p, i64, p, p, p, i32, i32, f32], None),
        "rms_norm_bf16_widened": ([p, i32, i64, p, p, p, i32, i32, i32, f32], None),
        "rope_store_bf16": (_ROPE_STORE, None),
        "rope_store_f32": (_ROPE_STORE, None),
        "rope_store_int8_bf16": (_ROPE_STORE + [i64, i32], None),
        "rope_store_int8_f32": (_ROPE_STORE + [i64, i32], None),
        "silu_and_mul_bf16": ([p, p, i32, i32], None),
        "silu_and_mul_f32": ([p, p, i32, i32, i32], None),
        "argmax_rows_f32": ([p, i64, i32, i32, p], None),
        "apply_token_bitmask_f32": ([p, i64, p, i64, p, i32, i32], None),
    }),
    # Decode-sized products (skinny_gemm.py).
    "skinny_gemm": Library(fast_math=False, functions={
        "skinny_gemm_available": ([], i32),
        "skinny_gemm_pairs_native": ([], i32),
        "skinny_gemm": ([p, i32, i64, i32, i32, p, i32, i32, p, p, i32, i64], None),
        "skinny_gemm_pairs": ([p, i32, i64, i32, i32, p, i32, p, p, i32, i64, p, p, f32], None),
        "skinny_gemm_pairs_silu": ([p, i32, i64, i32, i32, p, i32, p, p, i64, p, p, f32], i32),
        "skinny_gemm_pairs_qkv_rope": ([p, i32, i64, i32, i32, p, i32, p, p, i64, p, p, f32, p, p, p, i32, i32, i32, p, p, p],
                                       i32),
    }),
    # Decode attention (attention.py); int8 entry points return non-zero for an unsupported head size.
    "paged_attention": Library(fast_math=True, functions={
        "paged_decode_f32": (_DECODE, None),
        "paged_decode_bf16": (_DECODE, None),
        "paged_decode_int8_f32": (_DECODE_INT8, i32),
        "paged_decode_int8_bf16": (_DECODE_INT8, i32),
        "paged_decode_int8_supported": ([i32], i32),
    }),
    # Prefill attention (attention.py); returns non-zero for an unsupported head size.
    "prefill_attention": Library(fast_math=False, functions={
        "paged_prefill_bf16": ([p, i64, p, p, p, i64, p, p, p, i32, i32, i32, i32, i32, f32, i32, f32], i32),
        "paged_prefill_int8_bf16": ([p, i64, p, p, i64, p, i64, p, p, p, i32, i32, i32, i32, i32, f32, i32, f32], i32),
        "paged_prefill_bf16_supported": ([i32], i32),
    }),
}
