// Paged decode attention for the CPU, reading keys and values in place through
// the block table: no gather into contiguous tensors, no padding to the longest
// sequence. Each key and value row is loaded and widened to float32 once for
// all the query heads that read it.
//
// A sliding window (window > 0) starts each sequence's loops at its first
// position inside the window, max(0, seq_len - window): the blocks before it
// are never read (the engine may have given them back to the pool). A soft cap
// (soft_cap > 0, Gemma 2) turns each scaled score s into cap * tanh(s / cap)
// before the softmax. 0 turns either off, and the loops are then the same.
// Built at first use by cpu_kernels.py; called through ctypes.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <vector>

#include "bf16.h"
#include "kv_int8.h"

namespace {

// The kernels below are templates over the element type: float32 or bf16 (uint16_t).
inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) { return bf16_to_float(x); }
inline void from_float(float x, float* out) { *out = x; }
inline void from_float(float x, uint16_t* out) { *out = float_to_bf16(x); }

// The first position a query at position len - 1 attends to: len - window with a sliding window, else 0.
inline int window_start(int len, int window) { return window > 0 && len > window ? len - window : 0; }

// Soft-capping (Gemma 2): each of n scores s becomes cap * tanh(s / cap).
inline void soft_cap_scores(float* s, size_t n, float cap) {
    const float inv = 1.0f / cap;
#pragma omp simd
    for (size_t i = 0; i < n; ++i) s[i] = cap * std::tanh(s[i] * inv);
}

// Each of `rows` rows of `len` scores becomes exp(score - row max), in place;
// inv_sum[row] gets 1 / the row's sum, applied once to the weighted values.
inline void softmax_rows(float* scores, int rows, int len, float* inv_sum) {
    for (int h = 0; h < rows; ++h) {
        float* sh = scores + static_cast<size_t>(h) * len;
        float m = sh[0];
        for (int t = 1; t < len; ++t) m = sh[t] > m ? sh[t] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int t = 0; t < len; ++t) {
            sh[t] = std::exp(sh[t] - m);
            sum += sh[t];
        }
        inv_sum[h] = 1.0f / sum;
    }
}

// Prefetch a block's slots (all KV heads: one contiguous run of bytes) while
// the previous block is being computed on; the pool is far larger than the
// caches, so without it each row costs a trip to memory. The hint is T2
// (prefetcht2): on Zen 4 the non-temporal hint made the kernel slower on a cold
// pool (benchmarks/RESULTS.md, Zen 4 kernels).
template <typename T>
inline void prefetch_block(const T* base, int64_t elems) {
    const char* p = reinterpret_cast<const char*>(base);
    const int64_t bytes = elems * static_cast<int64_t>(sizeof(T));
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 1);
}

template <typename T>
void decode(const T* q, int64_t q_stride, const T* k_cache, const T* v_cache, const int32_t* block_tables,
            int64_t table_stride, const int32_t* seq_lens, T* out, int num_seqs, int num_heads,
            int num_kv_heads, int head_dim, int block_size, float scale, int window, float soft_cap) {
    // One task per sequence, all heads: a block's slots for every KV head are
    // contiguous in the pool, so a task streams whole blocks from memory.
    const int group = num_heads / num_kv_heads;
    const int64_t row = static_cast<int64_t>(num_kv_heads) * head_dim;  // one token's slot
    const int64_t block_elems = row * block_size;
#pragma omp parallel
    {
        std::vector<float> qf(static_cast<size_t>(num_heads) * head_dim), acc(qf.size()), kv_row(row), scores, inv_sum(num_heads);
#pragma omp for schedule(dynamic, 1)
        for (int s = 0; s < num_seqs; ++s) {
            const int len = seq_lens[s];
            T* o = out + static_cast<int64_t>(s) * num_heads * head_dim;
            if (len <= 0) {  // a padding row: zeros, never NaN
                for (int i = 0; i < num_heads * head_dim; ++i) from_float(0.0f, o + i);
                continue;
            }
            const int32_t* table = block_tables + s * table_stride;
            const int num_blocks = (len + block_size - 1) / block_size;
            const int start = window_start(len, window), span = len - start;  // positions start..len - 1
            const int first = start / block_size;
            scores.resize(static_cast<size_t>(num_heads) * span);
            const T* qs = q + static_cast<int64_t>(s) * q_stride;
            for (int i = 0; i < num_heads * head_dim; ++i) qf[i] = to_float(qs[i]) * scale;
            float* kr = kv_row.data();
            // Scores of every query head against each key.
            prefetch_block(k_cache + table[first] * block_elems, block_elems);
            for (int b = first; b < num_blocks; ++b) {
                if (b + 1 < num_blocks) prefetch_block(k_cache + table[b + 1] * block_elems, block_elems);
                const T* blk = k_cache + table[b] * block_elems;
                const int t_end = (b + 1) * block_size < len ? (b + 1) * block_size : len;
                for (int t = std::max(b * block_size, start); t < t_end; ++t) {
                    const T* k = blk + (t - b * block_size) * row;
#pragma omp simd
                    for (int i = 0; i < row; ++i) kr[i] = to_float(k[i]);
                    for (int h = 0; h < num_heads; ++h) {
                        const float* qh = qf.data() + h * head_dim;
                        const float* kh = kr + (h / group) * head_dim;
                        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                        for (int d = 0; d < head_dim; ++d) dot += qh[d] * kh[d];
                        scores[static_cast<size_t>(h) * span + t - start] = dot;
                    }
                }
            }
            prefetch_block(v_cache + table[first] * block_elems, block_elems);
            if (soft_cap > 0.0f) soft_cap_scores(scores.data(), scores.size(), soft_cap);
            softmax_rows(scores.data(), num_heads, span, inv_sum.data());
            // Weighted sum of values.
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int b = first; b < num_blocks; ++b) {
                if (b + 1 < num_blocks) prefetch_block(v_cache + table[b + 1] * block_elems, block_elems);
                const T* blk = v_cache + table[b] * block_elems;
                const int t_end = (b + 1) * block_size < len ? (b + 1) * block_size : len;
                for (int t = std::max(b * block_size, start); t < t_end; ++t) {
                    const T* v = blk + (t - b * block_size) * row;
#pragma omp simd
                    for (int i = 0; i < row; ++i) kr[i] = to_float(v[i]);
                    for (int h = 0; h < num_heads; ++h) {
                        const float p = scores[static_cast<size_t>(h) * span + t - start];
                        const float* vh = kr + (h / group) * head_dim;
                        float* ah = acc.data() + h * head_dim;
#pragma omp simd
                        for (int d = 0; d < head_dim; ++d) ah[d] += p * vh[d];
                    }
                }
            }
            for (int h = 0; h < num_heads; ++h)
                for (int d = 0; d < head_dim; ++d) from_float(acc[h * head_dim + d] * inv_sum[h], o + h * head_dim + d);
        }
    }
}


#if defined(__AVX512F__)
// AVX-512, bf16 or float32, for head sizes 64 and 128. The generic loops above
// spend most of their time widening bf16 and reducing each dot product; here
// bf16 keys are multiplied as pairs straight from the pool (vdpbf16ps where the
// CPU has AVX-512 BF16, two FMAs elsewhere: exact products, float32 sums),
// float32 keys by FMAs, and each pass over the values keeps up to four heads'
// output rows in registers.
inline __m512 widen(const uint16_t* p) { return load_bf16x16(p); }
inline __m512 widen(const float* p) { return _mm512_loadu_ps(p); }

// One query row's dot product with one key row, in 16 float32 partial sums.
template <int D>
inline __m512 dot_row(const uint16_t* qh, const uint16_t* kh) {
    __m512 a = _mm512_setzero_ps();
    for (int d = 0; d < D; d += 32) a = dot_bf16_pairs(a, _mm512_loadu_si512(qh + d), _mm512_loadu_si512(kh + d));
    return a;
}
template <int D>
inline __m512 dot_row(const float* qh, const float* kh) {
    __m512 a = _mm512_setzero_ps();
    for (int d = 0; d < D; d += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(qh + d), _mm512_loadu_ps(kh + d), a);
    return a;
}

// Dot products of one query row with 16 key rows (`stride` elements apart),
// returned as one register: lane t holds key t's score. Each key's 16 partial
// sums are folded together with the other keys' in a transpose-and-add tree,
// three operations per key instead of a full horizontal reduction each.
template <int D, typename T>
inline __m512 dot16(const T* qh, const T* k0, int64_t stride) {
    __m512 acc[16];
    for (int t = 0; t < 16; ++t) acc[t] = dot_row<D>(qh, k0 + t * stride);
    // Keys in pairs: per 128-bit lane, [a0+a2, b0+b2, a1+a3, b1+b3].
    __m512 s1[8];
    for (int i = 0; i < 8; ++i)
        s1[i] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * i], acc[2 * i + 1]), _mm512_unpackhi_ps(acc[2 * i], acc[2 * i + 1]));
    // Pairs of pairs: per lane, the four keys' sums over that lane's quarter of the row.
    __m512 s2[4];
    for (int i = 0; i < 4; ++i) {
        const __m512d x = _mm512_castps_pd(s1[2 * i]), y = _mm512_castps_pd(s1[2 * i + 1]);
        s2[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    // Lanes across registers: lane j ends up holding keys 4j..4j+3 summed over all quarters.
    const __m512 uv = _mm512_add_ps(_mm512_shuffle_f32x4(s2[0], s2[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(s2[0], s2[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 wx = _mm512_add_ps(_mm512_shuffle_f32x4(s2[2], s2[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(s2[2], s2[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(uv, wx, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(uv, wx, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Prefetches of two runs of `lines` cache lines (either may be null), issued a few at a time.
struct SpreadPrefetch {
    const void* a;
    const void* b;
    int64_t lines;
    int64_t next = 0;
    inline void issue(int64_t n) {  // the next n lines of each run
        const int64_t end = std::min(lines, next + n);
        for (; next < end; ++next) {
            if (a) __builtin_prefetch(static_cast<const char*>(a) + next * 64, 0, 1);
            if (b) __builtin_prefetch(static_cast<const char*>(b) + next * 64, 0, 1);
        }
    }
};

template <int D, typename T>
void decode_avx512(const T* q, int64_t q_stride, const T* k_cache, const T* v_cache, const int32_t* block_tables,
                   int64_t table_stride, const int32_t* seq_lens, T* out, int num_seqs, int num_heads,
                   int num_kv_heads, int block_size, float scale, int window, float soft_cap) {
    constexpr int NV = D / 16;     // float32 registers per head row
    constexpr int MAXH = 256 / D;  // heads per pass over the values: 16 accumulators
    const int group = num_heads / num_kv_heads;
    const int64_t row = static_cast<int64_t>(num_kv_heads) * D;
    const int64_t block_elems = row * block_size;
#pragma omp parallel
    {
        std::vector<float> scores, inv_sum(num_heads);
        alignas(64) float acc_out[MAXH * D];
#pragma omp for schedule(dynamic, 1)
        for (int s = 0; s < num_seqs; ++s) {
            const int len = seq_lens[s];
            T* o = out + static_cast<int64_t>(s) * num_heads * D;
            if (len <= 0) {
                std::memset(o, 0, sizeof(T) * num_heads * D);
                continue;
            }
            const int32_t* table = block_tables + s * table_stride;
            const int num_blocks = (len + block_size - 1) / block_size;
            const int start = window_start(len, window), span = len - start;  // positions start..len - 1
            const int first = start / block_size;
            scores.resize(static_cast<size_t>(num_heads) * span);
            const T* qs = q + static_cast<int64_t>(s) * q_stride;
            prefetch_block(k_cache + table[first] * block_elems, block_elems);
            const int64_t block_lines = (block_elems * static_cast<int64_t>(sizeof(T)) + 63) / 64;
            for (int b = first; b < num_blocks; ++b) {
                // The next block's keys and this block's values are prefetched a few lines per head, spread
                // over this block's dot products: a burst of them would stall on the CPU's miss buffers.
                SpreadPrefetch pf{b + 1 < num_blocks ? k_cache + table[b + 1] * block_elems : nullptr,
                                  v_cache + table[b] * block_elems, block_lines};
                const int64_t per_head = (block_lines + num_heads - 1) / num_heads;
                const T* blk = k_cache + table[b] * block_elems;
                const int t_end = (b + 1) * block_size < len ? (b + 1) * block_size : len;
                int t = std::max(b * block_size, start);
                for (; t + 16 <= t_end; t += 16) {  // 16 keys at a time: one reduction for all
                    const T* k = blk + (t - b * block_size) * row;
                    for (int h = 0; h < num_heads; ++h) {
                        pf.issue(per_head);
                        _mm512_storeu_ps(scores.data() + static_cast<size_t>(h) * span + t - start,
                                         _mm512_mul_ps(dot16<D>(qs + h * D, k + (h / group) * D, row), _mm512_set1_ps(scale)));
                    }
                }
                pf.issue(block_lines);
                for (; t < t_end; ++t) {
                    const T* k = blk + (t - b * block_size) * row;
                    for (int h = 0; h < num_heads; ++h)
                        scores[static_cast<size_t>(h) * span + t - start] = _mm512_reduce_add_ps(dot_row<D>(qs + h * D, k + (h / group) * D)) * scale;
                }
            }
            if (soft_cap > 0.0f) soft_cap_scores(scores.data(), scores.size(), soft_cap);
            softmax_rows(scores.data(), num_heads, span, inv_sum.data());
            // The values were prefetched with the keys; the first pass over them asks again one block ahead
            // (measured faster: not all of the earlier prefetches are still in the caches here), the later
            // passes find them in L2.
            for (int kvh = 0; kvh < num_kv_heads; ++kvh) {
                for (int h0 = kvh * group; h0 < (kvh + 1) * group; h0 += MAXH) {
                    const int nh = (kvh + 1) * group - h0 < MAXH ? (kvh + 1) * group - h0 : MAXH;
                    __m512 acc[MAXH][NV];
                    for (int j = 0; j < MAXH; ++j)
                        for (int i = 0; i < NV; ++i) acc[j][i] = _mm512_setzero_ps();
                    for (int b = first; b < num_blocks; ++b) {
                        if (b + 1 < num_blocks && h0 == 0) prefetch_block(v_cache + table[b + 1] * block_elems, block_elems);
                        const T* blk = v_cache + table[b] * block_elems + kvh * D;
                        const int t_end = (b + 1) * block_size < len ? (b + 1) * block_size : len;
                        for (int t = std::max(b * block_size, start); t < t_end; ++t) {
                            const T* v = blk + (t - b * block_size) * row;
                            __m512 vf[NV];
                            for (int i = 0; i < NV; ++i) vf[i] = widen(v + 16 * i);
                            for (int j = 0; j < MAXH; ++j) {
                                if (j < nh) {
                                    const __m512 p = _mm512_set1_ps(scores[static_cast<size_t>(h0 + j) * span + t - start]);
                                    for (int i = 0; i < NV; ++i) acc[j][i] = _mm512_fmadd_ps(p, vf[i], acc[j][i]);
                                }
                            }
                        }
                    }
                    for (int j = 0; j < nh; ++j) {
                        for (int i = 0; i < NV; ++i) _mm512_store_ps(acc_out + j * D + 16 * i, acc[j][i]);
                        for (int d = 0; d < D; ++d) from_float(acc_out[j * D + d] * inv_sum[h0 + j], o + (h0 + j) * D + d);
                    }
                }
            }
        }
    }
}
// The same over an int8 pool (kv_int8.h), q and out in T (bf16 or float32). Keys
// are widened to float32 with their scale 16 at a time, for every KV head at
// once, and met by the float32 query rows as above; each value row is widened
// once and its scale folded into the head's probability.
template <int D, typename T>
void decode_int8_avx512(const T* q, int64_t q_stride, Int8Pool kp, Int8Pool vp, const int32_t* block_tables,
                        int64_t table_stride, const int32_t* seq_lens, T* out, int num_seqs, int num_heads,
                        int num_kv_heads, int block_size, float scale, int window, float soft_cap) {
    constexpr int NV = D / 16;
    constexpr int MAXH = 256 / D;
    const int group = num_heads / num_kv_heads;
    const int row = num_kv_heads * D;
    const int64_t block_bytes = kp.block_bytes;
#pragma omp parallel
    {
        std::vector<float> scores, inv_sum(num_heads), qf(static_cast<size_t>(num_heads) * D), kf(static_cast<size_t>(16) * row);
        alignas(64) float acc_out[MAXH * D];
#pragma omp for schedule(dynamic, 1)
        for (int s = 0; s < num_seqs; ++s) {
            const int len = seq_lens[s];
            T* o = out + static_cast<int64_t>(s) * num_heads * D;
            if (len <= 0) {
                std::memset(o, 0, sizeof(T) * num_heads * D);
                continue;
            }
            const int32_t* table = block_tables + s * table_stride;
            const int num_blocks = (len + block_size - 1) / block_size;
            const int start = window_start(len, window), span = len - start;  // positions start..len - 1
            const int first = start / block_size;
            scores.resize(static_cast<size_t>(num_heads) * span);
            const T* qs = q + static_cast<int64_t>(s) * q_stride;
            for (int i = 0; i < num_heads * D; ++i) qf[i] = to_float(qs[i]);
            // Widen n key rows (slots off..off+n-1 of a block) into kf, each KV head times its scale.
            auto widen_keys = [&](int64_t block, int off, int n) {
                const uint16_t* sc = kp.scales(block);
                for (int j = 0; j < n; ++j)
                    for (int h = 0; h < num_kv_heads; ++h) {
                        const __m512 sk = _mm512_set1_ps(half_to_float(sc[(off + j) * num_kv_heads + h]));
                        const int8_t* kr = kp.values(block, off + j, h);
                        for (int i = 0; i < NV; ++i)
                            _mm512_storeu_ps(kf.data() + j * row + h * D + 16 * i, _mm512_mul_ps(load_int8x16(kr + 16 * i), sk));
                    }
            };
            prefetch_block(kp.base + table[first] * block_bytes, block_bytes);
            for (int b = first; b < num_blocks; ++b) {
                if (b + 1 < num_blocks) prefetch_block(kp.base + table[b + 1] * block_bytes, block_bytes);
                const int t_end = (b + 1) * block_size < len ? (b + 1) * block_size : len;
                int t = std::max(b * block_size, start);
                for (; t + 16 <= t_end; t += 16) {
                    widen_keys(table[b], t - b * block_size, 16);
                    for (int h = 0; h < num_heads; ++h)
                        _mm512_storeu_ps(scores.data() + static_cast<size_t>(h) * span + t - start,
                                         _mm512_mul_ps(dot16<D>(qf.data() + h * D, kf.data() + (h / group) * D, row), _mm512_set1_ps(scale)));
                }
                for (; t < t_end; ++t) {
                    widen_keys(table[b], t - b * block_size, 1);
                    for (int h = 0; h < num_heads; ++h)
                        scores[static_cast<size_t>(h) * span + t - start] =
                            _mm512_reduce_add_ps(dot_row<D>(qf.data() + h * D, kf.data() + (h / group) * D)) * scale;
                }
            }
            prefetch_block(vp.base + table[first] * block_bytes, block_bytes);
            if (soft_cap > 0.0f) soft_cap_scores(scores.data(), scores.size(), soft_cap);
            softmax_rows(scores.data(), num_heads, span, inv_sum.data());
            for (int kvh = 0; kvh < num_kv_heads; ++kvh) {
                for (int h0 = kvh * group; h0 < (kvh + 1) * group; h0 += MAXH) {
                    const int nh = (kvh + 1) * group - h0 < MAXH ? (kvh + 1) * group - h0 : MAXH;
                    __m512 acc[MAXH][NV];
                    for (int j = 0; j < MAXH; ++j)
                        for (int i = 0; i < NV; ++i) acc[j][i] = _mm512_setzero_ps();
                    for (int b = first; b < num_blocks; ++b) {
                        if (b + 1 < num_blocks && h0 == 0) prefetch_block(vp.base + table[b + 1] * block_bytes, block_bytes);
                        const uint16_t* sc = vp.scales(table[b]);
                        const int t_end = (b + 1) * block_size < len ? (b + 1) * block_size : len;
                        for (int t = std::max(b * block_size, start); t < t_end; ++t) {
                            const int off = t - b * block_size;
                            const int8_t* v = vp.values(table[b], off, kvh);
                            const float sv = half_to_float(sc[off * num_kv_heads + kvh]);
                            __m512 vf[NV];
                            for (int i = 0; i < NV; ++i) vf[i] = load_int8x16(v + 16 * i);
                            for (int j = 0; j < MAXH; ++j) {
                                if (j < nh) {
                                    const __m512 p = _mm512_set1_ps(scores[static_cast<size_t>(h0 + j) * span + t - start] * sv);
                                    for (int i = 0; i < NV; ++i) acc[j][i] = _mm512_fmadd_ps(p, vf[i], acc[j][i]);
                                }
                            }
                        }
                    }
                    for (int j = 0; j < nh; ++j) {
                        for (int i = 0; i < NV; ++i) _mm512_store_ps(acc_out + j * D + 16 * i, acc[j][i]);
                        for (int d = 0; d < D; ++d) from_float(acc_out[j * D + d] * inv_sum[h0 + j], o + (h0 + j) * D + d);
                    }
                }
            }
        }
    }
}
#define PAGEDLLM_AVX512_PATH 1
#endif

// 1 where the int8-pool decode kernel is built for this head size, else 0 (the torch path then).
int decode_int8_supported(int head_dim) {
#ifdef PAGEDLLM_AVX512_PATH
    return head_dim == 64 || head_dim == 128;
#else
    (void)head_dim;
    return 0;
#endif
}

template <typename T>
int paged_decode_int8(const T* q, int64_t q_stride, const int8_t* k_cache, const int8_t* v_cache, int64_t block_bytes,
                      const int32_t* block_tables, int64_t table_stride, const int32_t* seq_lens, T* out, int num_seqs,
                      int num_heads, int num_kv_heads, int head_dim, int block_size, float scale, int window, float soft_cap) {
    if (!decode_int8_supported(head_dim)) return -1;
#ifdef PAGEDLLM_AVX512_PATH
    const Int8Pool kp{k_cache, block_bytes, block_size, num_kv_heads, head_dim}, vp{v_cache, block_bytes, block_size, num_kv_heads, head_dim};
    if (head_dim == 64)
        decode_int8_avx512<64>(q, q_stride, kp, vp, block_tables, table_stride, seq_lens, out, num_seqs, num_heads, num_kv_heads,
                               block_size, scale, window, soft_cap);
    else
        decode_int8_avx512<128>(q, q_stride, kp, vp, block_tables, table_stride, seq_lens, out, num_seqs, num_heads, num_kv_heads,
                                block_size, scale, window, soft_cap);
    return 0;
#else
    (void)q, (void)q_stride, (void)k_cache, (void)v_cache, (void)block_bytes, (void)block_tables, (void)table_stride;
    (void)seq_lens, (void)out, (void)num_seqs, (void)num_heads, (void)num_kv_heads, (void)block_size, (void)scale;
    (void)window, (void)soft_cap;
    return -1;
#endif
}

// The AVX-512 kernel for the head sizes it is built for, the generic loops for the rest.
template <typename T>
void paged_decode(const T* q, int64_t q_stride, const T* k_cache, const T* v_cache, const int32_t* block_tables, int64_t table_stride,
                  const int32_t* seq_lens, T* out, int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                  int block_size, float scale, int window, float soft_cap) {
#ifdef PAGEDLLM_AVX512_PATH
    if (head_dim == 64)
        return decode_avx512<64>(q, q_stride, k_cache, v_cache, block_tables, table_stride, seq_lens, out, num_seqs,
                                 num_heads, num_kv_heads, block_size, scale, window, soft_cap);
    if (head_dim == 128)
        return decode_avx512<128>(q, q_stride, k_cache, v_cache, block_tables, table_stride, seq_lens, out, num_seqs,
                                  num_heads, num_kv_heads, block_size, scale, window, soft_cap);
#endif
    decode(q, q_stride, k_cache, v_cache, block_tables, table_stride, seq_lens, out, num_seqs, num_heads, num_kv_heads,
           head_dim, block_size, scale, window, soft_cap);
}

}  // namespace

// Every entry point ends with window (0: attend to every position; w: to the
// last w positions, the query's own included) and soft_cap (0: none).
extern "C" {

void paged_decode_f32(const float* q, int64_t q_stride, const float* k_cache, const float* v_cache, const int32_t* block_tables,
                      int64_t table_stride, const int32_t* seq_lens, float* out, int num_seqs, int num_heads,
                      int num_kv_heads, int head_dim, int block_size, float scale, int window, float soft_cap) {
    paged_decode(q, q_stride, k_cache, v_cache, block_tables, table_stride, seq_lens, out, num_seqs, num_heads, num_kv_heads,
                 head_dim, block_size, scale, window, soft_cap);
}

int paged_decode_int8_supported(int head_dim) { return decode_int8_supported(head_dim); }

// q, out: bf16 or float32 as named; k_cache, v_cache: the halves of an int8 pool (kv_int8.h). Returns 0, or -1
// (nothing written) where paged_decode_int8_supported says no.
int paged_decode_int8_bf16(const uint16_t* q, int64_t q_stride, const int8_t* k_cache, const int8_t* v_cache, int64_t block_bytes,
                           const int32_t* block_tables, int64_t table_stride, const int32_t* seq_lens, uint16_t* out,
                           int num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size, float scale,
                           int window, float soft_cap) {
    return paged_decode_int8(q, q_stride, k_cache, v_cache, block_bytes, block_tables, table_stride, seq_lens, out, num_seqs,
                             num_heads, num_kv_heads, head_dim, block_size, scale, window, soft_cap);
}
int paged_decode_int8_f32(const float* q, int64_t q_stride, const int8_t* k_cache, const int8_t* v_cache, int64_t block_bytes,
                          const int32_t* block_tables, int64_t table_stride, const int32_t* seq_lens, float* out,
                          int num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size, float scale,
                          int window, float soft_cap) {
    return paged_decode_int8(q, q_stride, k_cache, v_cache, block_bytes, block_tables, table_stride, seq_lens, out, num_seqs,
                             num_heads, num_kv_heads, head_dim, block_size, scale, window, soft_cap);
}

void paged_decode_bf16(const uint16_t* q, int64_t q_stride, const uint16_t* k_cache, const uint16_t* v_cache,
                       const int32_t* block_tables, int64_t table_stride, const int32_t* seq_lens, uint16_t* out,
                       int num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size, float scale,
                       int window, float soft_cap) {
    paged_decode(q, q_stride, k_cache, v_cache, block_tables, table_stride, seq_lens, out, num_seqs, num_heads, num_kv_heads,
                 head_dim, block_size, scale, window, soft_cap);
}
}
