// Fused element-wise steps of a Llama decoder layer in bfloat16 and float32, for the CPU.
// torch runs each of these as several ops, and at decode batch sizes each op
// costs more in dispatch than in arithmetic (docs/cpu-performance.md). Each
// kernel here is one pass over its rows and rounds to bfloat16
// wherever transformers' bf16 code rounds (float32: where its float32 code
// rounds), so results match torch's bits (up to the order of a sum of squares
// in the norm).
// Built at first use by kernels/cpu/build.py; called through ctypes (kernels/cpu/ops.py).
#include <limits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "bf16.h"
#include "kv_int8.h"
#include "rms_norm.h"
#include "rope.h"
#include "silu.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

// Enough work to be worth waking the second thread for.
constexpr int64_t kParallelElems = 1 << 15;


// out = weight * T(h * rsqrt(mean(h^2) + eps)), where h = x, or, with a residual,
// h = T(x + residual), which is also written back to residual (the stream that
// the next layer adds to). As transformers' LlamaRMSNorm: h in float32, the
// normalised row rounded to the model's dtype before the scale.
// In and Out are T, or float for a bf16 model whose neighbours compute in float32
// (widened projections, packed_linear.py): x then comes unrounded and is rounded
// to T as it is read, and out holds T's values in float32; the same values either way.
template <typename T, typename In, typename Out>
void rms_norm(const In* x, int64_t x_stride, T* residual, const T* weight, Out* out, int rows, int dim, float eps) {
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(rows) * dim >= kParallelElems)
    for (int r = 0; r < rows; ++r)
        rms_norm_row(x + static_cast<int64_t>(r) * x_stride, residual != nullptr ? residual + static_cast<int64_t>(r) * dim : nullptr,
                     weight, out + static_cast<int64_t>(r) * dim, dim, eps);
}

// out[r] = silu(gate) * up, with gate and up the two halves of row r of x. Bf16
// (as bf16 storage, or as float32 values still to be rounded: the output of a
// projection computed in float32, packed_linear.py) rounds gate, up, silu(gate)
// and the product to bf16, as transformers' bf16 code does; float32 rounds none.
template <typename In, typename Out, bool Bf16>
void silu_and_mul(const In* x, Out* out, int rows, int inter) {
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(rows) * inter >= kParallelElems)
    for (int r = 0; r < rows; ++r) {
        const In* gate = x + static_cast<int64_t>(r) * 2 * inter;
        const In* up = gate + inter;
        Out* o = out + static_cast<int64_t>(r) * inter;
        int i = 0;
#ifdef __AVX512F__
        for (; i + 16 <= inter; i += 16) {
            __m512 g = load16(gate + i), u = load16(up + i);
            if constexpr (Bf16 && std::is_same_v<In, float>) g = round_bf16x16(g), u = round_bf16x16(u);
            __m512 y = Bf16 ? silu_mul16_bf16(g, u) : _mm512_mul_ps(silu16(g), u);
            if constexpr (Bf16 && std::is_same_v<Out, float>) y = round_bf16x16(y);
            store16(o + i, y);
        }
#endif
        for (; i < inter; ++i) {
            float g = ld(gate[i]), u = ld(up[i]);
            if constexpr (Bf16) g = round_bf16(g), u = round_bf16(u);
            float sg = g / (1.0f + std::exp(-g));
            if constexpr (Bf16) sg = round_bf16(sg);
            const float y = sg * u;
            o[i] = put<Out>(Bf16 ? round_bf16(y) : y);
        }
    }
}

// Where rope_store puts a token's keys and values: a pool in the model's dtype
// ([blocks][block_size][kv_heads][head_dim], one slot a row), or an int8 pool
// (kv_int8.h), quantized per KV head as they are stored.
template <typename T>
struct PlainStore {
    T *k_cache, *v_cache;
    int64_t kv_row;
    bool enabled() const { return k_cache != nullptr; }
    void operator()(int64_t slot, const T* k, const T* v, int, int) const {
        std::memcpy(k_cache + slot * kv_row, k, sizeof(T) * kv_row);
        std::memcpy(v_cache + slot * kv_row, v, sizeof(T) * kv_row);
    }
};

#ifdef __AVX512F__
// quantize_row_int8 (kv_int8.h) 16 lanes at a time, for n a multiple of 16: the same
// float32 operations (a true division, rounding half to even), so the same bytes.
template <typename T>
inline void quantize_row_int8_16(const T* x, int n, int8_t* q, uint16_t* scale_out) {
    __m512 amax = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(x + i)));
    const float m = _mm512_reduce_max_ps(amax);
    const uint16_t bits = float_to_half(std::fmin(std::fmax(m / 127.0f, 5.9604644775390625e-8f), 65504.0f));
    const __m512 s = _mm512_set1_ps(half_to_float(bits));
    const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    for (int i = 0; i < n; i += 16) {
        const __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(load16(x + i), s), lo), hi);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
    }
    std::memcpy(scale_out, &bits, sizeof bits);
}
#endif

struct Int8Store {
    int8_t *k_cache, *v_cache;
    int64_t block_bytes;
    int block_size;
    bool enabled() const { return true; }
    template <typename T>
    void operator()(int64_t slot, const T* k, const T* v, int kv_heads, int head_dim) const {
        const int64_t block = slot / block_size;
        const int off = static_cast<int>(slot % block_size);
        const int64_t values = static_cast<int64_t>(block_size) * kv_heads * head_dim;
        for (int half = 0; half < 2; ++half) {
            int8_t* blk = (half ? v_cache : k_cache) + block * block_bytes;
            const T* x = half ? v : k;
            auto* scales = reinterpret_cast<uint16_t*>(blk + values) + static_cast<int64_t>(off) * kv_heads;
            for (int h = 0; h < kv_heads; ++h) {
                const T* xh = x + static_cast<int64_t>(h) * head_dim;
                int8_t* q = blk + (static_cast<int64_t>(off) * kv_heads + h) * head_dim;
#ifdef __AVX512F__
                if (head_dim % 16 == 0) {
                    quantize_row_int8_16(xh, head_dim, q, scales + h);
                    continue;
                }
#endif
                quantize_row_int8([xh](int i) { return ld(xh[i]); }, head_dim, q, scales + h);
            }
        }
    }
};

// Rotary embedding (rotate-half) on the first `rot_heads` heads of each row of
// qkv, in place: T(T(x * cos) + T(rotate_half(x) * sin)), as torch computes it
// in the model's dtype. cos/sin are [positions, head_dim] tables. Then, where
// the store is enabled, the row's keys (the last `num_kv_heads` rotated heads)
// and values (the `num_kv_heads` heads after them) are stored at the token's
// slot of the pool; slot -1 (a padding row) stores nothing.
template <typename T, typename Store>
void rope_store(T* qkv, int64_t row_stride, int tokens, const int64_t* positions, const T* cos, const T* sin,
                int rot_heads, int num_kv_heads, int head_dim, const int64_t* slots, Store store) {
    const int half = head_dim / 2;
    const int64_t kv_row = static_cast<int64_t>(num_kv_heads) * head_dim;
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(tokens) * rot_heads * head_dim >= kParallelElems)
    for (int t = 0; t < tokens; ++t) {
        T* row = qkv + static_cast<int64_t>(t) * row_stride;
        const T* c = cos + positions[t] * head_dim;
        const T* s = sin + positions[t] * head_dim;
        for (int h = 0; h < rot_heads; ++h) rotate_half(row + static_cast<int64_t>(h) * head_dim, c, s, half);
        if (store.enabled() && slots[t] >= 0) {
            const T* k = row + static_cast<int64_t>(rot_heads - num_kv_heads) * head_dim;
            store(slots[t], k, k + kv_row, num_kv_heads, head_dim);
        }
    }
}

}  // namespace

extern "C" {

void rms_norm_bf16(const uint16_t* x, int64_t x_stride, uint16_t* residual, const uint16_t* weight, uint16_t* out,
                   int rows, int dim, float eps) {
    rms_norm(x, x_stride, residual, weight, out, rows, dim, eps);
}
void rms_norm_f32(const float* x, int64_t x_stride, float* residual, const float* weight, float* out, int rows, int dim,
                  float eps) {
    rms_norm(x, x_stride, residual, weight, out, rows, dim, eps);
}
// A bf16 model's norm between widened projections: x_f32 != 0: x is float32 (to be rounded
// to bf16 as read); out_f32 != 0: out is float32 (bf16 values). Residual and weight are bf16.
void rms_norm_bf16_widened(const void* x, int x_f32, int64_t x_stride, uint16_t* residual, const uint16_t* weight,
                           void* out, int out_f32, int rows, int dim, float eps) {
    const auto* xb = static_cast<const uint16_t*>(x);
    const auto* xf = static_cast<const float*>(x);
    auto* ob = static_cast<uint16_t*>(out);
    auto* of = static_cast<float*>(out);
    if (x_f32)
        out_f32 ? rms_norm(xf, x_stride, residual, weight, of, rows, dim, eps)
                : rms_norm(xf, x_stride, residual, weight, ob, rows, dim, eps);
    else
        out_f32 ? rms_norm(xb, x_stride, residual, weight, of, rows, dim, eps)
                : rms_norm(xb, x_stride, residual, weight, ob, rows, dim, eps);
}

void silu_and_mul_bf16(const uint16_t* x, uint16_t* out, int rows, int inter) {
    silu_and_mul<uint16_t, uint16_t, true>(x, out, rows, inter);
}
// bf16 != 0: x holds a bf16 model's activations as float32 (not yet rounded), and so will out (rounded).
void silu_and_mul_f32(const float* x, float* out, int rows, int inter, int bf16) {
    if (bf16)
        silu_and_mul<float, float, true>(x, out, rows, inter);
    else
        silu_and_mul<float, float, false>(x, out, rows, inter);
}

void rope_store_bf16(uint16_t* qkv, int64_t row_stride, int tokens, const int64_t* positions, const uint16_t* cos,
                     const uint16_t* sin, int rot_heads, int num_kv_heads, int head_dim, const int64_t* slots,
                     uint16_t* k_cache, uint16_t* v_cache) {
    rope_store(qkv, row_stride, tokens, positions, cos, sin, rot_heads, num_kv_heads, head_dim, slots,
               PlainStore<uint16_t>{k_cache, v_cache, static_cast<int64_t>(num_kv_heads) * head_dim});
}
void rope_store_f32(float* qkv, int64_t row_stride, int tokens, const int64_t* positions, const float* cos,
                    const float* sin, int rot_heads, int num_kv_heads, int head_dim, const int64_t* slots,
                    float* k_cache, float* v_cache) {
    rope_store(qkv, row_stride, tokens, positions, cos, sin, rot_heads, num_kv_heads, head_dim, slots,
               PlainStore<float>{k_cache, v_cache, static_cast<int64_t>(num_kv_heads) * head_dim});
}
// The same into an int8 pool (kv_int8.h): k_cache and v_cache are the halves, block_bytes apart per block.
void rope_store_int8_bf16(uint16_t* qkv, int64_t row_stride, int tokens, const int64_t* positions, const uint16_t* cos,
                          const uint16_t* sin, int rot_heads, int num_kv_heads, int head_dim, const int64_t* slots,
                          int8_t* k_cache, int8_t* v_cache, int64_t block_bytes, int block_size) {
    rope_store(qkv, row_stride, tokens, positions, cos, sin, rot_heads, num_kv_heads, head_dim, slots,
               Int8Store{k_cache, v_cache, block_bytes, block_size});
}
void rope_store_int8_f32(float* qkv, int64_t row_stride, int tokens, const int64_t* positions, const float* cos,
                         const float* sin, int rot_heads, int num_kv_heads, int head_dim, const int64_t* slots,
                         int8_t* k_cache, int8_t* v_cache, int64_t block_bytes, int block_size) {
    rope_store(qkv, row_stride, tokens, positions, cos, sin, rot_heads, num_kv_heads, head_dim, slots,
               Int8Store{k_cache, v_cache, block_bytes, block_size});
}

// out[r] = the index of the largest value of row r (the first one on ties; the first NaN
// if there is one), as torch.argmax. A single pass over memory takes a fraction of
// torch's time at 48 rows of a 49k vocabulary: greedy decoding runs it every step.
void argmax_rows_f32(const float* x, int64_t stride, int rows, int cols, int64_t* out) {
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(rows) * cols >= (1 << 18))
    for (int r = 0; r < rows; ++r) {
        const float* row = x + static_cast<int64_t>(r) * stride;
        int64_t best_i = 0;
        float best = row[0];
        int i = 0;
        bool nan = false;
#ifdef __AVX512F__
        if (cols >= 16) {
            __m512 bv = _mm512_loadu_ps(row);
            __m512i bi = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            __m512i idx = bi;
            __mmask16 unordered = _mm512_cmp_ps_mask(bv, bv, _CMP_UNORD_Q);
            for (i = 16; i + 16 <= cols; i += 16) {
                idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));
                const __m512 v = _mm512_loadu_ps(row + i);
                const __mmask16 gt = _mm512_cmp_ps_mask(v, bv, _CMP_GT_OQ);  // strictly: the first of equals stays
                unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
                bv = _mm512_mask_mov_ps(bv, gt, v);
                bi = _mm512_mask_mov_epi32(bi, gt, idx);
            }
            nan = unordered != 0;
            const float m = _mm512_reduce_max_ps(bv);
            const __mmask16 at_max = _mm512_cmp_ps_mask(bv, _mm512_set1_ps(m), _CMP_EQ_OQ);
            best = m;
            best_i = _mm512_mask_reduce_min_epi32(at_max, bi);
        }
#endif
        if (!nan) {
            for (; i < cols; ++i) {
                if (row[i] > best) { best = row[i]; best_i = i; }
                else if (row[i] != row[i]) { nan = true; break; }
            }
        }
        if (nan || best != best) {  // NaN wins, as in torch: the first one
            for (i = 0; i < cols; ++i)
                if (row[i] != row[i]) { best_i = i; break; }
        }
        out[r] = best_i;
    }
}

// Structured outputs: x[rows[j], t] = -inf wherever bit t of bitmask row rows[j] is 0
// (xgrammar's layout: bit t % 32 of int32 word t / 32 says whether token t may come
// next). Most of a grammar's words are 0 (32 tokens at once, a plain vector fill) or
// all ones (nothing to do); only the rest goes bit by bit.
void apply_token_bitmask_f32(float* x, int64_t stride, const int32_t* bitmask, int64_t words_stride,
                             const int64_t* rows, int num_rows, int cols) {
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < num_rows; ++j) {
        float* row = x + rows[j] * stride;
        const uint32_t* bits = reinterpret_cast<const uint32_t*>(bitmask + rows[j] * words_stride);
        int t = 0;
        for (; t + 32 <= cols; t += 32) {
            const uint32_t w = bits[t / 32];
            if (w == 0xffffffffu) continue;
            float* out = row + t;
            if (w == 0) {
                for (int k = 0; k < 32; ++k) out[k] = ninf;
                continue;
            }
            for (int k = 0; k < 32; ++k)  // a select, not a branch: the compiler makes it a vector blend
                out[k] = ((w >> k) & 1u) ? out[k] : ninf;
        }
        for (; t < cols; ++t)
            if (!((bits[t / 32] >> (t % 32)) & 1u)) row[t] = ninf;
    }
}

}  // extern "C"
