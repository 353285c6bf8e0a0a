// RMSNorm of one row for the CPU kernels (cpu_ops.cpp's rms_norm, and skinny_gemm.cpp's products that
// normalise their input rows as they pack them): one definition, so that both give the same bits.
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "bf16.h"

namespace {

// out = weight * T(h * rsqrt(mean(h^2) + eps)), where h = x, or, with a residual,
// h = T(x + residual), which is also written back to residual (the stream that
// the next layer adds to). As transformers' LlamaRMSNorm: h in float32, the
// normalised row rounded to the model's dtype before the scale.
// In and Out are T, or float for a bf16 model whose neighbours compute in float32
// (widened projections, packed_linear.py): x then comes unrounded and is rounded
// to T as it is read, and out holds T's values in float32; the same values either way.
// This is one row: xr [dim] (and res [dim], or null) -> o [dim].
template <typename T, typename In, typename Out>
inline void rms_norm_row(const In* xr, T* res, const T* weight, Out* o, int dim, float eps) {
    // h goes into o first: o is ours, and the row is read twice.
    float sum = 0.0f;
    int i0 = 0;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (; i0 + 16 <= dim; i0 += 16) {
        __m512 h = load16(xr + i0);
        if constexpr (!std::is_same_v<In, T>) h = rnd16<T>(h);  // only float32 input needs rounding
        if (res != nullptr) {
            h = rnd16<T>(_mm512_add_ps(h, load16(res + i0)));
            store16(res + i0, h);
        }
        store16(o + i0, h);
        acc = _mm512_fmadd_ps(h, h, acc);
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
#pragma omp simd reduction(+ : sum)
    for (int i = i0; i < dim; ++i) {
        float h = ld(xr[i]);
        if constexpr (!std::is_same_v<In, T>) h = rnd<T>(h);
        if (res != nullptr) {
            h = rnd<T>(h + ld(res[i]));
            res[i] = put<T>(h);
        }
        o[i] = put<Out>(h);
        sum += h * h;
    }
    const float inv = 1.0f / std::sqrt(sum / static_cast<float>(dim) + eps);
    int i = 0;
#ifdef __AVX512F__
    const __m512 vinv = _mm512_set1_ps(inv);
    for (; i + 16 <= dim; i += 16) {
        __m512 y = _mm512_mul_ps(load16(weight + i), rnd16<T>(_mm512_mul_ps(load16(o + i), vinv)));
        if constexpr (!std::is_same_v<Out, T>) y = rnd16<T>(y);  // a T store rounds by itself
        store16(o + i, y);
    }
#endif
    for (; i < dim; ++i) {
        float y = ld(weight[i]) * rnd<T>(ld(o[i]) * inv);
        if constexpr (!std::is_same_v<Out, T>) y = rnd<T>(y);
        o[i] = put<Out>(y);
    }
}

}  // namespace
