// SiLU on 16 float32 lanes for the CPU kernels (cpu_ops.cpp's SiLU-and-mul, skinny_gemm.cpp's gate/up
// product that applies it as it stores): one definition, so that both round alike.
#pragma once
#include "bf16.h"

namespace {

#ifdef __AVX512F__
// exp on 16 lanes, to within 1 ulp of float32: exp(x) = 2^n * exp(r) with n = round(x / ln2),
// ln2 split in two for an exact r, and exp(r) = 1 + r + r^2 * p(r) with the
// minimax coefficients of SLEEF's expf_u10, which torch's vectorised exp uses.
// The compiler's vector expf under -ffast-math is less exact: the SiLU built on it
// differed from torch's in 0.1% of bf16 outputs.
inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.8f)), _mm512_set1_ps(-104.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.442695040888963407359924681001892137426645954152985934135449407f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693145751953125f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(-1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(0.000198527617612853646278381f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.00139304355252534151077271f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.00833336077630519866943359f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.0416664853692054748535156f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.166666671633720397949219f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(_mm512_mul_ps(r, r), p, r));
    return _mm512_scalef_ps(p, n);
}

// silu(g) = g / (1 + exp(-g)) in float32, as torch computes it.
inline __m512 silu16(__m512 g) {
    return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

// silu(g) * u for a bf16 model, g and u bf16 values: silu(g) rounded to bf16, as transformers' bf16
// code rounds it, times u (the caller rounds the product as it stores it).
inline __m512 silu_mul16_bf16(__m512 g, __m512 u) { return _mm512_mul_ps(round_bf16x16(silu16(g)), u); }
#endif

}  // namespace
