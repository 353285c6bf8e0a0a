// Matrix products of a few rows (decode steps: 1..64 tokens) by a weight, in two forms:
// float32 arithmetic for CPUs with AVX-512 but without bf16 matrix instructions, and bf16
// dot products (vdpbf16ps) for those with AVX-512 BF16 (further down).
//
// There, oneDNN's float32 kernels are slow at few rows, and its bf16 ones are
// emulated (slower still). A decode step reads every weight once: with few rows
// it is bound by those reads, and it pays for each oneDNN call's own set-up.
// This kernel reads bf16 weights (half the bytes of float32) or float32 ones, widens
// each in registers (exact) and multiplies in float32: faster than oneDNN's float32
// from 1 to 64 rows there, most at the fewest rows (benchmarks/skinny_gemm.py;
// figures in docs/cpu-performance.md).
//
// Each output is one float32 sum over k = 0..K-1 in order, with FMA, whatever
// the number of rows: a row's result does not depend on the rest of the batch.
//
// Weights are packed once (kernels/cpu/skinny_gemm.py) into panels of 32 output columns,
// k-major, so that one k reads 64 contiguous bytes (bf16) or 128 (float32). In a
// bf16 panel the 32-bit word j of row k holds column j in its low half and column
// j + 16 in its high half: a shift and a mask widen the two halves to float32.
//
// With AVX-512 BF16, oneDNN's packed bf16 is fast on big batches but loses to a
// plain register tile on decode batches: the pair form below is ahead of oneDNN's
// bf16 on decode batches, most at the fewest rows (benchmarks/skinny_gemm.py
// --kernel pairs), and even from ~128 rows.
// Built at first use by kernels/cpu/build.py; called through ctypes (kernels/cpu/skinny_gemm.py).
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "bf16.h"
#include "rms_norm.h"
#include "rope.h"
#include "silu.h"

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

// What a product stores: float32 sums, bf16 (each sum rounded once), or float32 holding
// those bf16 values (logits, which the sampler reads in float32).
constexpr int kOutF32 = 0, kOutBf16 = 1, kOutBf16InF32 = 2;

// Adds the bias to a tile's accumulators (columns j and j + 16 of each row) and stores its
// first `cols` columns as `Out` says.
template <int MR, int Out>
inline void store_tile(const __m512* lo_acc, const __m512* hi_acc, const float* bias, void* c, int64_t ldc, int cols) {
    const __mmask16 lo_mask = cols >= 16 ? 0xffff : static_cast<__mmask16>((1u << cols) - 1);
    const __mmask16 hi_mask = cols >= 32 ? 0xffff : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
    const __m512 lo_bias = bias ? _mm512_maskz_loadu_ps(lo_mask, bias) : _mm512_setzero_ps();
    const __m512 hi_bias = bias ? _mm512_maskz_loadu_ps(hi_mask, bias + 16) : _mm512_setzero_ps();
    for (int m = 0; m < MR; ++m) {
        __m512 lo = lo_acc[m], hi = hi_acc[m];
        if (bias) lo = _mm512_add_ps(lo, lo_bias), hi = _mm512_add_ps(hi, hi_bias);
        if constexpr (Out == kOutBf16) {
            uint16_t* out = static_cast<uint16_t*>(c) + m * ldc;
            _mm256_mask_storeu_epi16(out, lo_mask, to_bf16x16(lo));
            _mm256_mask_storeu_epi16(out + 16, hi_mask, to_bf16x16(hi));
        } else {
            float* out = static_cast<float*>(c) + m * ldc;
            if constexpr (Out == kOutBf16InF32) lo = round_bf16x16(lo), hi = round_bf16x16(hi);
            _mm512_mask_storeu_ps(out, lo_mask, lo);
            _mm512_mask_storeu_ps(out + 16, hi_mask, hi);
        }
    }
}

// C[MR, cols] = A[MR, K] x panel, where a holds the tile's rows k-major: a[k * MR + m].
template <int MR, bool Bf16W, int Out>
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
    store_tile<MR, Out>(lo_acc, hi_acc, bias, c, ldc, cols);
}

using Tile = void (*)(const float*, const uint32_t*, int, const float*, void*, int64_t, int);
template <bool Bf16W, int Out, int... I>
constexpr std::array<Tile, sizeof...(I)> tiles(std::integer_sequence<int, I...>) {
    return {tile<I + 1, Bf16W, Out>...};
}
template <bool Bf16W, int Out>
const std::array<Tile, kMaxRows> kTiles = tiles<Bf16W, Out>(std::make_integer_sequence<int, kMaxRows>{});

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

// Every (panel, row tile) of y = x w^T, as run(panel, first row, rows, out, cols) computes one:
// panels split across threads, and within a thread a panel stays in cache across its row tiles.
template <int Out, typename Run>
void over_tiles(int M, int N, void* c, int64_t ldc, Run run) {
    constexpr int kOutBytes = Out == kOutBf16 ? 2 : 4;
    const int panels = (N + kPanel - 1) / kPanel;
#pragma omp parallel for schedule(static) if (panels > 1)
    for (int p = 0; p < panels; ++p) {
        const int cols = std::min(kPanel, N - p * kPanel);
        for (int m0 = 0; m0 < M; m0 += kMaxRows) {
            char* out = static_cast<char*>(c) + (static_cast<int64_t>(m0) * ldc + static_cast<int64_t>(p) * kPanel) * kOutBytes;
            run(p, m0, std::min(kMaxRows, M - m0), out, cols);
        }
    }
}

template <bool Bf16W, int Out>
void gemm(const float* a, int M, int K, const uint32_t* w, int N, const float* bias, void* c, int64_t ldc) {
    constexpr int W = PanelRow<Bf16W>::kWords;
    over_tiles<Out>(M, N, c, ldc, [&](int p, int m0, int mr, void* out, int cols) {
        kTiles<Bf16W, Out>[mr - 1](a + static_cast<int64_t>(m0) * K, w + static_cast<int64_t>(p) * K * W, K,
                                   bias ? bias + p * kPanel : nullptr, out, ldc, cols);
    });
}

// --- bf16 dot products (CPUs with AVX-512 BF16) ------------------------------------------
// A pair panel holds 32 output columns, k-pair-major: word j of pair row kp is column j's
// weights at k = 2kp (low half) and 2kp + 1 (high half), the operand layout of vdpbf16ps.
// The input rows are packed the same way: one 32-bit word per row and k pair, broadcast
// to all lanes. Each output is a float32 sum over the k pairs in order, two products per
// step, as oneDNN's bf16 kernels compute it; a row's result does not depend on the batch.

// C[MR, cols] = A[MR, 2 KP] x pair panel, where a holds the tile's rows pair-major: a[kp * MR + m].
template <int MR, int Out>
void pair_tile(const uint32_t* a, const uint32_t* panel, int KP, const float* bias, void* c, int64_t ldc, int cols) {
    __m512 lo_acc[MR], hi_acc[MR];
    for (int m = 0; m < MR; ++m) lo_acc[m] = hi_acc[m] = _mm512_setzero_ps();
#pragma GCC unroll 2
    for (int kp = 0; kp < KP; ++kp) {
        const uint32_t* row = panel + static_cast<int64_t>(kp) * kPanel;
        _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetch * kPanel), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetch * kPanel + 16), _MM_HINT_T0);
        const __m512i lo = _mm512_loadu_si512(row), hi = _mm512_loadu_si512(row + 16);
        const uint32_t* ak = a + static_cast<int64_t>(kp) * MR;
#pragma GCC unroll 16
        for (int m = 0; m < MR; ++m) {
            const __m512i av = _mm512_set1_epi32(static_cast<int>(ak[m]));
            lo_acc[m] = dot_bf16_pairs(lo_acc[m], av, lo);
            hi_acc[m] = dot_bf16_pairs(hi_acc[m], av, hi);
        }
    }
    store_tile<MR, Out>(lo_acc, hi_acc, bias, c, ldc, cols);
}

using PairTile = void (*)(const uint32_t*, const uint32_t*, int, const float*, void*, int64_t, int);
template <int Out, int... I>
constexpr std::array<PairTile, sizeof...(I)> pair_tiles(std::integer_sequence<int, I...>) {
    return {pair_tile<I + 1, Out>...};
}
template <int Out>
const std::array<PairTile, kMaxRows> kPairTiles = pair_tiles<Out>(std::make_integer_sequence<int, kMaxRows>{});

// An RMSNorm that the input rows go through before the product (rms_norm.h), as a bf16 model's norm in
// front of a projection: with a residual, x + residual is written back to it and normalised.
struct RowNorm {
    uint16_t* residual;      // [M, K], row stride K, or null
    const uint16_t* weight;  // [K]; null: no norm
    float eps;
};

// The input rows as bf16 pairs, tile by tile, pair-major (float32 input is rounded to bf16,
// as a bf16 layer's input is); an odd K is padded with a zero. With a norm (bf16 input only),
// each row is normalised first, into a per-thread row. One row tile per task of the
// enclosing parallel region, which waits for all of them at the loop's end.
template <bool Bf16A>
void pack_pair_tiles(const void* x, int64_t ldx, int M, int K, uint32_t* a, const RowNorm& norm) {
    const int KP = (K + 1) / 2;
    thread_local std::vector<uint16_t> normed;
#pragma omp for schedule(static)
    for (int m0 = 0; m0 < M; m0 += kMaxRows) {
        const int mr = std::min(kMaxRows, M - m0);
        uint32_t* dst = a + static_cast<int64_t>(m0) * KP;
        for (int m = 0; m < mr; ++m) {
            const void* row = static_cast<const char*>(x) + static_cast<int64_t>(m0 + m) * ldx * (Bf16A ? 2 : 4);
            if constexpr (Bf16A) {
                if (norm.weight != nullptr) {
                    normed.resize(K);
                    rms_norm_row(static_cast<const uint16_t*>(row), norm.residual ? norm.residual + static_cast<int64_t>(m0 + m) * K : nullptr,
                                 norm.weight, normed.data(), K, norm.eps);
                    row = normed.data();
                }
            }
            auto at = [&](int i) -> uint32_t {
                if constexpr (Bf16A) return static_cast<const uint16_t*>(row)[i];
                else return float_to_bf16(static_cast<const float*>(row)[i]);
            };
            for (int kp = 0; kp < KP; ++kp)
                dst[kp * mr + m] = at(2 * kp) | (2 * kp + 1 < K ? at(2 * kp + 1) << 16 : 0u);
        }
    }
}

// run(a, g, m0, mr) for every (column group g, row tile) of a product by a pair-packed weight, in one
// parallel region: the input rows are packed first (into a, pair-major by tile), then the groups are
// split across threads, and within a thread a group's panels stay in cache across its row tiles.
template <typename Run>
void over_pair_tiles(const void* x, int x_bf16, int64_t ldx, int M, int K, const RowNorm& norm, int groups, Run run) {
    // The calling thread's buffer, kept (a fresh one would be page-faulted in on every call), read by the
    // region's threads.
    thread_local std::vector<uint32_t> buf;
    buf.resize(static_cast<size_t>(M) * ((K + 1) / 2));
    uint32_t* a = buf.data();
#pragma omp parallel if (groups > 1)
    {
        if (x_bf16) pack_pair_tiles<true>(x, ldx, M, K, a, norm);
        else pack_pair_tiles<false>(x, ldx, M, K, a, norm);
#pragma omp for schedule(static)
        for (int g = 0; g < groups; ++g)
            for (int m0 = 0; m0 < M; m0 += kMaxRows) run(a, g, m0, std::min(kMaxRows, M - m0));
    }
}

template <int Out>
void gemm_pairs(const void* x, int x_bf16, int64_t ldx, int M, int K, const RowNorm& norm, const uint32_t* w, int N,
                const float* bias, void* c, int64_t ldc) {
    constexpr int kOutBytes = Out == kOutBf16 ? 2 : 4;
    const int KP = (K + 1) / 2;
    over_pair_tiles(x, x_bf16, ldx, M, K, norm, (N + kPanel - 1) / kPanel, [&](const uint32_t* a, int p, int m0, int mr) {
        char* out = static_cast<char*>(c) + (static_cast<int64_t>(m0) * ldc + static_cast<int64_t>(p) * kPanel) * kOutBytes;
        kPairTiles<Out>[mr - 1](a + static_cast<int64_t>(m0) * KP, w + static_cast<int64_t>(p) * KP * kPanel, KP,
                                bias ? bias + p * kPanel : nullptr, out, ldc, std::min(kPanel, N - p * kPanel));
    });
}

// silu(gate) * up of a fused gate/up projection (N = 2 * inter outputs: gate, then up; inter a multiple of
// the panel width), stored in bf16 [M, inter]: each panel of gate columns and the panel of up columns at the
// same offset run back to back, their sums rounded to bf16 as the plain product stores them, and SiLU-and-mul
// (silu.h) applied to the pair as cpu_ops.cpp's does, so the bits are those of the product then the op.
void gemm_pairs_silu(const void* x, int x_bf16, int64_t ldx, int M, int K, const RowNorm& norm, const uint32_t* w, int N,
                     const float* bias, uint16_t* y, int64_t ldy) {
    const int KP = (K + 1) / 2;
    const int inter = N / 2, panels = inter / kPanel;
    over_pair_tiles(x, x_bf16, ldx, M, K, norm, panels, [&](const uint32_t* a, int p, int m0, int mr) {
        alignas(64) float gate[kMaxRows * kPanel], up[kMaxRows * kPanel];
        const uint32_t* am = a + static_cast<int64_t>(m0) * KP;
        kPairTiles<kOutBf16InF32>[mr - 1](am, w + static_cast<int64_t>(p) * KP * kPanel, KP, bias ? bias + p * kPanel : nullptr,
                                          gate, kPanel, kPanel);
        kPairTiles<kOutBf16InF32>[mr - 1](am, w + static_cast<int64_t>(p + panels) * KP * kPanel, KP,
                                          bias ? bias + inter + p * kPanel : nullptr, up, kPanel, kPanel);
        for (int m = 0; m < mr; ++m)
            for (int i = 0; i < kPanel; i += 16)
                store_bf16x16(y + static_cast<int64_t>(m0 + m) * ldy + p * kPanel + i,
                              silu_mul16_bf16(_mm512_load_ps(gate + m * kPanel + i), _mm512_load_ps(up + m * kPanel + i)));
    });
}

// Where a fused qkv product puts its rows after the product: rotary embedding (rope.h) on the query
// and key heads, then each token's keys and values stored at its slot of a bf16 pool
// ([blocks][block_size][kv_heads][head_dim], one slot a row; slot -1 stores nothing), as cpu_ops.cpp's
// rope_store does.
struct QkvRope {
    const int64_t* positions;
    const uint16_t* cos;  // [positions, head_dim]
    const uint16_t* sin;
    int num_heads, num_kv_heads, head_dim;
    const int64_t* slots;
    uint16_t* k_cache;
    uint16_t* v_cache;
};

// y [M, (heads + 2 kv_heads) * head_dim] bf16 = x w^T (+ bias), then rotated and stored as QkvRope says.
// One head per column group: its panels run back to back, then each row of the tile rotates that head
// (query or key) and copies it (key or value) into the pool, so every output is written once, in cache.
void gemm_pairs_qkv_rope(const void* x, int x_bf16, int64_t ldx, int M, int K, const RowNorm& norm, const uint32_t* w, int N,
                         const float* bias, uint16_t* y, int64_t ldy, const QkvRope& r) {
    const int KP = (K + 1) / 2;
    const int D = r.head_dim, per_head = D / kPanel, rot = r.num_heads + r.num_kv_heads;
    const int64_t kv_row = static_cast<int64_t>(r.num_kv_heads) * D;
    over_pair_tiles(x, x_bf16, ldx, M, K, norm, N / D, [&](const uint32_t* a, int h, int m0, int mr) {
        const uint32_t* am = a + static_cast<int64_t>(m0) * KP;
        for (int j = 0; j < per_head; ++j) {
            const int p = h * per_head + j;
            kPairTiles<kOutBf16>[mr - 1](am, w + static_cast<int64_t>(p) * KP * kPanel, KP, bias ? bias + p * kPanel : nullptr,
                                         y + static_cast<int64_t>(m0) * ldy + p * kPanel, ldy, kPanel);
        }
        for (int m = m0; m < m0 + mr; ++m) {
            uint16_t* head = y + static_cast<int64_t>(m) * ldy + static_cast<int64_t>(h) * D;
            if (h < rot) rotate_half(head, r.cos + r.positions[m] * D, r.sin + r.positions[m] * D, D / 2);
            if (h >= r.num_heads && r.slots[m] >= 0) {
                uint16_t* cache = h < rot ? r.k_cache : r.v_cache;
                const int kvh = h < rot ? h - r.num_heads : h - rot;
                std::memcpy(cache + r.slots[m] * kv_row + static_cast<int64_t>(kvh) * D, head, sizeof(uint16_t) * D);
            }
        }
    });
}

// Calls f with the output mode as a compile-time constant.
template <typename F>
void by_out_mode(int mode, F f) {
    if (mode == kOutBf16) f(std::integral_constant<int, kOutBf16>{});
    else if (mode == kOutBf16InF32) f(std::integral_constant<int, kOutBf16InF32>{});
    else f(std::integral_constant<int, kOutF32>{});
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
// (bf16 or float32), bias float32 or null, y (row stride ldy) as y_mode says: 0 float32,
// 1 bf16 (rounded once), 2 float32 holding the bf16 values.
void skinny_gemm(const void* x, int x_bf16, int64_t ldx, int M, int K, const uint32_t* w, int w_bf16, int N,
                 const float* bias, void* y, int y_mode, int64_t ldy) {
#ifdef __AVX512F__
    if (M <= 0 || N <= 0) return;
    const float* a = x_bf16 ? pack_rows<true>(x, ldx, M, K) : pack_rows<false>(x, ldx, M, K);
    if (w_bf16)
        by_out_mode(y_mode, [&](auto out) { gemm<true, decltype(out)::value>(a, M, K, w, N, bias, y, ldy); });
    else
        by_out_mode(y_mode, [&](auto out) { gemm<false, decltype(out)::value>(a, M, K, w, N, bias, y, ldy); });
#endif
}

// 1 where the pair kernel runs on vdpbf16ps; 0 where it emulates it (correct, but slower than
// the float32 kernel above) or is not built.
int skinny_gemm_pairs_native() {
#if defined(__AVX512F__)
    return kNativeBf16 ? 1 : 0;
#else
    return 0;
#endif
}

// y[M, N] = x[M, K] w^T (+ bias) on a pair-packed bf16 w: x bf16 or float32 (rounded to bf16);
// y_mode as for skinny_gemm. norm_weight non-null (bf16 x only): x's rows go through RMSNorm first
// (with residual non-null, x + residual, written back to residual [M, K]), as rms_norm_bf16 computes it.
void skinny_gemm_pairs(const void* x, int x_bf16, int64_t ldx, int M, int K, const uint32_t* w, int N,
                       const float* bias, void* y, int y_mode, int64_t ldy, uint16_t* residual, const uint16_t* norm_weight,
                       float eps) {
#ifdef __AVX512F__
    if (M <= 0 || N <= 0) return;
    const RowNorm norm{residual, norm_weight, eps};
    by_out_mode(y_mode, [&](auto out) { gemm_pairs<decltype(out)::value>(x, x_bf16, ldx, M, K, norm, w, N, bias, y, ldy); });
#endif
}

// y[M, N / 2] (bf16, row stride ldy) = silu(gate) * up, where [gate, up] = x w^T (+ bias) on a pair-packed bf16 w
// of N = 2 * inter outputs; inter must be a multiple of 32 (returns -1 and writes nothing otherwise). The norm
// arguments as for skinny_gemm_pairs.
int skinny_gemm_pairs_silu(const void* x, int x_bf16, int64_t ldx, int M, int K, const uint32_t* w, int N,
                           const float* bias, uint16_t* y, int64_t ldy, uint16_t* residual, const uint16_t* norm_weight,
                           float eps) {
#ifdef __AVX512F__
    if (N % (2 * kPanel) != 0) return -1;
    const RowNorm norm{residual, norm_weight, eps};
    if (M > 0 && N > 0) gemm_pairs_silu(x, x_bf16, ldx, M, K, norm, w, N, bias, y, ldy);
    return 0;
#else
    return -1;
#endif
}

// y = the qkv product of skinny_gemm_pairs (bf16, norm arguments alike), then rotary embedding on its query and
// key heads and its keys and values stored in a bf16 pool, as cpu_ops.cpp's rope_store_bf16 does. head_dim must be
// a multiple of 32 and N = (heads + 2 kv_heads) * head_dim (returns -1 and writes nothing otherwise).
int skinny_gemm_pairs_qkv_rope(const void* x, int x_bf16, int64_t ldx, int M, int K, const uint32_t* w, int N,
                               const float* bias, uint16_t* y, int64_t ldy, uint16_t* residual, const uint16_t* norm_weight,
                               float eps, const int64_t* positions, const uint16_t* cos, const uint16_t* sin, int num_heads,
                               int num_kv_heads, int head_dim, const int64_t* slots, uint16_t* k_cache, uint16_t* v_cache) {
#ifdef __AVX512F__
    if (head_dim <= 0 || head_dim % kPanel != 0 || N != (num_heads + 2 * num_kv_heads) * head_dim) return -1;
    const RowNorm norm{residual, norm_weight, eps};
    const QkvRope rope{positions, cos, sin, num_heads, num_kv_heads, head_dim, slots, k_cache, v_cache};
    if (M > 0) gemm_pairs_qkv_rope(x, x_bf16, ldx, M, K, norm, w, N, bias, y, ldy, rope);
    return 0;
#else
    return -1;
#endif
}

}  // extern "C"
