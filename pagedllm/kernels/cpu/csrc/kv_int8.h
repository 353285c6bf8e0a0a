// The int8 KV pool for the package's CPU kernels (model/attention/kv_quant.py has the layout and the torch
// reference): each block of each half (keys, values) holds [block_size][kv_heads][head_dim] int8 values, then
// [block_size][kv_heads] float16 scales. x = value * scale; scale = max|x| / 127 in float16; value =
// round(x / scale) within +-127, rounded half to even as torch.round does.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

struct Int8Pool {
    const int8_t* base;  // one half (keys or values) of one layer's pool
    int64_t block_bytes;
    int block_size, kv_heads, head_dim;

    // Slot `off` of block `block`, KV head `h`: its head_dim values, and its scale (float16 bits).
    const int8_t* values(int64_t block, int off, int h) const {
        return base + block * block_bytes + (static_cast<int64_t>(off) * kv_heads + h) * head_dim;
    }
    const uint16_t* scales(int64_t block) const {  // the block's [block_size][kv_heads] scales
        return reinterpret_cast<const uint16_t*>(base + block * block_bytes + static_cast<int64_t>(block_size) * kv_heads * head_dim);
    }
};

inline float half_to_float(uint16_t bits) {
    _Float16 h;
    std::memcpy(&h, &bits, sizeof h);
    return static_cast<float>(h);
}

inline uint16_t float_to_half(float x) {  // round to nearest even
    const _Float16 h = static_cast<_Float16>(x);
    uint16_t bits;
    std::memcpy(&bits, &h, sizeof bits);
    return bits;
}

// One row of n floats (as `load(i)` gives them) into int8 values and a float16 scale, exactly as
// kv_quant.quantize does in float32: scale = clamp(max|x| / 127) rounded to float16, then
// round(clamp(x / scale, -127, 127)).
template <typename Load>
inline void quantize_row_int8(Load load, int n, int8_t* q, uint16_t* scale_out) {
    float amax = 0.0f;
    for (int i = 0; i < n; ++i) amax = std::fmax(amax, std::fabs(load(i)));
    const uint16_t bits = float_to_half(std::fmin(std::fmax(amax / 127.0f, 5.9604644775390625e-8f), 65504.0f));
    const float s = half_to_float(bits);
    for (int i = 0; i < n; ++i) {
        const float v = std::fmin(std::fmax(load(i) / s, -127.0f), 127.0f);
        q[i] = static_cast<int8_t>(std::nearbyint(v));
    }
    std::memcpy(scale_out, &bits, sizeof bits);
}

#ifdef __AVX512F__
// 16 int8 values widened to float32.
inline __m512 load_int8x16(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif

}  // namespace
