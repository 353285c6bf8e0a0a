// bf16 on AVX-512, with or without the AVX-512 BF16 instructions: the attention
// kernels are written against these two helpers, so that CPUs with AVX-512F
// alone (Ice Lake, Skylake-X) run the same vectorised code as those with BF16
// (Cooper Lake, Sapphire Rapids, Zen 4), one instruction each being replaced
// by a few.
#pragma once
#include <immintrin.h>

#if defined(__AVX512BF16__)
constexpr bool kNativeBf16 = true;
#else
constexpr bool kNativeBf16 = false;
#endif

// acc + a[2i] * b[2i] + a[2i+1] * b[2i+1] in each float32 lane i, where a and b
// hold 32 bf16 values (pairs per lane, the even one in the low half). A bf16
// product is exact in float32, so the emulation differs from vdpbf16ps only in
// the rounding of the two additions (and in keeping subnormals).
inline __m512 dot_bf16_pairs(__m512 acc, __m512i a, __m512i b) {
#if defined(__AVX512BF16__)
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
#else
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)), acc);
    return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(a, high)), _mm512_castsi512_ps(_mm512_and_si512(b, high)), acc);
#endif
}

// 16 float32 lanes to bf16, rounded to nearest even (NaN stays a quiet NaN), as torch rounds.
inline __m256i to_bf16x16(__m512 v) {
#if defined(__AVX512BF16__)
    return (__m256i)_mm512_cvtneps_pbh(v);
#else
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc00000));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
#endif
}
