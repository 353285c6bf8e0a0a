// Rotary embedding (rotate-half) of one head for the CPU kernels (cpu_ops.cpp's rope_store, and
// skinny_gemm.cpp's qkv product that rotates as it stores): one definition, so that both give the same bits.
#pragma once
#include "bf16.h"

namespace {

// x [2 half] in place: T(T(x * cos) + T(rotate_half(x) * sin)), as torch computes it in the model's dtype;
// c and s are the position's rows of the cos/sin tables.
template <typename T>
inline void rotate_half(T* x, const T* c, const T* s, int half) {
    int i0 = 0;
#ifdef __AVX512F__
    for (; i0 + 16 <= half; i0 += 16) {
        const __m512 x1 = load16(x + i0), x2 = load16(x + i0 + half);
        const __m512 lo = _mm512_add_ps(rnd16<T>(_mm512_mul_ps(x1, load16(c + i0))),
                                        rnd16<T>(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), load16(s + i0))));
        const __m512 hi = _mm512_add_ps(rnd16<T>(_mm512_mul_ps(x2, load16(c + i0 + half))),
                                        rnd16<T>(_mm512_mul_ps(x1, load16(s + i0 + half))));
        store16(x + i0, lo);
        store16(x + i0 + half, hi);
    }
#endif
#pragma omp simd
    for (int i = i0; i < half; ++i) {
        const float x1 = ld(x[i]), x2 = ld(x[i + half]);
        const float lo = rnd<T>(x1 * ld(c[i])) + rnd<T>(-x2 * ld(s[i]));
        const float hi = rnd<T>(x2 * ld(c[i + half])) + rnd<T>(x1 * ld(s[i + half]));
        x[i] = put<T>(lo);
        x[i + half] = put<T>(hi);
    }
}

}  // namespace
