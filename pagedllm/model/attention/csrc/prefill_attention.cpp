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
//    from the pool into vdpbf16ps (exact bf16 products, float32 sums);
//  - the softmax of a tile is element-wise across registers (lane = row);
//  - P.V is done in float32 (P is never rounded to bf16), on value rows
//    widened once per tile for all the rows of the task.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

namespace {

constexpr int MAX_ROWS = 64;    // query rows per task: four registers of 16 lanes
constexpr int TILE_KEYS = 48;   // keys per softmax tile; a multiple of every key block below
constexpr float MASKED = -1e30f;  // finite: -ffast-math assumes no infinities

// Keys per Q.K register block, so that keys x row-registers stay at 24 accumulators.
template <int RB> constexpr int keys_per_block() { return RB == 4 ? 6 : RB == 3 ? 8 : RB == 2 ? 12 : 8; }

// exp(x) for x <= 0 to about 1 ulp (Cephes' expf polynomial), and exactly 0
// below -87 (masked scores and the first tile's rescale of nothing).
inline __m512 exp512(__m512 x) {
    const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_scalef_ps(live, p, n);
}

inline __m512 widen(const uint16_t* p) {  // 16 bf16 -> float32: a 16-bit shift each
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// Scores of all R = 16 * RB rows against NKB keys: st[k * R + row] = scale * q_row . k.
// qp holds the rows' d-pairs ([D/2][R] of 32 bits); keys[k] points at key k's row in the pool.
template <int D, int RB>
inline void qk_block(const uint32_t* qp, const uint16_t* const* keys, float* st, float scale) {
    constexpr int R = 16 * RB, NKB = keys_per_block<RB>();
    const uint16_t* k[NKB];
    for (int j = 0; j < NKB; ++j) k[j] = keys[j];
    __m512 acc[NKB][RB];
    for (int j = 0; j < NKB; ++j)
        for (int b = 0; b < RB; ++b) acc[j][b] = _mm512_setzero_ps();
    for (int p = 0; p < D / 2; ++p) {
        __m512i qv[RB];
        for (int b = 0; b < RB; ++b) qv[b] = _mm512_load_si512(qp + p * R + 16 * b);
        for (int j = 0; j < NKB; ++j) {
            int32_t pair;
            std::memcpy(&pair, k[j] + 2 * p, sizeof pair);
            const __m512i kb = _mm512_set1_epi32(pair);
            for (int b = 0; b < RB; ++b) acc[j][b] = _mm512_dpbf16_ps(acc[j][b], (__m512bh)qv[b], (__m512bh)kb);
        }
    }
    const __m512 s = _mm512_set1_ps(scale);
    for (int j = 0; j < NKB; ++j)
        for (int b = 0; b < RB; ++b) _mm512_store_ps(st + j * R + 16 * b, _mm512_mul_ps(acc[j][b], s));
}

// o[i] = o[i] * alpha[i] + sum_k p[k * R + i] * v[k], for NR rows of D floats.
template <int D, int NR>
inline void pv_rows(float* o, const float* alpha, const float* p, int R, const float* v, int nk) {
    constexpr int NV = D / 16;
    __m512 acc[NR][NV];
    for (int i = 0; i < NR; ++i) {
        const __m512 a = _mm512_set1_ps(alpha[i]);
        for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_mul_ps(_mm512_load_ps(o + i * D + 16 * j), a);
    }
    for (int k = 0; k < nk; ++k) {
        __m512 vk[NV];
        for (int j = 0; j < NV; ++j) vk[j] = _mm512_load_ps(v + k * D + 16 * j);
        for (int i = 0; i < NR; ++i) {
            const __m512 pk = _mm512_set1_ps(p[k * R + i]);
            for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_fmadd_ps(pk, vk[j], acc[i][j]);
        }
    }
    for (int i = 0; i < NR; ++i)
        for (int j = 0; j < NV; ++j) _mm512_store_ps(o + i * D + 16 * j, acc[i][j]);
}

// All `rows` rows, in blocks of NR with one shorter block at the end.
template <int D, int NR>
inline void pv_tile(float* o, const float* alpha, const float* p, int R, const float* v, int nk, int rows) {
    int r = 0;
    for (; r + NR <= rows; r += NR) pv_rows<D, NR>(o + r * D, alpha + r, p + r, R, v, nk);
    if constexpr (NR > 1) {
        const int left = rows - r;
        if (left > 0) {
            if constexpr (NR > 2) {
                if (left >= NR / 2) {
                    pv_rows<D, NR / 2>(o + r * D, alpha + r, p + r, R, v, nk);
                    r += NR / 2;
                }
            }
            for (; r < rows; ++r) pv_rows<D, 1>(o + r * D, alpha + r, p + r, R, v, nk);
        }
    }
}

struct Task {
    int seq, kv_head, head0, heads, tok0, toks;  // heads head0.. of the KV head's group; tokens tok0.. of the chunk
    int64_t cost;
};

struct Scratch {  // one thread's buffers, 64-byte aligned
    uint32_t* qp;  // [D/2][R] query d-pairs
    float* st;     // [TILE_KEYS][R] scores, then probabilities
    float* vf;     // [TILE_KEYS][D] the tile's values in float32
    float* o;      // [R][D] unnormalised outputs
    float* alpha;  // [R] this tile's rescale of o
    const uint16_t* keys[TILE_KEYS];
    const uint16_t* values[TILE_KEYS];
    void* mem;
    explicit Scratch(int d) {
        const size_t sizes[] = {sizeof(uint32_t) * d / 2 * MAX_ROWS, sizeof(float) * TILE_KEYS * MAX_ROWS,
                                sizeof(float) * TILE_KEYS * d, sizeof(float) * MAX_ROWS * d, sizeof(float) * MAX_ROWS};
        size_t total = 0;
        for (size_t s : sizes) total += (s + 63) / 64 * 64;
        mem = std::aligned_alloc(64, total);
        char* p = static_cast<char*>(mem);
        void** out[] = {reinterpret_cast<void**>(&qp), reinterpret_cast<void**>(&st), reinterpret_cast<void**>(&vf),
                        reinterpret_cast<void**>(&o), reinterpret_cast<void**>(&alpha)};
        for (int i = 0; i < 5; ++i) {
            *out[i] = p;
            p += (sizes[i] + 63) / 64 * 64;
        }
    }
    ~Scratch() { std::free(mem); }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
};

alignas(64) const uint16_t zero_row[128] = {};  // stands in for the keys past a tile's end

template <int D, int RB>
void run_task(const Task& t, Scratch& w, const uint16_t* q, int64_t q_stride, const uint16_t* k_cache, const uint16_t* v_cache,
              const int32_t* table, int q_start, int seq_len, int chunk, uint16_t* out, int num_heads,
              int num_kv_heads, int group, int block_size, float scale) {
    constexpr int R = 16 * RB, NKB = keys_per_block<RB>();
    const int rows = t.toks * t.heads;
    const int64_t slot = static_cast<int64_t>(num_kv_heads) * D;  // one token's keys, all KV heads
    const int first_head = t.kv_head * group + t.head0;
    const int pos0 = seq_len - chunk + t.tok0;  // position of the task's first query token
    const int key_end = pos0 + t.toks;          // keys 0 .. key_end - 1 are seen by some row

    alignas(64) int32_t qpos[R];
    for (int r = 0; r < R; ++r) qpos[r] = r < rows ? pos0 + r / t.heads : INT_MAX;  // padding rows: never masked
    for (int r = 0; r < R; ++r) {
        if (r >= rows) {
            for (int p = 0; p < D / 2; ++p) w.qp[p * R + r] = 0u;
            continue;
        }
        const uint16_t* src = q + static_cast<int64_t>(q_start + t.tok0 + r / t.heads) * q_stride + (first_head + r % t.heads) * D;
        for (int p = 0; p < D / 2; ++p) std::memcpy(w.qp + p * R + r, src + 2 * p, sizeof(uint32_t));
    }
    std::memset(w.o, 0, sizeof(float) * rows * D);
    __m512 m[RB], l[RB];
    for (int b = 0; b < RB; ++b) {
        m[b] = _mm512_set1_ps(MASKED);
        l[b] = _mm512_setzero_ps();
    }

    for (int k0 = 0; k0 < key_end; k0 += TILE_KEYS) {
        const int nk = std::min(TILE_KEYS, key_end - k0);
        const int nkp = (nk + NKB - 1) / NKB * NKB;
        for (int k = 0; k < nk; ++k) {
            const int pos = k0 + k;
            const int64_t off = (static_cast<int64_t>(table[pos / block_size]) * block_size + pos % block_size) * slot + t.kv_head * D;
            w.keys[k] = k_cache + off;
            w.values[k] = v_cache + off;
        }
        for (int k = nk; k < nkp; ++k) w.keys[k] = zero_row;
        for (int k = 0; k < nkp; k += NKB) qk_block<D, RB>(w.qp, w.keys + k, w.st + k * R, scale);
        if (k0 + nkp - 1 > pos0) {  // the tile reaches past the first row's position: mask key > row position
            for (int k = 0; k < nkp; ++k) {
                const __m512i kpos = _mm512_set1_epi32(k0 + k);
                for (int b = 0; b < RB; ++b) {
                    const __mmask16 above = _mm512_cmpgt_epi32_mask(kpos, _mm512_load_si512(qpos + 16 * b));
                    _mm512_mask_store_ps(w.st + k * R + 16 * b, above, _mm512_set1_ps(MASKED));
                }
            }
        }
        // Online softmax, lane = row: new maxima, the rescale of what came before, probabilities.
        for (int b = 0; b < RB; ++b) {
            __m512 mx = m[b];
            for (int k = 0; k < nkp; ++k) mx = _mm512_max_ps(mx, _mm512_load_ps(w.st + k * R + 16 * b));
            const __m512 a = exp512(_mm512_sub_ps(m[b], mx));
            __m512 sum = _mm512_setzero_ps();
            for (int k = 0; k < nkp; ++k) {
                const __m512 p = exp512(_mm512_sub_ps(_mm512_load_ps(w.st + k * R + 16 * b), mx));
                _mm512_store_ps(w.st + k * R + 16 * b, p);
                sum = _mm512_add_ps(sum, p);
            }
            l[b] = _mm512_fmadd_ps(l[b], a, sum);
            m[b] = mx;
            _mm512_store_ps(w.alpha + 16 * b, a);
        }
        for (int k = 0; k < nk; ++k)
            for (int j = 0; j < D / 16; ++j) _mm512_store_ps(w.vf + k * D + 16 * j, widen(w.values[k] + 16 * j));
        pv_tile<D, D == 64 ? 6 : 3>(w.o, w.alpha, w.st, R, w.vf, nk, rows);
    }

    alignas(64) float inv[R];
    for (int b = 0; b < RB; ++b) _mm512_store_ps(inv + 16 * b, _mm512_div_ps(_mm512_set1_ps(1.0f), l[b]));
    for (int r = 0; r < rows; ++r) {
        uint16_t* dst = out + (static_cast<int64_t>(q_start + t.tok0 + r / t.heads) * num_heads + first_head + r % t.heads) * D;
        const __m512 s = _mm512_set1_ps(inv[r]);
        for (int j = 0; j < D / 16; ++j) {
            const __m256bh h = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(w.o + r * D + 16 * j), s));  // round to nearest even
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * j), (__m256i)h);
        }
    }
}

template <int D>
void prefill(const uint16_t* q, int64_t q_stride, const uint16_t* k_cache, const uint16_t* v_cache, const int32_t* block_tables,
             int64_t table_stride, const int32_t* query_start_loc, const int32_t* seq_lens, uint16_t* out,
             int num_seqs, int num_heads, int num_kv_heads, int block_size, float scale) {
    const int group = num_heads / num_kv_heads;
    const int heads_per_task = std::min(group, MAX_ROWS);
    const int toks_per_task = std::max(1, MAX_ROWS / heads_per_task);
    std::vector<Task> tasks;
    for (int s = 0; s < num_seqs; ++s) {
        const int chunk = query_start_loc[s + 1] - query_start_loc[s];
        for (int kvh = 0; kvh < num_kv_heads; ++kvh)
            for (int h0 = 0; h0 < group; h0 += heads_per_task)
                for (int t0 = 0; t0 < chunk; t0 += toks_per_task) {
                    const int heads = std::min(heads_per_task, group - h0), toks = std::min(toks_per_task, chunk - t0);
                    const int64_t keys = seq_lens[s] - chunk + t0 + toks;
                    tasks.push_back({s, kvh, h0, heads, t0, toks, keys * ((toks * heads + 15) / 16)});
                }
    }
    // Longest first, so that the short ones fill the gaps at the end.
    std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
    const int num_tasks = static_cast<int>(tasks.size());
#pragma omp parallel
    {
        Scratch w(D);
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < num_tasks; ++i) {
            const Task& t = tasks[i];
            const int s = t.seq;
            const int chunk = query_start_loc[s + 1] - query_start_loc[s];
            const int32_t* table = block_tables + s * table_stride;
            const int rb = (t.toks * t.heads + 15) / 16;
            auto run = [&](auto kernel) {
                kernel(t, w, q, q_stride, k_cache, v_cache, table, query_start_loc[s], seq_lens[s], chunk, out, num_heads,
                       num_kv_heads, group, block_size, scale);
            };
            switch (rb) {
                case 1: run(run_task<D, 1>); break;
                case 2: run(run_task<D, 2>); break;
                case 3: run(run_task<D, 3>); break;
                default: run(run_task<D, 4>); break;
            }
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
// [num_seqs, table_stride]. Returns 0, or -1 (nothing written) where unsupported.
int paged_prefill_bf16(const uint16_t* q, int64_t q_stride, const uint16_t* k_cache, const uint16_t* v_cache,
                       const int32_t* block_tables, int64_t table_stride, const int32_t* query_start_loc,
                       const int32_t* seq_lens, uint16_t* out, int num_seqs, int num_heads, int num_kv_heads,
                       int head_dim, int block_size, float scale) {
    if (!paged_prefill_bf16_supported(head_dim) || num_kv_heads <= 0 || num_heads % num_kv_heads) return -1;
#ifdef PAGEDLLM_PREFILL_AVX512_BF16
    if (head_dim == 64)
        prefill<64>(q, q_stride, k_cache, v_cache, block_tables, table_stride, query_start_loc, seq_lens, out, num_seqs, num_heads,
                    num_kv_heads, block_size, scale);
    else
        prefill<128>(q, q_stride, k_cache, v_cache, block_tables, table_stride, query_start_loc, seq_lens, out, num_seqs,
                     num_heads, num_kv_heads, block_size, scale);
    return 0;
#else
    (void)q, (void)q_stride, (void)k_cache, (void)v_cache, (void)block_tables, (void)table_stride, (void)query_start_loc;
    (void)seq_lens, (void)out, (void)num_seqs, (void)block_size, (void)scale;
    return -1;
#endif
}
}
