// Causal prefill attention for the CPU in bf16, every prefill sequence of a step
// in one call, reading keys and values in place through the block tables (the
// step's new keys and values are already in the pool). Flash-attention style:
// an online softmax in float32 over tiles of keys, so no [n, seq_len] score
// matrix is ever materialised, and tiles above the diagonal are never computed.
// Built at first use by cpu_kernels.py; called through ctypes.
//
// Layout: each task is (sequence, KV head, query heads sharing it, a tile of
// query tokens). Its query rows (token-major: row = token * heads + head) sit
// in the lanes of a register, 16 rows each, so that
//  - Q.K needs no transposes or horizontal sums: Q is repacked once per task
//    into d-pairs ([D/2][rows][2]) and each key's d-pair is broadcast straight
//    from the pool into vdpbf16ps (exact bf16 products, float32 sums; two
//    FMAs on CPUs without AVX-512 BF16, see kernels/cpu/csrc/bf16.h);
//  - the softmax of a tile is element-wise across registers (lane = row);
//  - P.V is done in float32 (P is never rounded to bf16), on value rows
//    widened once per tile for all the rows of the task.
//
// A sliding window (window > 0: a query at position p sees keys p - window + 1
// .. p) starts each task's key loop at its first row's window, so that no key
// or value before it is read (the engine may have given those blocks back to
// the pool), and masks, per row, the keys of a tile that lie before the row's
// window. A soft cap (Gemma 2) turns each scaled score s into cap * tanh(s / cap)
// before the mask and the softmax. Both take one more pass over a tile's scores,
// only in the layers that have them.
#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include "bf16.h"
#include "kv_int8.h"

namespace {

constexpr int MAX_ROWS = 64;    // query rows per task: four registers of 16 lanes
constexpr int TILE_KEYS = 48;   // keys per softmax tile; a multiple of every key block below
constexpr float MASKED = -1e30f;  // finite: -ffast-math assumes no infinities
// Where each row's running maximum starts: above every masked score, so that a
// row that has seen only masked keys so far (before its sliding window) takes
// probabilities 0 from them, not 2^0.
constexpr float MAX_START = 0.5f * MASKED;

// Keys per Q.K register block: keys x row registers = 24 accumulators (8 for one
// register: enough independent sums to hide the latency). Without AVX-512 BF16
// each query and key register splits into two (even and odd halves), so fewer
// accumulators leave room for them among the 32 registers.
template <int RB> constexpr int keys_per_block() {
    if constexpr (kNativeBf16) return RB == 4 ? 6 : RB == 3 ? 8 : RB == 2 ? 12 : 8;
    return RB == 4 ? 4 : RB == 3 ? 6 : RB == 2 ? 8 : 8;
}

// 2^x for x <= 0, to about 2 ulp (degree-6 Taylor polynomial of 2^f on
// |f| <= 1/2), and exactly 0 below -126 (masked scores; the first tile's
// rescale of nothing).
inline __m512 exp2_512(__m512 x) {
    const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.5403530393e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558147e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108665e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650696e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718056e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps(live, p, n);
}

// cap * tanh(x / cap) on 16 lanes (cap > 0): tanh|y| = (1 - e) / (1 + e) with e = 2^(-2 |y| log2(e)) <= 1,
// to a few 1e-7 of cap, and the sign of y put back.
inline __m512 soft_cap512(__m512 x, float cap) {
    const __m512 y = _mm512_div_ps(x, _mm512_set1_ps(cap));
    const __m512 e = exp2_512(_mm512_mul_ps(_mm512_abs_ps(y), _mm512_set1_ps(-2.0f * 1.44269504088896341f)));
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 t = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
    const __m512i sign = _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32(static_cast<int>(0x80000000u)));
    return _mm512_mul_ps(_mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t), sign)), _mm512_set1_ps(cap));
}

// Keeps a loaded vector in a register: otherwise GCC folds the load into every
// instruction that uses it, and the micro-kernels below become load-bound.
template <typename V> inline V in_register(V x) {
    asm("" : "+v"(x));
    return x;
}

// x[i] holds row i of a 16 x 16 matrix of 32-bit elements; afterwards x[j] holds column j.
inline void transpose16x16(__m512i x[16]) {
    __m512i t[16];
    for (int k = 0; k < 8; ++k) {  // per 128-bit lane: rows 2k, 2k+1 interleaved
        t[2 * k] = _mm512_unpacklo_epi32(x[2 * k], x[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_epi32(x[2 * k], x[2 * k + 1]);
    }
    __m512i u[4][4];  // u[m][c], lane L: column 4L + c of rows 4m .. 4m + 3
    for (int m = 0; m < 4; ++m) {
        u[m][0] = _mm512_unpacklo_epi64(t[4 * m], t[4 * m + 2]);
        u[m][1] = _mm512_unpackhi_epi64(t[4 * m], t[4 * m + 2]);
        u[m][2] = _mm512_unpacklo_epi64(t[4 * m + 1], t[4 * m + 3]);
        u[m][3] = _mm512_unpackhi_epi64(t[4 * m + 1], t[4 * m + 3]);
    }
    for (int c = 0; c < 4; ++c) {  // then a 4 x 4 transpose of 128-bit lanes
        const __m512i v0 = _mm512_shuffle_i32x4(u[0][c], u[1][c], _MM_SHUFFLE(1, 0, 1, 0));
        const __m512i v1 = _mm512_shuffle_i32x4(u[0][c], u[1][c], _MM_SHUFFLE(3, 2, 3, 2));
        const __m512i v2 = _mm512_shuffle_i32x4(u[2][c], u[3][c], _MM_SHUFFLE(1, 0, 1, 0));
        const __m512i v3 = _mm512_shuffle_i32x4(u[2][c], u[3][c], _MM_SHUFFLE(3, 2, 3, 2));
        x[c] = _mm512_shuffle_i32x4(v0, v2, _MM_SHUFFLE(2, 0, 2, 0));
        x[4 + c] = _mm512_shuffle_i32x4(v0, v2, _MM_SHUFFLE(3, 1, 3, 1));
        x[8 + c] = _mm512_shuffle_i32x4(v1, v3, _MM_SHUFFLE(2, 0, 2, 0));
        x[12 + c] = _mm512_shuffle_i32x4(v1, v3, _MM_SHUFFLE(3, 1, 3, 1));
    }
}

// Scores of rows 16 * B0 .. R - 1 (R = 16 * RB) against NKB keys, in log2 units:
// st[k * R + row] = q_row . k * scale * log2(e), or MASKED where MASK and the
// key (at position kpos + k) lies after the row's position; rows before 16 * B0
// (all of whose positions come before kpos) get MASKED without being computed.
// qp holds the rows' d-pairs ([D/2][R] of 32 bits); keys[k] points at key k's
// row in the pool. mx[b] takes the running maximum of each row.
// kscale (an int8 pool's keys, given as their exact integer values in bf16): each key's
// scores are multiplied by its scale too; nullptr: no per-key scale.
template <int D, int RB, int B0, bool MASK>
inline void qk_block(const uint32_t* qp, const uint16_t* const* keys, float* st, float scale, int kpos,
                     const int32_t* qpos, __m512* mx, const float* kscale) {
    constexpr int R = 16 * RB, NKB = keys_per_block<RB>(), NB = RB - B0;
    const uint16_t* k[NKB];
    for (int j = 0; j < NKB; ++j) k[j] = keys[j];
    __m512 acc[NKB][NB];
    for (int j = 0; j < NKB; ++j)
        for (int b = 0; b < NB; ++b) acc[j][b] = _mm512_setzero_ps();
    for (int p = 0; p < D / 2; ++p) {
        __m512i qv[NB];
        for (int b = 0; b < NB; ++b) qv[b] = in_register(_mm512_load_si512(qp + p * R + 16 * (B0 + b)));
        for (int j = 0; j < NKB; ++j) {
            int32_t pair;
            std::memcpy(&pair, k[j] + 2 * p, sizeof pair);
            const __m512i kb = _mm512_set1_epi32(pair);
            for (int b = 0; b < NB; ++b) acc[j][b] = dot_bf16_pairs(acc[j][b], qv[b], kb);
        }
    }
    for (int j = 0; j < NKB; ++j) {
        const __m512 s = _mm512_set1_ps(kscale ? scale * kscale[j] : scale);
        for (int b = 0; b < B0; ++b) _mm512_store_ps(st + j * R + 16 * b, _mm512_set1_ps(MASKED));
        for (int b = 0; b < NB; ++b) {
            __m512 x = _mm512_mul_ps(acc[j][b], s);
            if constexpr (MASK) {
                const __m512i rpos = _mm512_load_si512(qpos + 16 * (B0 + b));
                x = _mm512_mask_mov_ps(x, _mm512_cmpgt_epi32_mask(_mm512_set1_epi32(kpos + j), rpos), _mm512_set1_ps(MASKED));
            }
            mx[B0 + b] = _mm512_max_ps(mx[B0 + b], x);
            _mm512_store_ps(st + j * R + 16 * (B0 + b), x);
        }
    }
}

// A block of keys on the diagonal: only the row registers from the first one
// that reaches position kpos on are computed (rows are in position order).
template <int D, int RB>
inline void qk_diagonal_block(const uint32_t* qp, const uint16_t* const* keys, float* st, float scale, int kpos,
                              const int32_t* qpos, __m512* mx, const float* kscale) {
    int b0 = 0;
    while (b0 < RB - 1 && qpos[16 * b0 + 15] < kpos) ++b0;
    switch (b0) {
        case 0: return qk_block<D, RB, 0, true>(qp, keys, st, scale, kpos, qpos, mx, kscale);
        case 1: if constexpr (RB > 1) return qk_block<D, RB, 1, true>(qp, keys, st, scale, kpos, qpos, mx, kscale); break;
        case 2: if constexpr (RB > 2) return qk_block<D, RB, 2, true>(qp, keys, st, scale, kpos, qpos, mx, kscale); break;
        default: if constexpr (RB > 3) return qk_block<D, RB, 3, true>(qp, keys, st, scale, kpos, qpos, mx, kscale); break;
    }
}

// o[i] = o[i] * alpha[i] + sum_k p[k * R + i] * v[k], for NR rows and 64 of
// the D columns (6 x 4 accumulators; wider rows go 64 columns at a time).
template <int D, int NR>
inline void pv_rows(float* o, const float* alpha, const float* p, int R, const float* v, int nk) {
    constexpr int NV = 4;
    __m512 acc[NR][NV];
    for (int i = 0; i < NR; ++i) {
        const __m512 a = _mm512_set1_ps(alpha[i]);
        for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_mul_ps(_mm512_load_ps(o + i * D + 16 * j), a);
    }
    for (int k = 0; k < nk; ++k) {
        __m512 vk[NV];
        for (int j = 0; j < NV; ++j) vk[j] = in_register(_mm512_load_ps(v + k * D + 16 * j));
        for (int i = 0; i < NR; ++i) {
            const __m512 pk = _mm512_set1_ps(p[k * R + i]);
            for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_fmadd_ps(pk, vk[j], acc[i][j]);
        }
    }
    for (int i = 0; i < NR; ++i)
        for (int j = 0; j < NV; ++j) _mm512_store_ps(o + i * D + 16 * j, acc[i][j]);
}

// All `rows` rows, in blocks of 6 with shorter blocks at the end. A block
// stops at its last row's position: the keys past it have probability 0.
template <int D>
inline void pv_tile(float* o, const float* alpha, const float* p, int R, const float* v, int nk, int rows,
                    const int32_t* qpos, int k0) {
    constexpr int NR = 6;
    auto keys = [&](int r, int n) { return std::min(nk, qpos[r + n - 1] - k0 + 1); };
    for (int c = 0; c < D; c += 64) {
        int r = 0;
        for (; r + NR <= rows; r += NR) pv_rows<D, NR>(o + r * D + c, alpha + r, p + r, R, v + c, keys(r, NR));
        if (rows - r >= NR / 2) {
            pv_rows<D, NR / 2>(o + r * D + c, alpha + r, p + r, R, v + c, keys(r, NR / 2));
            r += NR / 2;
        }
        for (; r < rows; ++r) pv_rows<D, 1>(o + r * D + c, alpha + r, p + r, R, v + c, keys(r, 1));
    }
}

struct Args {  // one call's inputs
    const uint16_t* q;
    int64_t q_stride;
    const uint16_t *k_cache, *v_cache;  // a bf16 pool; or
    const int8_t *k8, *v8;              // an int8 pool (kv_int8.h), block_bytes per block
    int64_t block_bytes;
    const int32_t* block_tables;
    int64_t table_stride;
    const int32_t *query_start_loc, *seq_lens;
    uint16_t* out;
    int num_heads, num_kv_heads, group, block_size;
    float scale;  // in log2 units
    int window;      // 0: none
    float soft_cap;  // in log2 units; 0: none
};

struct Task {
    int seq, kv_head, head0, heads, tok0, toks;  // heads head0.. of the KV head's group; tokens tok0.. of the chunk
    int64_t cost;
};

// Where a task's row r (token r / heads, head r % heads) lives in q and in out.
template <int D>
inline int64_t q_offset(const Args& a, const Task& t, int r) {
    return static_cast<int64_t>(a.query_start_loc[t.seq] + t.tok0 + r / t.heads) * a.q_stride + (t.kv_head * a.group + t.head0 + r % t.heads) * D;
}
template <int D>
inline int64_t out_offset(const Args& a, const Task& t, int r) {
    return (static_cast<int64_t>(a.query_start_loc[t.seq] + t.tok0 + r / t.heads) * a.num_heads + t.kv_head * a.group + t.head0 + r % t.heads) * D;
}

// A task's query rows (to read) and output rows (to write) are far from the
// caches: ask for them while the task before it computes.
template <int D>
void prefetch_task(const Args& a, const Task& t) {
    for (int tok = 0; tok < t.toks; ++tok) {
        const char* src = reinterpret_cast<const char*>(a.q + q_offset<D>(a, t, tok * t.heads));
        const char* dst = reinterpret_cast<const char*>(a.out + out_offset<D>(a, t, tok * t.heads));
        for (int c = 0; c < t.heads * D * 2; c += 64) {
            _mm_prefetch(src + c, _MM_HINT_T0);
            __builtin_prefetch(dst + c, 1, 3);
        }
    }
}

struct Scratch {  // one thread's buffers, 64-byte aligned
    uint32_t* qp;  // [D/2][R] query d-pairs
    float* st;     // [TILE_KEYS][R] scores, then probabilities
    float* vf;     // [TILE_KEYS][D] the tile's values in float32
    float* o;      // [R][D] unnormalised outputs
    float* alpha;  // [R] this tile's rescale of o
    uint16_t* kq;  // [TILE_KEYS][D] an int8 pool's keys as bf16 integers (exact)
    const uint16_t* keys[TILE_KEYS];
    const uint16_t* values[TILE_KEYS];
    const int8_t* values8[TILE_KEYS];
    alignas(64) float kscale[TILE_KEYS];
    float vscale[TILE_KEYS];
    void* mem;
    explicit Scratch(int d) {
        const size_t sizes[] = {sizeof(uint32_t) * d / 2 * MAX_ROWS, sizeof(float) * TILE_KEYS * MAX_ROWS,
                                sizeof(float) * TILE_KEYS * d, sizeof(float) * MAX_ROWS * d, sizeof(float) * MAX_ROWS,
                                sizeof(uint16_t) * TILE_KEYS * d};
        size_t total = 0;
        for (size_t s : sizes) total += (s + 63) / 64 * 64;
        mem = std::aligned_alloc(64, total);
        char* p = static_cast<char*>(mem);
        void** out[] = {reinterpret_cast<void**>(&qp), reinterpret_cast<void**>(&st), reinterpret_cast<void**>(&vf),
                        reinterpret_cast<void**>(&o), reinterpret_cast<void**>(&alpha), reinterpret_cast<void**>(&kq)};
        for (int i = 0; i < 6; ++i) {
            *out[i] = p;
            p += (sizes[i] + 63) / 64 * 64;
        }
    }
    ~Scratch() { std::free(mem); }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
};

alignas(64) const uint16_t zero_row[128] = {};  // stands in for the keys past a tile's end

template <int D, int RB, bool Q8>
void run_task(const Args& a, const Task& t, Scratch& w) {
    constexpr int R = 16 * RB, NKB = keys_per_block<RB>();
    const int rows = t.toks * t.heads;
    const int64_t slot = static_cast<int64_t>(a.num_kv_heads) * D;  // one token's keys, all KV heads
    const int32_t* table = a.block_tables + t.seq * a.table_stride;
    const int chunk = a.query_start_loc[t.seq + 1] - a.query_start_loc[t.seq];
    const int block_size = a.block_size;
    const uint16_t *k_cache = a.k_cache, *v_cache = a.v_cache;
    const int pos0 = a.seq_lens[t.seq] - chunk + t.tok0;  // position of the task's first query token
    const int key_end = pos0 + t.toks;          // keys key_begin .. key_end - 1 are seen by some row
    // With a sliding window, the first row's window starts the keys: nothing before it is read.
    const int key_begin = a.window > 0 ? std::max(0, pos0 - a.window + 1) : 0;
    const int lo_end = a.window > 0 ? std::max(0, key_end - a.window) : 0;  // keys before it lie outside some row's window

    alignas(64) int32_t qpos[R], qlo[R];  // each row sees keys qlo .. qpos
    for (int r = 0; r < R; ++r) {
        qpos[r] = r < rows ? pos0 + r / t.heads : INT_MAX;  // padding rows: never masked
        qlo[r] = r < rows && a.window > 0 ? std::max(0, qpos[r] - a.window + 1) : 0;
    }
    for (int b = 0; b < RB; ++b) {  // 16 rows at a time, 16 d-pairs at a time: a 16 x 16 transpose of 32-bit pairs
        const uint16_t* src[16];
        for (int i = 0; i < 16; ++i) {
            const int r = 16 * b + i;
            src[i] = r < rows ? a.q + q_offset<D>(a, t, r) : nullptr;
        }
        for (int c = 0; c < D / 32; ++c) {
            __m512i x[16];
            for (int i = 0; i < 16; ++i) x[i] = src[i] ? _mm512_loadu_si512(src[i] + 32 * c) : _mm512_setzero_si512();
            transpose16x16(x);
            for (int i = 0; i < 16; ++i) _mm512_store_si512(w.qp + (16 * c + i) * R + 16 * b, x[i]);
        }
    }
    std::memset(w.o, 0, sizeof(float) * rows * D);
    __m512 m[RB], l[RB];
    for (int b = 0; b < RB; ++b) {
        m[b] = _mm512_set1_ps(MAX_START);
        l[b] = _mm512_setzero_ps();
    }

    for (int k0 = key_begin; k0 < key_end; k0 += TILE_KEYS) {
        const int nk = std::min(TILE_KEYS, key_end - k0);
        const int nkp = (nk + NKB - 1) / NKB * NKB;
        for (int k = 0; k < nk; ++k) {
            const int pos = k0 + k;
            if constexpr (Q8) {
                // The keys as their integers in bf16 (exact: |value| <= 127), their scales applied to the scores.
                const int64_t block = table[pos / block_size];
                const int in_block = pos % block_size;
                const Int8Pool kp{a.k8, a.block_bytes, block_size, a.num_kv_heads, D}, vp{a.v8, a.block_bytes, block_size, a.num_kv_heads, D};
                const int8_t* kr = kp.values(block, in_block, t.kv_head);
                for (int j = 0; j < D / 16; ++j)
                    _mm256_store_si256(reinterpret_cast<__m256i*>(w.kq + k * D + 16 * j), to_bf16x16(load_int8x16(kr + 16 * j)));
                w.keys[k] = w.kq + k * D;
                w.kscale[k] = half_to_float(kp.scales(block)[in_block * a.num_kv_heads + t.kv_head]);
                w.values8[k] = vp.values(block, in_block, t.kv_head);
                w.vscale[k] = half_to_float(vp.scales(block)[in_block * a.num_kv_heads + t.kv_head]);
            } else {
                const int64_t off = (static_cast<int64_t>(table[pos / block_size]) * block_size + pos % block_size) * slot + t.kv_head * D;
                w.keys[k] = k_cache + off;
                w.values[k] = v_cache + off;
            }
        }
        for (int k = nk; k < nkp; ++k) {
            w.keys[k] = zero_row;
            w.kscale[k] = 1.0f;
        }
        // The next tile's rows come from blocks anywhere in the pool: fetch them while this one computes.
        for (int pos = k0 + TILE_KEYS; pos < std::min(key_end, k0 + 2 * TILE_KEYS); ++pos) {
            const char *kr, *vr;
            int bytes;
            if constexpr (Q8) {
                const int64_t off = static_cast<int64_t>(table[pos / block_size]) * a.block_bytes +
                                    (static_cast<int64_t>(pos % block_size) * a.num_kv_heads + t.kv_head) * D;
                kr = reinterpret_cast<const char*>(a.k8 + off), vr = reinterpret_cast<const char*>(a.v8 + off), bytes = D;
            } else {
                const int64_t off = (static_cast<int64_t>(table[pos / block_size]) * block_size + pos % block_size) * slot + t.kv_head * D;
                kr = reinterpret_cast<const char*>(k_cache + off), vr = reinterpret_cast<const char*>(v_cache + off), bytes = D * 2;
            }
            for (int c = 0; c < bytes; c += 64) {
                _mm_prefetch(kr + c, _MM_HINT_T0);
                _mm_prefetch(vr + c, _MM_HINT_T0);
            }
        }
        const float* kscale = Q8 ? w.kscale : nullptr;
        __m512 mx[RB];
        for (int b = 0; b < RB; ++b) mx[b] = m[b];
        if (k0 + nkp - 1 > pos0) {  // the tile reaches past the first row's position: mask key > row position
            for (int k = 0; k < nkp; k += NKB)
                qk_diagonal_block<D, RB>(w.qp, w.keys + k, w.st + k * R, a.scale, k0 + k, qpos, mx, kscale ? kscale + k : nullptr);
        } else {
            for (int k = 0; k < nkp; k += NKB)
                qk_block<D, RB, 0, false>(w.qp, w.keys + k, w.st + k * R, a.scale, k0 + k, qpos, mx, kscale ? kscale + k : nullptr);
        }
        if (a.soft_cap > 0.0f || k0 < lo_end) {
            // Soft-capped scores, and the keys before each row's window masked: the rows' maxima taken again.
            for (int b = 0; b < RB; ++b) {
                const __m512i hi = _mm512_load_si512(qpos + 16 * b), lo = _mm512_load_si512(qlo + 16 * b);
                __m512 mb = m[b];
                for (int k = 0; k < nkp; ++k) {
                    __m512 x = _mm512_load_ps(w.st + k * R + 16 * b);
                    if (a.soft_cap > 0.0f) x = soft_cap512(x, a.soft_cap);
                    const __m512i kpos = _mm512_set1_epi32(k0 + k);
                    const __mmask16 hidden = _mm512_cmpgt_epi32_mask(kpos, hi) | _mm512_cmpgt_epi32_mask(lo, kpos);
                    x = _mm512_mask_mov_ps(x, hidden, _mm512_set1_ps(MASKED));
                    mb = _mm512_max_ps(mb, x);
                    _mm512_store_ps(w.st + k * R + 16 * b, x);
                }
                mx[b] = mb;
            }
        }
        // Online softmax, lane = row: the rescale of what came before, probabilities
        // (0 without computing them past the register's last row position).
        for (int b = 0; b < RB; ++b) {
            const __m512 alpha = exp2_512(_mm512_sub_ps(m[b], mx[b]));
            __m512 sum = _mm512_setzero_ps();
            const int last = qpos[16 * b + 15] - k0;  // INT_MAX - k0 for padding rows: no overflow
            const int live = last >= nkp ? nkp : std::max(0, last + 1);
            for (int k = 0; k < live; ++k) {
                const __m512 p = exp2_512(_mm512_sub_ps(_mm512_load_ps(w.st + k * R + 16 * b), mx[b]));
                _mm512_store_ps(w.st + k * R + 16 * b, p);
                sum = _mm512_add_ps(sum, p);
            }
            for (int k = live; k < nkp; ++k) _mm512_store_ps(w.st + k * R + 16 * b, _mm512_setzero_ps());
            l[b] = _mm512_fmadd_ps(l[b], alpha, sum);
            m[b] = mx[b];
            _mm512_store_ps(w.alpha + 16 * b, alpha);
        }
        for (int k = 0; k < nk; ++k) {
            if constexpr (Q8) {
                const __m512 sv = _mm512_set1_ps(w.vscale[k]);
                for (int j = 0; j < D / 16; ++j) _mm512_store_ps(w.vf + k * D + 16 * j, _mm512_mul_ps(load_int8x16(w.values8[k] + 16 * j), sv));
            } else {
                for (int j = 0; j < D / 16; ++j) _mm512_store_ps(w.vf + k * D + 16 * j, load_bf16x16(w.values[k] + 16 * j));
            }
        }
        pv_tile<D>(w.o, w.alpha, w.st, R, w.vf, nk, rows, qpos, k0);
    }

    alignas(64) float inv[R];
    for (int b = 0; b < RB; ++b) _mm512_store_ps(inv + 16 * b, _mm512_div_ps(_mm512_set1_ps(1.0f), l[b]));
    for (int r = 0; r < rows; ++r) {
        uint16_t* dst = a.out + out_offset<D>(a, t, r);
        const __m512 s = _mm512_set1_ps(inv[r]);
        for (int j = 0; j < D / 16; ++j) {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * j), to_bf16x16(_mm512_mul_ps(_mm512_load_ps(w.o + r * D + 16 * j), s)));
        }
    }
}

template <int D, bool Q8>
void prefill(Args a, int num_seqs) {
    a.scale *= 1.44269504088896341f;  // scores in log2 units: the softmax takes 2^x
    a.soft_cap *= 1.44269504088896341f;  // cap * tanh(s / cap), s in log2 units: the same with the cap in them
    const int heads_per_task = std::min(a.group, MAX_ROWS);
    const int toks_per_task = std::max(1, MAX_ROWS / heads_per_task);
    std::vector<Task> tasks;
    for (int s = 0; s < num_seqs; ++s) {
        const int chunk = a.query_start_loc[s + 1] - a.query_start_loc[s];
        for (int kvh = 0; kvh < a.num_kv_heads; ++kvh)
            for (int h0 = 0; h0 < a.group; h0 += heads_per_task)
                for (int t0 = 0; t0 < chunk; t0 += toks_per_task) {
                    const int heads = std::min(heads_per_task, a.group - h0), toks = std::min(toks_per_task, chunk - t0);
                    int64_t keys = a.seq_lens[s] - chunk + t0 + toks;
                    if (a.window > 0) keys = std::min<int64_t>(keys, a.window + toks - 1);
                    tasks.push_back({s, kvh, h0, heads, t0, toks, keys * ((toks * heads + 15) / 16)});
                }
    }
    // Longest sequences first, and the longest tiles of each first, so that short
    // ones fill the gaps at the end; a sequence's tasks run together, so its keys
    // and values stay in the caches while all of them read them.
    std::vector<int64_t> seq_cost(num_seqs, 0);
    for (const Task& t : tasks) seq_cost[t.seq] += t.cost;
    std::stable_sort(tasks.begin(), tasks.end(), [&](const Task& x, const Task& y) {
        if (x.seq != y.seq) return seq_cost[x.seq] != seq_cost[y.seq] ? seq_cost[x.seq] > seq_cost[y.seq] : x.seq < y.seq;
        return x.cost > y.cost;
    });
    const int num_tasks = static_cast<int>(tasks.size());
    // Each thread claims its next task before running the current one, so that
    // it can prefetch that task's rows (a dynamic schedule of one task at a time).
    std::atomic<int> next{0};
#pragma omp parallel
    {
        Scratch w(D);
        int i = next.fetch_add(1);
        while (i < num_tasks) {
            const int j = next.fetch_add(1);
            if (j < num_tasks) prefetch_task<D>(a, tasks[j]);
            const Task& t = tasks[i];
            switch ((t.toks * t.heads + 15) / 16) {
                case 1: run_task<D, 1, Q8>(a, t, w); break;
                case 2: run_task<D, 2, Q8>(a, t, w); break;
                case 3: run_task<D, 3, Q8>(a, t, w); break;
                default: run_task<D, 4, Q8>(a, t, w); break;
            }
            i = j;
        }
    }
}

}  // namespace
#define PAGEDLLM_PREFILL_AVX512_BF16 1
#endif

extern "C" {

// 1 where paged_prefill_bf16 runs for this head size on this build, else 0.
int paged_prefill_bf16_supported(int head_dim) {
#ifdef PAGEDLLM_PREFILL_AVX512_BF16
    return head_dim == 64 || head_dim == 128;
#else
    (void)head_dim;
    return 0;
#endif
}

// q: [T, num_heads, head_dim] with q_stride elements from one token to the next
// (a view into the fused QKV projection); out: [T, num_heads, head_dim]. They hold
// the prefill rows only: sequence s owns rows
// query_start_loc[s] .. query_start_loc[s + 1] - 1, its last seq_lens[s] - 1.
// k_cache, v_cache: [blocks, block_size, num_kv_heads, head_dim]. block_tables:
// [num_seqs, table_stride]. window: a query at position p sees keys p - window + 1
// .. p (0: 0 .. p); soft_cap: cap of the scaled scores (0: none). Returns 0, or -1
// (nothing written) where unsupported.
int paged_prefill_bf16(const uint16_t* q, int64_t q_stride, const uint16_t* k_cache, const uint16_t* v_cache,
                       const int32_t* block_tables, int64_t table_stride, const int32_t* query_start_loc,
                       const int32_t* seq_lens, uint16_t* out, int num_seqs, int num_heads, int num_kv_heads,
                       int head_dim, int block_size, float scale, int window, float soft_cap) {
    if (!paged_prefill_bf16_supported(head_dim) || num_kv_heads <= 0 || num_heads % num_kv_heads) return -1;
#ifdef PAGEDLLM_PREFILL_AVX512_BF16
    const Args a{q, q_stride, k_cache, v_cache, nullptr, nullptr, 0, block_tables, table_stride, query_start_loc, seq_lens, out,
                 num_heads, num_kv_heads, num_heads / num_kv_heads, block_size, scale, window, soft_cap};
    if (head_dim == 64)
        prefill<64, false>(a, num_seqs);
    else
        prefill<128, false>(a, num_seqs);
    return 0;
#else
    (void)q, (void)q_stride, (void)k_cache, (void)v_cache, (void)block_tables, (void)table_stride, (void)query_start_loc;
    (void)seq_lens, (void)out, (void)num_seqs, (void)block_size, (void)scale, (void)window, (void)soft_cap;
    return -1;
#endif
}

// The same over an int8 pool (kv_int8.h): k_cache and v_cache are its halves, block_bytes per block.
int paged_prefill_int8_bf16(const uint16_t* q, int64_t q_stride, const int8_t* k_cache, const int8_t* v_cache, int64_t block_bytes,
                            const int32_t* block_tables, int64_t table_stride, const int32_t* query_start_loc,
                            const int32_t* seq_lens, uint16_t* out, int num_seqs, int num_heads, int num_kv_heads,
                            int head_dim, int block_size, float scale, int window, float soft_cap) {
    if (!paged_prefill_bf16_supported(head_dim) || num_kv_heads <= 0 || num_heads % num_kv_heads) return -1;
#ifdef PAGEDLLM_PREFILL_AVX512_BF16
    const Args a{q, q_stride, nullptr, nullptr, k_cache, v_cache, block_bytes, block_tables, table_stride, query_start_loc, seq_lens,
                 out, num_heads, num_kv_heads, num_heads / num_kv_heads, block_size, scale, window, soft_cap};
    if (head_dim == 64)
        prefill<64, true>(a, num_seqs);
    else
        prefill<128, true>(a, num_seqs);
    return 0;
#else
    (void)q, (void)q_stride, (void)k_cache, (void)v_cache, (void)block_bytes, (void)block_tables, (void)table_stride;
    (void)query_start_loc, (void)seq_lens, (void)out, (void)num_seqs, (void)block_size, (void)scale, (void)window;
    (void)soft_cap;
    return -1;
#endif
}
}
