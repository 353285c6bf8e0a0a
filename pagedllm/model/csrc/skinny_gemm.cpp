// Matrix products of a few rows (decode steps: 1..64 tokens) by a weight, in float32
// arithmetic, for CPUs with AVX-512 but without bf16 matrix instructions.
//
// There, oneDNN's float32 kernels run at 30-60 GFLOP/s from 1 to 8 rows and
// 100-150 at 48 rows on a 2-core Ice Lake, and its bf16 ones are emulated (5x
// slower still). A decode step reads every weight once: with few rows it is
// bound by those reads, and it pays for each oneDNN call's own set-up. This
// kernel reads bf16 weights (half the bytes of float32) or float32 ones, widens
// each in registers (exact) and multiplies in float32: 1.2-4.3x oneDNN's float32
// from 1 to 64 rows there, most at the fewest rows (benchmarks/skinny_gemm.py).
//
// Each output is one float32 sum over k = 0..K-1 in order, with FMA, whatever
// the number of rows: a row's result does not depend on the rest of the batch.
//
// Weights are packed once (model/skinny_gemm.py) into panels of 32 output columns,
// k-major, so that one k reads 64 contiguous bytes (bf16) or 128 (float32). In a
// bf16 panel the 32-bit word j of row k holds column j in its low half and column
// j + 16 in its high half: a shift and a mask widen the two halves to float32.
// Built at first use by model/native.py; called through ctypes.
#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#include "bf16.h"

#ifdef __AVX512F__
namespace {

constexpr int kPanel = 32;    // output columns per panel: two 16-lane accumulators per row
constexpr int kMaxRows = 12;  // rows per register tile: 24 accumulators, of 32 registers
constexpr int kPrefetch = 24; // panel rows ahead, into L1: the first row tile streams the panel from memory

template <bool Bf16W> struct PanelRow;
template <> struct PanelRow<true> {
    static constexpr int kWords = 16;  // 32-bit words per k
    static inline void load(const uint32_t* p, __m512& lo, __m512& hi) {
        const __m512i w = _mm512_loadu_si512(p);
        lo = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
        hi = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
    }
};
template <> struct PanelRow<false> {
    static constexpr int kWords = 32;
    static inline void load(const uint32_t* p, __m512& lo, __m512& hi) {
        lo = _mm512_loadu_ps(reinterpret_cast<const float*>(p));
        hi = _mm512_loadu_ps(reinterpret_cast<const float*>(p) + 16);
    }
};

// C[MR, cols] = A[MR, K] x panel, where a holds the tile's rows k-major: a[k * MR + m].
template <int MR, bool Bf16W, bool Bf16C>
void tile(const float* a, const uint32_t* panel, int K, const float* bias, void* c, int64_t ldc, int cols) {
    constexpr int W = PanelRow<Bf16W>::kWords;
    __m512 lo_acc[MR], hi_acc[MR];
    for (int m = 0; m < MR; ++m) lo_acc[m] = hi_acc[m] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) {
        const uint32_t* row = panel + static_cast<int64_t>(k) * W;
        _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetch * W), _MM_HINT_T0);
        if constexpr (W == 32) _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetch * W + 16), _MM_HINT_T0);
        __m512 lo, hi;
        PanelRow<Bf16W>::load(row, lo, hi);
        const float* ak = a + static_cast<int64_t>(k) * MR;
#pragma GCC unroll 16
        for (int m = 0; m < MR; ++m) {
            const __m512 av = _mm512_set1_ps(ak[m]);
            lo_acc[m] = _mm512_fmadd_ps(av, lo, lo_acc[m]);
            hi_acc[m] = _mm512_fmadd_ps(av, hi, hi_acc[m]);
        }
    }
    const __mmask16 lo_mask = cols >= 16 ? 0xffff : static_cast<__mmask16>((1u << cols) - 1);
    const __mmask16 hi_mask = cols >= 32 ? 0xffff : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
    const __m512 lo_bias = bias ? _mm512_maskz_loadu_ps(lo_mask, bias) : _mm512_setzero_ps();
    const __m512 hi_bias = bias ? _mm512_maskz_loadu_ps(hi_mask, bias + 16) : _mm512_setzero_ps();
    for (int m = 0; m < MR; ++m) {
        __m512 lo = lo_acc[m], hi = hi_acc[m];
        if (bias) lo = _mm512_add_ps(lo, lo_bias), hi = _mm512_add_ps(hi, hi_bias);
        if constexpr (Bf16C) {
            uint16_t* out = static_cast<uint16_t*>(c) + m * ldc;
            _mm256_mask_storeu_epi16(out, lo_mask, to_bf16x16(lo));
            _mm256_mask_storeu_epi16(out + 16, hi_mask, to_bf16x16(hi));
        } else {
            float* out = static_cast<float*>(c) + m * ldc;
            _mm512_mask_storeu_ps(out, lo_mask, lo);
            _mm512_mask_storeu_ps(out + 16, hi_mask, hi);
        }
    }
}

using Tile = void (*)(const float*, const uint32_t*, int, const float*, void*, int64_t, int);
template <bool Bf16W, bool Bf16C, int... I>
constexpr std::array<Tile, sizeof...(I)> tiles(std::integer_sequence<int, I...>) {
    return {tile<I + 1, Bf16W, Bf16C>...};
}
template <bool Bf16W, bool Bf16C>
const std::array<Tile, kMaxRows> kTiles = tiles<Bf16W, Bf16C>(std::make_integer_sequence<int, kMaxRows>{});

// The input rows, widened to float32 and laid out tile by tile, k-major. Per calling
// thread, and kept: a fresh buffer of this size would be page-faulted in on every call.
template <bool Bf16A>
const float* pack_rows(const void* x, int64_t ldx, int M, int K) {
    thread_local std::vector<float> buf;
    buf.resize(static_cast<size_t>(M) * K);
    for (int m0 = 0; m0 < M; m0 += kMaxRows) {
        const int mr = std::min(kMaxRows, M - m0);
        float* dst = buf.data() + static_cast<int64_t>(m0) * K;
        for (int m = 0; m < mr; ++m) {
            const int64_t src = static_cast<int64_t>(m0 + m) * ldx;
            for (int k = 0; k < K; ++k) {
                if constexpr (Bf16A) dst[k * mr + m] = bf16_to_float(static_cast<const uint16_t*>(x)[src + k]);
                else dst[k * mr + m] = static_cast<const float*>(x)[src + k];
            }
        }
    }
    return buf.data();
}

template <bool Bf16W, bool Bf16C>
void gemm(const float* a, int M, int K, const uint32_t* w, int N, const float* bias, void* c, int64_t ldc) {
    constexpr int W = PanelRow<Bf16W>::kWords;
    constexpr int kOutBytes = Bf16C ? 2 : 4;
    const int panels = (N + kPanel - 1) / kPanel;
#pragma omp parallel for schedule(static) if (panels > 1)
    for (int p = 0; p < panels; ++p) {
        const uint32_t* panel = w + static_cast<int64_t>(p) * K * W;
        const int cols = std::min(kPanel, N - p * kPanel);
        for (int m0 = 0; m0 < M; m0 += kMaxRows) {
            const int mr = std::min(kMaxRows, M - m0);
            char* out = static_cast<char*>(c) + (static_cast<int64_t>(m0) * ldc + static_cast<int64_t>(p) * kPanel) * kOutBytes;
            kTiles<Bf16W, Bf16C>[mr - 1](a + static_cast<int64_t>(m0) * K, panel, K, bias ? bias + p * kPanel : nullptr,
                                         out, ldc, cols);
        }
    }
}

}  // namespace
#endif

extern "C" {

int skinny_gemm_available() {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

// y[M, N] = x[M, K] w^T (+ bias): x bf16 or float32 (row stride ldx), w packed as above
// (bf16 or float32), bias float32 or null, y bf16 (rounded once) or float32 (row stride ldy).
void skinny_gemm(const void* x, int x_bf16, int64_t ldx, int M, int K, const uint32_t* w, int w_bf16, int N,
                 const float* bias, void* y, int y_bf16, int64_t ldy) {
#ifdef __AVX512F__
    if (M <= 0 || N <= 0) return;
    const float* a = x_bf16 ? pack_rows<true>(x, ldx, M, K) : pack_rows<false>(x, ldx, M, K);
    if (w_bf16)
        y_bf16 ? gemm<true, true>(a, M, K, w, N, bias, y, ldy) : gemm<true, false>(a, M, K, w, N, bias, y, ldy);
    else
        y_bf16 ? gemm<false, true>(a, M, K, w, N, bias, y, ldy) : gemm<false, false>(a, M, K, w, N, bias, y, ldy);
#endif
}

}  // extern "C"
