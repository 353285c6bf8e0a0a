// Paged decode attention for the CPU, reading keys and values in place through
// the block table: no gather into contiguous tensors, no padding to the longest
// sequence. One task per (sequence, KV head) serves that head's whole query
// group, so each key and value row is loaded and widened to float32 once.
// Built at first use by cpu_kernels.py; called through ctypes.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) {  // bfloat16 -> float32 is a 16-bit shift
    uint32_t bits = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}
inline void from_float(float x, float* out) { *out = x; }
inline void from_float(float x, uint16_t* out) {  // round to nearest even, as torch does
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) { *out = 0x7fc0; return; }  // NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);
    *out = static_cast<uint16_t>(bits >> 16);
}

template <typename T>
void decode(const T* q, const T* k_cache, const T* v_cache, const int32_t* block_tables,
            int64_t table_stride, const int32_t* seq_lens, T* out, int num_seqs, int num_heads,
            int num_kv_heads, int head_dim, int block_size, float scale) {
    const int group = num_heads / num_kv_heads;
    const int64_t row = static_cast<int64_t>(num_kv_heads) * head_dim;  // one token's slot
    const int num_tasks = num_seqs * num_kv_heads;
#pragma omp parallel
    {
        std::vector<float> qf, scores, acc, kv_row(head_dim);
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < num_tasks; ++task) {
            const int s = task / num_kv_heads, kvh = task % num_kv_heads;
            const int len = seq_lens[s];
            float* o_dst_f = nullptr;
            (void)o_dst_f;
            T* o = out + (static_cast<int64_t>(s) * num_heads + kvh * group) * head_dim;
            if (len <= 0) {  // a padding row: zeros, never NaN
                for (int i = 0; i < group * head_dim; ++i) from_float(0.0f, o + i);
                continue;
            }
            qf.resize(static_cast<size_t>(group) * head_dim);
            scores.resize(static_cast<size_t>(group) * len);
            acc.assign(static_cast<size_t>(group) * head_dim, 0.0f);
            const T* qs = q + (static_cast<int64_t>(s) * num_heads + kvh * group) * head_dim;
            for (int i = 0; i < group * head_dim; ++i) qf[i] = to_float(qs[i]) * scale;
            const int32_t* table = block_tables + s * table_stride;
            float* kr = kv_row.data();
            // Scores of every query head in the group against each key.
            for (int t = 0; t < len; ++t) {
                const T* k = k_cache + (static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size) * row + kvh * head_dim;
#pragma omp simd
                for (int d = 0; d < head_dim; ++d) kr[d] = to_float(k[d]);
                for (int h = 0; h < group; ++h) {
                    const float* qh = qf.data() + h * head_dim;
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (int d = 0; d < head_dim; ++d) dot += qh[d] * kr[d];
                    scores[static_cast<size_t>(h) * len + t] = dot;
                }
            }
            std::vector<float> inv_sum(group);
            for (int h = 0; h < group; ++h) {
                float* sh = scores.data() + static_cast<size_t>(h) * len;
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
            // Weighted sum of values.
            for (int t = 0; t < len; ++t) {
                const T* v = v_cache + (static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size) * row + kvh * head_dim;
#pragma omp simd
                for (int d = 0; d < head_dim; ++d) kr[d] = to_float(v[d]);
                for (int h = 0; h < group; ++h) {
                    const float p = scores[static_cast<size_t>(h) * len + t];
                    float* ah = acc.data() + h * head_dim;
#pragma omp simd
                    for (int d = 0; d < head_dim; ++d) ah[d] += p * kr[d];
                }
            }
            for (int h = 0; h < group; ++h)
                for (int d = 0; d < head_dim; ++d) from_float(acc[h * head_dim + d] * inv_sum[h], o + h * head_dim + d);
        }
    }
}

}  // namespace

extern "C" {

void paged_decode_f32(const float* q, const float* k_cache, const float* v_cache, const int32_t* block_tables,
                      int64_t table_stride, const int32_t* seq_lens, float* out, int num_seqs, int num_heads,
                      int num_kv_heads, int head_dim, int block_size, float scale) {
    decode(q, k_cache, v_cache, block_tables, table_stride, seq_lens, out, num_seqs, num_heads, num_kv_heads,
           head_dim, block_size, scale);
}

void paged_decode_bf16(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache,
                       const int32_t* block_tables, int64_t table_stride, const int32_t* seq_lens, uint16_t* out,
                       int num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size, float scale) {
    decode(q, k_cache, v_cache, block_tables, table_stride, seq_lens, out, num_seqs, num_heads, num_kv_heads,
           head_dim, block_size, scale);
}
}
