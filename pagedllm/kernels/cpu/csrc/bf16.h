// bfloat16 <-> float32 for the package's CPU kernels (kernels/cpu/csrc): round to nearest even, as
// torch rounds, with NaN kept a (quiet) NaN. Scalar and 16-lane AVX-512 forms.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

inline float bf16_to_float(uint16_t x) {
    uint32_t bits = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline uint16_t float_to_bf16(float x) {  // round to nearest even, as torch does
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
}

inline float round_bf16(float x) { return bf16_to_float(float_to_bf16(x)); }

#ifdef __AVX512F__
inline __m512 load_bf16x16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

inline __m512i bf16_bits(__m512 v) {  // float_to_bf16 on 16 lanes, in the high halves
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc00000));
    return _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
}

inline __m512 round_bf16x16(__m512 v) { return _mm512_castsi512_ps(bf16_bits(v)); }

inline __m256i to_bf16x16(__m512 v) { return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_bits(v), 16)); }

inline void store_bf16x16(uint16_t* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16x16(v)); }

#if defined(__AVX512BF16__)
constexpr bool kNativeBf16 = true;
#else
constexpr bool kNativeBf16 = false;
#endif

// acc + a[2i] * b[2i] + a[2i+1] * b[2i+1] in each float32 lane i, where a and b hold
// 32 bf16 values (pairs per lane, the even one in the low half): vdpbf16ps where the
// CPU has AVX-512 BF16, two FMAs elsewhere. A bf16 product is exact in float32, so the
// emulation differs from the instruction only in the rounding of the two additions
// (and in keeping subnormals), and the same kernels run on both kinds of CPU.
inline __m512 dot_bf16_pairs(__m512 acc, __m512i a, __m512i b) {
#if defined(__AVX512BF16__)
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
#else
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)), acc);
    return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(a, high)), _mm512_castsi512_ps(_mm512_and_si512(b, high)), acc);
#endif
}
#endif

// Element access for both storage types: bf16 (uint16_t) rounds wherever
// transformers' bf16 code rounds; float32 never rounds but where torch's float32
// ops do (each product and sum: the library is built without FMA contraction).
inline float ld(uint16_t x) { return bf16_to_float(x); }
inline float ld(float x) { return x; }
template <typename T> inline float rnd(float x) { return std::is_same_v<T, uint16_t> ? round_bf16(x) : x; }
template <typename T> inline T put(float x) {
    if constexpr (std::is_same_v<T, uint16_t>) return float_to_bf16(x); else return x;
}

#ifdef __AVX512F__
inline __m512 load16(const uint16_t* p) { return load_bf16x16(p); }
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline void store16(uint16_t* p, __m512 v) { store_bf16x16(p, v); }
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
template <typename T> inline __m512 rnd16(__m512 v) {
    if constexpr (std::is_same_v<T, uint16_t>) return round_bf16x16(v); else return v;
}
#endif

}  // namespace
