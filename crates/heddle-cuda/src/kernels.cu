// heddle's CUDA kernels, compiled at start by NVRTC. The host prepends the model's shape
// as #defines (see kernels.rs): HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, BLOCK_SIZE, QROWS,
// HEADS_PER_CTA, HEDDLE_BF16 when activations and weights are bf16 (f32 otherwise), and
// HEDDLE_FP8_KV when the KV cache holds E4M3 codes (bf16 builds only).
// No CUDA headers are included, so NVRTC needs no include path: bf16 is handled as bits.

#define WARP 32
#define KEY_TILE 32
#define GROUP (NUM_HEADS / NUM_KV_HEADS)
#define HEAD_CHUNKS (GROUP / HEADS_PER_CTA)
#define QKV_STRIDE ((NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM)
#define DIMS_PER_LANE (HEAD_DIM / WARP)
#define ATTN_THREADS 128
#define ATTN_WARPS (ATTN_THREADS / WARP)
#define ROWS_PER_WARP (QROWS / ATTN_WARPS)
#define SAMPLE_THREADS 1024
#define MAX_TOP_LOGPROBS 20
#define SCORE_WORDS (1 + 2 * MAX_TOP_LOGPROBS)
#define NEG_INF (__int_as_float(0xff800000))


__device__ __forceinline__ float bf16_bits_to_f32(unsigned short x) {
    return __uint_as_float(((unsigned)x) << 16);
}
// Round to nearest even; NaN stays NaN.
__device__ __forceinline__ unsigned short f32_to_bf16_bits(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

#ifdef HEDDLE_BF16
typedef unsigned short elem_t;
// Key rows padded so that lanes reading one key each hit distinct banks (odd word stride).
#define KEY_PAD 2
__device__ __forceinline__ float to_f(elem_t x) { return bf16_bits_to_f32(x); }
__device__ __forceinline__ elem_t from_f(float f) { return f32_to_bf16_bits(f); }
#else
typedef float elem_t;
#define KEY_PAD 1
__device__ __forceinline__ float to_f(elem_t x) { return x; }
__device__ __forceinline__ elem_t from_f(float f) { return f; }
#endif

// Two floats as E4M3 codes in one 16-bit word, the first in the low byte: round to nearest
// even, saturating to +-448 (Ada and Hopper have the conversion; older GPUs never run FP8).
__device__ __forceinline__ unsigned short e4m3x2(float lo, float hi) {
#if __CUDA_ARCH__ >= 890
    unsigned short packed;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(packed) : "f"(hi), "f"(lo));
    return packed;
#else
    return 0;
#endif
}

// An E4M3 code's value, exactly: its sign, exponent (4 bits, bias 7) and mantissa (3 bits)
// placed where an f32's go (8 bits, bias 127), then scaled by 2^120; the multiplication
// also gives the codes with exponent field 0 (E4M3's subnormals) their value. Saturated
// writes never store the NaN codes.
__device__ __forceinline__ float e4m3_to_f(unsigned code) {
    unsigned bits = ((code & 0x80u) << 24) | ((code & 0x7fu) << 20);
    return __uint_as_float(bits) * __uint_as_float(0x7b800000u);
}

#ifdef HEDDLE_FP8_KV
#ifndef HEDDLE_BF16
#error "the FP8 KV cache is read by the bf16 attention kernels only"
#endif
// The KV cache holds E4M3 codes, one byte an element, with scale 1 (values beyond +-448
// saturate); the attention kernels widen them to bf16 as they load them.
typedef unsigned char cache_t;
__device__ __forceinline__ cache_t to_cache(float f) { return (cache_t)(e4m3x2(f, 0.0f) & 0xffu); }
#else
typedef elem_t cache_t;
__device__ __forceinline__ cache_t to_cache(float f) { return from_f(f); }
#endif

// Attention tiles move through 16-byte vectors, all of a tile's loads in flight at once.
#define VEC_ELEMS (16 / (int)sizeof(elem_t))
#define VECS_PER_KEY (HEAD_DIM / VEC_ELEMS)
#define TILE_VECS (KEY_TILE * VECS_PER_KEY)
#define LOADS_PER_THREAD ((TILE_VECS + ATTN_THREADS - 1) / ATTN_THREADS)

// A lane's DIMS_PER_LANE consecutive elements as one load of their width.
template <int BYTES> struct Bits;
template <> struct Bits<2> { typedef unsigned short type; };
template <> struct Bits<4> { typedef unsigned int type; };
template <> struct Bits<8> { typedef uint2 type; };
template <> struct Bits<16> { typedef uint4 type; };
typedef Bits<DIMS_PER_LANE * sizeof(elem_t)>::type lane_bits_t;

// splitmix64: a well-mixed hash of (seed, index) for reproducible random weights.
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// A window of a random tensor: out[i] is element offset + (i / cols) * full_cols + i % cols
// of the full tensor (a run of whole rows when cols == full_cols, a block of columns
// otherwise), so that a rank's slice of a tensor holds the same values as the same part
// of the whole. Element j of the full tensor is center + scale * (a + b - 1) for a, b
// uniform in [0, 1) drawn from (seed, j): a triangular ("normal-ish") distribution on
// (-scale, scale) of standard deviation scale / sqrt(6).
extern "C" __global__ void init_random(elem_t* out, unsigned long long n, unsigned long long cols,
                                       unsigned long long full_cols, unsigned long long offset,
                                       unsigned long long seed, float center, float scale) {
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        unsigned long long j = offset + (i / cols) * full_cols + i % cols;
        unsigned long long h = mix64(seed ^ mix64(j));
        float a = (float)(h >> 40) * (1.0f / 16777216.0f);
        float b = (float)(h & 0xffffffull) * (1.0f / 16777216.0f);
        out[i] = from_f(center + scale * (a + b - 1.0f));
    }
}

// residual[t] = table[tokens[t] - first_token] (one block per token) for the tokens of the
// table's rows [first_token, first_token + rows); zeros for the others, which another
// rank's slice of the vocabulary embeds (the ranks' rows are then summed).
extern "C" __global__ void embed_gather(const int* tokens, const elem_t* table, float* residual,
                                        int hidden, int first_token, int rows) {
    int t = blockIdx.x;
    int row = tokens[t] - first_token;
    bool mine = row >= 0 && row < rows;
    const elem_t* values = table + (long long)(mine ? row : 0) * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        residual[(long long)t * hidden + i] = mine ? to_f(values[i]) : 0.0f;
}

// A step queued behind the one before it (overlapped stepping) gets, for each sequence
// whose last input token that step samples, the sampled id: `pending` holds `count` pairs
// (index into `tokens`, row of `sampled`), `sampled` the step before's ids.
extern "C" __global__ void take_pending_tokens(int* tokens, const int* pending, int count,
                                               const int* sampled) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x)
        tokens[pending[2 * i]] = sampled[pending[2 * i + 1]];
}

// acc[i] += x[i] over n elements, as f32 or as bf16 bits (rounded to nearest even) whatever
// the build's element type: the sum of the ranks' partial results when every rank runs on
// one stream (the tensor-parallel test mode; NCCL sums them otherwise).
extern "C" __global__ void add_into_f32(float* acc, const float* x, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        acc[i] += x[i];
}

extern "C" __global__ void add_into_bf16(unsigned short* acc, const unsigned short* x,
                                         long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        acc[i] = f32_to_bf16_bits(bf16_bits_to_f32(acc[i]) + bf16_bits_to_f32(x[i]));
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = WARP / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = WARP / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block; every thread gets it. `scratch` holds one value per warp.
__device__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// The residual connection fused with RMSNorm: x = residual[src] + delta[src] (delta may be
// null), written back when write_back, then out[i] = x / rms(x) * weight. One block per
// output row; rows (may be null) picks the source row of each output row.
extern "C" __global__ void add_rmsnorm(float* residual, const elem_t* delta,
                                       const elem_t* weight, elem_t* out, const int* rows,
                                       int hidden, float eps, int write_back) {
    __shared__ float scratch[32];
    int row = blockIdx.x;
    long long src = (long long)(rows ? rows[row] : row) * hidden;
    float sum = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float x = residual[src + i] + (delta ? to_f(delta[src + i]) : 0.0f);
        if (write_back) residual[src + i] = x;
        sum += x * x;
    }
    float scale = rsqrtf(block_sum(sum, scratch) / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float x = write_back ? residual[src + i]
                             : residual[src + i] + (delta ? to_f(delta[src + i]) : 0.0f);
        out[(long long)row * hidden + i] = from_f((x * scale) * to_f(weight[i]));
    }
}

// For each token (one block each): adds the Q/K/V biases (bias may be null), rotates Q (in
// place) and K by RoPE at the token's position (pairs i and i + HEAD_DIM/2, angles in f64 so
// that long positions keep their precision), and writes K and V to the cache slot.
// Cache layout per layer: [slot][NUM_KV_HEADS][HEAD_DIM].
extern "C" __global__ void rope_kv_write(elem_t* qkv, const elem_t* bias, const double* inv_freq,
                                         const int* positions, const int* slots, cache_t* k_cache,
                                         cache_t* v_cache) {
    const int half = HEAD_DIM / 2;
    int t = blockIdx.x;
    elem_t* row = qkv + (long long)t * QKV_STRIDE;
    double pos = (double)positions[t];
    long long slot = slots[t];
    for (int p = threadIdx.x; p < (NUM_HEADS + NUM_KV_HEADS) * half; p += blockDim.x) {
        int head = p / half, i = p % half;
        int a_idx = head * HEAD_DIM + i, b_idx = a_idx + half;
        float a = to_f(row[a_idx]), b = to_f(row[b_idx]);
        if (bias) {
            a += to_f(bias[a_idx]);
            b += to_f(bias[b_idx]);
        }
        double s, c;
        sincos(pos * inv_freq[i], &s, &c);
        float cf = (float)c, sf = (float)s;
        float ra = a * cf - b * sf, rb = a * sf + b * cf;
        if (head < NUM_HEADS) {
            row[a_idx] = from_f(ra);
            row[b_idx] = from_f(rb);
        } else {
            long long base = (slot * NUM_KV_HEADS + (head - NUM_HEADS)) * HEAD_DIM;
            k_cache[base + i] = to_cache(ra);
            k_cache[base + i + half] = to_cache(rb);
        }
    }
    const int v_off = (NUM_HEADS + NUM_KV_HEADS) * HEAD_DIM;
    for (int j = threadIdx.x; j < NUM_KV_HEADS * HEAD_DIM; j += blockDim.x) {
        float v = to_f(row[v_off + j]) + (bias ? to_f(bias[v_off + j]) : 0.0f);
        v_cache[slot * NUM_KV_HEADS * HEAD_DIM + j] = to_cache(v);
    }
}

#ifdef HEDDLE_BF16
// Paged causal attention for prefill chunks and decode tokens alike, on the tensor cores
// (mma.sync m16n8k16, bf16 in, f32 accumulate). One block per (tile, KV head, head chunk):
// a tile is up to QROWS / HEADS_PER_CTA consecutive tokens of one sequence, so that the
// query heads sharing a KV head read each key and value once. Each of the 4 warps owns 16
// query rows (a row is one token's one query head: row r is token r / HEADS_PER_CTA, head
// r % HEADS_PER_CTA), its queries held as mma fragments for the whole kernel. Keys go
// through shared memory KEY_TILE at a time ([key][dim]), values transposed ([dim][key]) so
// that every fragment is one 32-bit shared load; S = Q K^T, an online softmax per row in
// f32 (a row's statistics live in the 4 lanes of its quad), then O += P V with P rounded
// to bf16. A row's arithmetic does not depend on the other rows of its tile, so tiling
// changes no result (the batch-invariant mode relies on that).
// tiles: [n][4] = first token (flat index), token count, sequence, position of the first.
// The attention output for token t, head h is out[t][h * HEAD_DIM ..].
#if QROWS != ATTN_WARPS * 16
#error "the tensor-core attention kernel takes 16 query rows per warp"
#endif
#define MMA_K_STEPS (HEAD_DIM / 16)
#define MMA_O_TILES (HEAD_DIM / 8)
#define KEY_TILE_PAD 8
#define LOG2E 1.4426950408889634f

__device__ __forceinline__ void mma_bf16(float* d, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as bf16 (round to nearest even, as from_f) in one word, lo in the low half
// (the lower index). Used by both tensor-core attention kernels.
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// N consecutive cache elements as N bf16 values (N = 4 or 8: one uint2 or uint4), in one
// load: as they are, or from N E4M3 codes (half the bytes) widened exactly.
template <int N> struct CacheLoad;
#ifdef HEDDLE_FP8_KV
__device__ __forceinline__ uint2 bf16x4_of_e4m3x4(unsigned w) {
    return make_uint2(pack_bf16(e4m3_to_f(w & 0xffu), e4m3_to_f((w >> 8) & 0xffu)),
                      pack_bf16(e4m3_to_f((w >> 16) & 0xffu), e4m3_to_f(w >> 24)));
}
template <> struct CacheLoad<4> {
    static __device__ __forceinline__ uint2 at(const cache_t* p) {
        return bf16x4_of_e4m3x4(*(const unsigned*)p);
    }
};
template <> struct CacheLoad<8> {
    static __device__ __forceinline__ uint4 at(const cache_t* p) {
        uint2 w = *(const uint2*)p;
        uint2 lo = bf16x4_of_e4m3x4(w.x), hi = bf16x4_of_e4m3x4(w.y);
        return make_uint4(lo.x, lo.y, hi.x, hi.y);
    }
};
#else
template <> struct CacheLoad<4> {
    static __device__ __forceinline__ uint2 at(const cache_t* p) { return *(const uint2*)p; }
};
template <> struct CacheLoad<8> {
    static __device__ __forceinline__ uint4 at(const cache_t* p) { return *(const uint4*)p; }
};
#endif

extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
attention(const elem_t* qkv, const cache_t* k_cache, const cache_t* v_cache, elem_t* out,
          const int* tiles, const int* block_tables, const int* table_offsets, float scale) {
    __shared__ __align__(16) elem_t k_s[KEY_TILE][HEAD_DIM + KEY_TILE_PAD];
    __shared__ __align__(16) elem_t vt_s[HEAD_DIM][KEY_TILE + KEY_TILE_PAD];
    const int* tile = tiles + blockIdx.x * 4;
    int t0 = tile[0], nt = tile[1], seq = tile[2], p0 = tile[3];
    int kv_head = blockIdx.y / HEAD_CHUNKS;
    int head0 = kv_head * GROUP + (blockIdx.y % HEAD_CHUNKS) * HEADS_PER_CTA;
    int rows = nt * HEADS_PER_CTA;
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    int g = lane >> 2, q = lane & 3;
    const int* table = block_tables + table_offsets[seq];
    // This lane's two rows (g and g + 8 of the warp's 16), and the positions they attend to.
    int row[2] = {warp * 16 + g, warp * 16 + g + 8};
    int pos[2] = {p0 + row[0] / HEADS_PER_CTA, p0 + row[1] / HEADS_PER_CTA};
    bool warp_active = warp * 16 < rows;

    // The queries as A fragments: qa[s] covers dimensions 16s .. 16s + 15.
    unsigned qa[MMA_K_STEPS][4];
#pragma unroll
    for (int s = 0; s < MMA_K_STEPS; s++) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int r = row[i & 1], d = 16 * s + 2 * q + (i >> 1) * 8;
            unsigned v = 0;
            if (r < rows) {
                int t = t0 + r / HEADS_PER_CTA, h = head0 + r % HEADS_PER_CTA;
                v = *(const unsigned*)(qkv + (long long)t * QKV_STRIDE + h * HEAD_DIM + d);
            }
            qa[s][i] = v;
        }
    }

    float o[MMA_O_TILES][4];
#pragma unroll
    for (int t = 0; t < MMA_O_TILES; t++)
#pragma unroll
        for (int i = 0; i < 4; i++) o[t][i] = 0.0f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
    float scale_log2 = scale * LOG2E;

    int n_keys = p0 + nt;
    for (int kb = 0; kb < n_keys; kb += KEY_TILE) {
        __syncthreads();
        // The tile's keys and values; keys past the context are zeros (their scores are
        // masked, and a zero value times a zero weight stays zero).
        for (int idx = threadIdx.x; idx < KEY_TILE * VECS_PER_KEY; idx += ATTN_THREADS) {
            int j = idx / VECS_PER_KEY, c = idx % VECS_PER_KEY, p = kb + j;
            uint4 kv = {0, 0, 0, 0}, vv = {0, 0, 0, 0};
            if (p < n_keys) {
                long long slot = (long long)table[p / BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE;
                long long at = (slot * NUM_KV_HEADS + kv_head) * HEAD_DIM + c * VEC_ELEMS;
                kv = CacheLoad<VEC_ELEMS>::at(k_cache + at);
                vv = CacheLoad<VEC_ELEMS>::at(v_cache + at);
            }
            *(uint4*)&k_s[j][c * VEC_ELEMS] = kv;
            const elem_t* v = (const elem_t*)&vv;
#pragma unroll
            for (int i = 0; i < VEC_ELEMS; i++) vt_s[c * VEC_ELEMS + i][j] = v[i];
        }
        __syncthreads();
        if (!warp_active) continue;

        // S = Q K^T for this warp's 16 rows and the tile's 32 keys: 4 tiles of 8 keys.
        float sc[KEY_TILE / 8][4];
#pragma unroll
        for (int j = 0; j < KEY_TILE / 8; j++) {
#pragma unroll
            for (int i = 0; i < 4; i++) sc[j][i] = 0.0f;
#pragma unroll
            for (int s = 0; s < MMA_K_STEPS; s++) {
                const elem_t* k_row = &k_s[8 * j + g][16 * s + 2 * q];
                mma_bf16(sc[j], qa[s], *(const unsigned*)k_row, *(const unsigned*)(k_row + 8));
            }
        }
        // Online softmax in base 2; element i of a tile belongs to row i >> 1 and key
        // 8j + 2q + (i & 1).
        float tile_max[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int j = 0; j < KEY_TILE / 8; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int key = kb + 8 * j + 2 * q + (i & 1), hr = i >> 1;
                bool valid = row[hr] < rows && key <= pos[hr];
                sc[j][i] = valid ? sc[j][i] * scale_log2 : NEG_INF;
                tile_max[hr] = fmaxf(tile_max[hr], sc[j][i]);
            }
        float correction[2], tile_sum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            tile_max[hr] = fmaxf(tile_max[hr], __shfl_xor_sync(0xffffffffu, tile_max[hr], 1));
            tile_max[hr] = fmaxf(tile_max[hr], __shfl_xor_sync(0xffffffffu, tile_max[hr], 2));
            float m_new = fmaxf(m[hr], tile_max[hr]);
            // A row that has seen no key yet keeps m = -inf: nothing to rescale.
            correction[hr] = m_new == NEG_INF ? 1.0f : exp2f(m[hr] - m_new);
            m[hr] = m_new;
        }
#pragma unroll
        for (int j = 0; j < KEY_TILE / 8; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int hr = i >> 1;
                sc[j][i] = sc[j][i] == NEG_INF ? 0.0f : exp2f(sc[j][i] - m[hr]);
                tile_sum[hr] += sc[j][i];
            }
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            tile_sum[hr] += __shfl_xor_sync(0xffffffffu, tile_sum[hr], 1);
            tile_sum[hr] += __shfl_xor_sync(0xffffffffu, tile_sum[hr], 2);
            l[hr] = l[hr] * correction[hr] + tile_sum[hr];
        }
#pragma unroll
        for (int t = 0; t < MMA_O_TILES; t++) {
            o[t][0] *= correction[0];
            o[t][1] *= correction[0];
            o[t][2] *= correction[1];
            o[t][3] *= correction[1];
        }
        // O += P V: the score tiles' accumulator layout is the A fragment layout of P.
#pragma unroll
        for (int s = 0; s < KEY_TILE / 16; s++) {
            unsigned pa[4] = {
                pack_bf16(sc[2 * s][0], sc[2 * s][1]),
                pack_bf16(sc[2 * s][2], sc[2 * s][3]),
                pack_bf16(sc[2 * s + 1][0], sc[2 * s + 1][1]),
                pack_bf16(sc[2 * s + 1][2], sc[2 * s + 1][3]),
            };
#pragma unroll
            for (int t = 0; t < MMA_O_TILES; t++) {
                const elem_t* v_row = &vt_s[8 * t + g][16 * s + 2 * q];
                mma_bf16(o[t], pa, *(const unsigned*)v_row, *(const unsigned*)(v_row + 8));
            }
        }
    }

#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        int r = row[hr];
        if (r >= rows) continue;
        int t = t0 + r / HEADS_PER_CTA, h = head0 + r % HEADS_PER_CTA;
        float inv = 1.0f / l[hr];
        elem_t* dst = out + (long long)t * NUM_HEADS * HEAD_DIM + h * HEAD_DIM + 2 * q;
#pragma unroll
        for (int ot = 0; ot < MMA_O_TILES; ot++)
            *(unsigned*)(dst + 8 * ot) = pack_bf16(o[ot][2 * hr] * inv, o[ot][2 * hr + 1] * inv);
    }
}
#else
// Paged causal attention for prefill chunks and decode tokens alike. One block per (tile,
// KV head, head chunk): a tile is up to QROWS / HEADS_PER_CTA consecutive tokens of one
// sequence, so that the query heads sharing a KV head read each key and value once from
// the cache. Keys go through shared memory KEY_TILE at a time (the next tile is loaded into
// registers while the current one is used); each warp keeps an online
// softmax for its rows (a row is one token's one query head), a lane per key for the
// scores and DIMS_PER_LANE output dimensions per lane.
// tiles: [n][4] = first token (flat index), token count, sequence, position of the first.
// The attention output for token t, head h is out[t][h * HEAD_DIM ..].
extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
attention(const elem_t* qkv, const elem_t* k_cache, const elem_t* v_cache, elem_t* out,
          const int* tiles, const int* block_tables, const int* table_offsets, float scale) {
    __shared__ __align__(16) float q_s[QROWS][HEAD_DIM];
    __shared__ elem_t k_s[KEY_TILE][HEAD_DIM + KEY_PAD];
    __shared__ __align__(16) elem_t v_s[KEY_TILE][HEAD_DIM];
    const int* tile = tiles + blockIdx.x * 4;
    int t0 = tile[0], nt = tile[1], seq = tile[2], p0 = tile[3];
    int kv_head = blockIdx.y / HEAD_CHUNKS;
    int head0 = kv_head * GROUP + (blockIdx.y % HEAD_CHUNKS) * HEADS_PER_CTA;
    int rows = nt * HEADS_PER_CTA;
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int* table = block_tables + table_offsets[seq];

    for (int idx = threadIdx.x; idx < rows * HEAD_DIM; idx += ATTN_THREADS) {
        int r = idx / HEAD_DIM, d = idx % HEAD_DIM;
        int t = t0 + r / HEADS_PER_CTA, h = head0 + r % HEADS_PER_CTA;
        q_s[r][d] = to_f(qkv[(long long)t * QKV_STRIDE + h * HEAD_DIM + d]);
    }

    float m[ROWS_PER_WARP], l[ROWS_PER_WARP], acc[ROWS_PER_WARP][DIMS_PER_LANE];
#pragma unroll
    for (int rr = 0; rr < ROWS_PER_WARP; rr++) {
        m[rr] = NEG_INF;
        l[rr] = 0.0f;
#pragma unroll
        for (int i = 0; i < DIMS_PER_LANE; i++) acc[rr][i] = 0.0f;
    }

    int n_keys = p0 + nt;
    uint4 k_next[LOADS_PER_THREAD], v_next[LOADS_PER_THREAD];
    // Issues every load of the tile at `kb` into registers.
    auto fetch = [&](int kb) {
#pragma unroll
        for (int u = 0; u < LOADS_PER_THREAD; u++) {
            int idx = threadIdx.x + u * ATTN_THREADS;
            int j = idx / VECS_PER_KEY, c = idx % VECS_PER_KEY, pos = kb + j;
            if (idx < TILE_VECS && pos < n_keys) {
                long long slot = (long long)table[pos / BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE;
                long long at = (slot * NUM_KV_HEADS + kv_head) * HEAD_DIM + c * VEC_ELEMS;
                k_next[u] = *(const uint4*)(k_cache + at);
                v_next[u] = *(const uint4*)(v_cache + at);
            }
        }
    };
    fetch(0);
    for (int kb = 0; kb < n_keys; kb += KEY_TILE) {
        __syncthreads();
#pragma unroll
        for (int u = 0; u < LOADS_PER_THREAD; u++) {
            int idx = threadIdx.x + u * ATTN_THREADS;
            int j = idx / VECS_PER_KEY, c = idx % VECS_PER_KEY;
            if (idx < TILE_VECS && kb + j < n_keys) {
                const elem_t* k = (const elem_t*)&k_next[u];
#pragma unroll
                for (int i = 0; i < VEC_ELEMS; i++) k_s[j][c * VEC_ELEMS + i] = k[i];
                *(uint4*)&v_s[j][c * VEC_ELEMS] = v_next[u];
            }
        }
        __syncthreads();
        if (kb + KEY_TILE < n_keys) fetch(kb + KEY_TILE);
        // The scores of all of this warp's rows against key `lane` at once: each key
        // element is read once for every row, each row's query four dimensions at a time.
        float s[ROWS_PER_WARP];
#pragma unroll
        for (int rr = 0; rr < ROWS_PER_WARP; rr++) s[rr] = 0.0f;
        for (int d = 0; d < HEAD_DIM; d += 4) {
            float k0 = to_f(k_s[lane][d]), k1 = to_f(k_s[lane][d + 1]);
            float k2 = to_f(k_s[lane][d + 2]), k3 = to_f(k_s[lane][d + 3]);
#pragma unroll
            for (int rr = 0; rr < ROWS_PER_WARP; rr++) {
                int r = warp + rr * ATTN_WARPS;
                if (r < rows) {
                    float4 q = *(const float4*)&q_s[r][d];
                    s[rr] += q.x * k0 + q.y * k1 + q.z * k2 + q.w * k3;
                }
            }
        }
        float p[ROWS_PER_WARP];
#pragma unroll
        for (int rr = 0; rr < ROWS_PER_WARP; rr++) {
            int r = warp + rr * ATTN_WARPS;
            int pos_r = p0 + r / HEADS_PER_CTA;
            p[rr] = 0.0f;
            // Rows past the tile's end, or whose position is before this tile, take no keys.
            if (r >= rows || pos_r < kb) continue;
            bool valid = kb + lane <= pos_r;
            float sr = valid ? s[rr] * scale : NEG_INF;
            float m_new = fmaxf(m[rr], warp_max(sr));
            float correction = expf(m[rr] - m_new);
            p[rr] = valid ? expf(sr - m_new) : 0.0f;
            l[rr] = l[rr] * correction + warp_sum(p[rr]);
#pragma unroll
            for (int i = 0; i < DIMS_PER_LANE; i++) acc[rr][i] *= correction;
            m[rr] = m_new;
        }
        // Values: each loaded once for all rows; keys a row may not see have p = 0.
        int last = min(KEY_TILE, n_keys - kb);
        for (int j = 0; j < last; j++) {
            float v[DIMS_PER_LANE];
#pragma unroll
            for (int i = 0; i < DIMS_PER_LANE; i++) v[i] = to_f(v_s[j][lane + i * WARP]);
#pragma unroll
            for (int rr = 0; rr < ROWS_PER_WARP; rr++) {
                float pj = __shfl_sync(0xffffffffu, p[rr], j);
#pragma unroll
                for (int i = 0; i < DIMS_PER_LANE; i++) acc[rr][i] += pj * v[i];
            }
        }
    }

#pragma unroll
    for (int rr = 0; rr < ROWS_PER_WARP; rr++) {
        int r = warp + rr * ATTN_WARPS;
        if (r >= rows) continue;
        int t = t0 + r / HEADS_PER_CTA, h = head0 + r % HEADS_PER_CTA;
        float inv = 1.0f / l[rr];
#pragma unroll
        for (int i = 0; i < DIMS_PER_LANE; i++)
            out[(long long)t * NUM_HEADS * HEAD_DIM + h * HEAD_DIM + lane + i * WARP] =
                from_f(acc[rr][i] * inv);
    }
}

#endif

#if defined(HEDDLE_BF16) && HEADS_PER_CTA <= 8
// Decode attention (tiles of one token) on the tensor cores. Per (token, KV head chunk,
// context range) one block; its four warps take turns of KEY_CHUNK keys of the range. A
// turn is two mma.sync products with the block's query heads as the rows (up to 8; rows
// 8..15 of the m16 tile are zeros): S = Q·Kᵀ over the head dimension, then O += P·V over
// the turn's keys, with an online softmax per head between them. On CUDA cores a key
// costs each head HEAD_DIM FMAs twice, which at the 8B shape (4 heads, 128 dimensions)
// kept the old kernel from the memory's speed; the tensor cores make it a few
// instructions per key.
// The operands come straight from the cache in 16-byte loads (8-byte ones of E4M3 codes
// with HEDDLE_FP8_KV, widened to bf16 in registers), each warp load covering whole 64- or
// 128-byte pieces of key rows (32 or 64 of FP8 codes): a dot product does not care about the order
// of its terms, so the head dimensions are permuted (identically for Q and K) to match
// what one load gives a lane, and P·V's output dimensions likewise (undone when the
// result is written). Each lane loads its own operands into registers (only the query's
// fragments sit in shared memory), and no block barrier comes before the warps' results
// are merged at the end. 124 registers: four blocks (16 warps, 8 KB of loads in flight
// each) per multiprocessor; a version at 166 registers (three blocks) read 3.1 against
// 3.3 TB/s, one that also prefetched the next turn into L2 3.0.
// With gridDim.z > 1 (few sequences: too few blocks to fill the GPU) the context is split
// in gridDim.z ranges; each block then writes its (max, sum, weighted values) per head to
// `partials` and attention_merge combines them.
#define PARTIAL_STRIDE (HEAD_DIM + 2)
#define LAZY_RESCALE_LOG2 8.0f
#define KEY_CHUNK 16
// 16-byte loads per key row and lane for Q·Kᵀ: lane c of a row group reads dimensions
// [i * 32 + c * 8, +8) for i < K_LOADS, two k-steps of 16 each.
#define K_LOADS (HEAD_DIM / 32)
// P·V's n-tiles of 8 output dimensions; row group g owns dimensions
// [u * 8 * V_SPAN + g * V_SPAN, +V_SPAN) of each value row, for u < V_LOADS.
#define PV_TILES (HEAD_DIM / 8)
#define V_SPAN (PV_TILES < 8 ? PV_TILES : 8)
#define V_LOADS (PV_TILES / V_SPAN)
#define V_WORDS (V_LOADS * V_SPAN / 2)
typedef Bits<V_SPAN * 2>::type v_bits_t;

// The decode kernel's operand type. With an FP8 cache it multiplies in f16: one
// instruction widens two E4M3 codes to f16 exactly (bf16 would take several, and at four
// heads a key the widening, not the memory, set the kernel's speed: 1.1 TB/s), so the
// queries are rounded to f16 (they stay far inside its range) and the softmax weights P are
// packed as f16 (finer than bf16 in [0, 1]).
#ifdef HEDDLE_FP8_KV
#define DECODE_OPERAND "f16"
__device__ __forceinline__ unsigned pack_decode(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ unsigned decode_query_word(unsigned bf16x2) {
    return pack_decode(__uint_as_float(bf16x2 << 16), __uint_as_float(bf16x2 & 0xffff0000u));
}
// Four E4M3 codes (lowest byte first) as four f16 values in two words.
__device__ __forceinline__ uint2 f16x4_of_e4m3x4(unsigned w) {
#if __CUDA_ARCH__ >= 890
    unsigned lo, hi;
    asm("{\n\t.reg .b16 l, h;\n\tmov.b32 {l, h}, %2;\n\t"
        "cvt.rn.f16x2.e4m3x2 %0, l;\n\tcvt.rn.f16x2.e4m3x2 %1, h;\n\t}"
        : "=r"(lo), "=r"(hi)
        : "r"(w));
    return make_uint2(lo, hi);
#else
    // (Never run: the runner refuses the FP8 cache below compute capability 8.9.)
    return make_uint2(pack_decode(e4m3_to_f(w & 0xffu), e4m3_to_f((w >> 8) & 0xffu)),
                      pack_decode(e4m3_to_f((w >> 16) & 0xffu), e4m3_to_f(w >> 24)));
#endif
}
// A lane's loads of N cache elements: the raw bits, and the N operands they make (widened
// to f16 from E4M3 codes). With half the bytes a key, each loop of the decode kernel loads
// two turns of keys before multiplying either, to keep as many bytes in flight as bf16.
#define DECODE_TURNS 2
template <int N> struct DecodeLoad;
template <> struct DecodeLoad<4> {
    typedef unsigned raw_t;
    static __device__ __forceinline__ raw_t load(const cache_t* p) { return *(const unsigned*)p; }
    static __device__ __forceinline__ raw_t zero() { return 0u; }
    static __device__ __forceinline__ uint2 widen(raw_t r) { return f16x4_of_e4m3x4(r); }
};
template <> struct DecodeLoad<8> {
    typedef uint2 raw_t;
    static __device__ __forceinline__ raw_t load(const cache_t* p) { return *(const uint2*)p; }
    static __device__ __forceinline__ raw_t zero() { return make_uint2(0, 0); }
    static __device__ __forceinline__ uint4 widen(raw_t r) {
        uint2 lo = f16x4_of_e4m3x4(r.x), hi = f16x4_of_e4m3x4(r.y);
        return make_uint4(lo.x, lo.y, hi.x, hi.y);
    }
};
#else
#define DECODE_OPERAND "bf16"
__device__ __forceinline__ unsigned pack_decode(float lo, float hi) { return pack_bf16(lo, hi); }
__device__ __forceinline__ unsigned decode_query_word(unsigned bf16x2) { return bf16x2; }
#define DECODE_TURNS 1
template <int N> struct DecodeLoad;
template <> struct DecodeLoad<4> {
    typedef uint2 raw_t;
    static __device__ __forceinline__ raw_t load(const cache_t* p) { return *(const uint2*)p; }
    static __device__ __forceinline__ raw_t zero() { return make_uint2(0, 0); }
    static __device__ __forceinline__ uint2 widen(raw_t r) { return r; }
};
template <> struct DecodeLoad<8> {
    typedef uint4 raw_t;
    static __device__ __forceinline__ raw_t load(const cache_t* p) { return *(const uint4*)p; }
    static __device__ __forceinline__ raw_t zero() { return make_uint4(0, 0, 0, 0); }
    static __device__ __forceinline__ uint4 widen(raw_t r) { return r; }
};
#endif

// d[0..1] += A·B for an m16n8k16 product (bf16 or f16) whose A rows 8..15 are zero: a0 holds row
// g's elements k = 2c, 2c+1 and a2 its k = 2c+8, 2c+9 (g = lane / 4, c = lane % 4); b0
// and b1 hold B's column g at k = 2c, 2c+1 and 2c+8, 2c+9; d[0], d[1] are row g's
// columns 2c, 2c+1. Rows 8..15 of the result are discarded.
// (Its discarded outputs are "set but never used": warning 550.)
#pragma nv_diag_suppress 550
__device__ __forceinline__ void mma_top_rows(float* d, unsigned a0, unsigned a2, unsigned b0,
                                             unsigned b1) {
    float unused0, unused1;
    asm("mma.sync.aligned.m16n8k16.row.col.f32." DECODE_OPERAND "." DECODE_OPERAND ".f32 "
        "{%0, %1, %2, %3}, {%4, %6, %5, %6}, {%7, %8}, {%0, %1, %9, %9};"
        : "+f"(d[0]), "+f"(d[1]), "=f"(unused0), "=f"(unused1)
        : "r"(a0), "r"(a2), "r"(0u), "r"(b0), "r"(b1), "f"(0.0f));
}
#pragma nv_diag_default 550


extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
attention_decode(const elem_t* qkv, const cache_t* k_cache, const cache_t* v_cache, elem_t* out,
                 const int* tiles, const int* block_tables, const int* table_offsets,
                 float scale, float* partials) {
    __shared__ float m_s[ATTN_WARPS][HEADS_PER_CTA], l_s[ATTN_WARPS][HEADS_PER_CTA];
    __shared__ float acc_s[ATTN_WARPS][HEADS_PER_CTA][HEAD_DIM];
    __shared__ uint2 qa_s[ATTN_WARPS][2 * K_LOADS][WARP];
    const int* tile = tiles + blockIdx.x * 4;
    int t = tile[0], seq = tile[2], n_keys = tile[3] + 1;
    // This block's range of the context, in whole turns.
    int span = ((n_keys + gridDim.z - 1) / gridDim.z + KEY_CHUNK - 1) / KEY_CHUNK * KEY_CHUNK;
    int begin = blockIdx.z * span, end = min(n_keys, begin + span);
    int kv_head = blockIdx.y / HEAD_CHUNKS;
    int head0 = kv_head * GROUP + (blockIdx.y % HEAD_CHUNKS) * HEADS_PER_CTA;
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    int g = lane / 4, c = lane % 4;
    const int* table = block_tables + table_offsets[seq];

    // Q as the A operand, row g = head g of the block: k-step 2i takes words x, y of load
    // i, k-step 2i + 1 words z, w (the order K's loads give). Kept in shared memory, in
    // each warp's own copy laid out by lane, to leave registers for the loads in flight.
    {
        const elem_t* q = qkv + (long long)t * QKV_STRIDE + (head0 + g) * HEAD_DIM + c * 8;
#pragma unroll
        for (int i = 0; i < K_LOADS; i++) {
            uint4 w = make_uint4(0, 0, 0, 0);
            if (g < HEADS_PER_CTA) w = *(const uint4*)(q + i * 32);
            qa_s[warp][2 * i][lane] = make_uint2(decode_query_word(w.x), decode_query_word(w.y));
            qa_s[warp][2 * i + 1][lane] =
                make_uint2(decode_query_word(w.z), decode_query_word(w.w));
        }
        __syncwarp();
    }
    const float log2_scale = scale * 1.4426950408889634f;

    // Online softmax of head g: m (max, in log2 units) and this lane's part of the sum l;
    // acc[n][0..1]: head g's output at n-tile n, columns 2c and 2c + 1.
    float m = NEG_INF, l = 0.0f, acc[PV_TILES][2];
#pragma unroll
    for (int n = 0; n < PV_TILES; n++) acc[n][0] = acc[n][1] = 0.0f;

    typedef DecodeLoad<8> KeyLoad;
    typedef DecodeLoad<V_SPAN> ValueLoad;
#if BLOCK_SIZE % KEY_CHUNK == 0
    // A turn's keys lie in one cache block: its table entry is read once, and a loop ahead,
    // so that no cache load waits on a table read (per key, those reads set the FP8
    // cache's speed, whose keys are half the bytes).
    int turn_block[DECODE_TURNS];
    auto read_turn_blocks = [&](int kb0) {
#pragma unroll
        for (int turn = 0; turn < DECODE_TURNS; turn++) {
            int kb = kb0 + turn * ATTN_WARPS * KEY_CHUNK;
            turn_block[turn] = kb < end ? table[kb / BLOCK_SIZE] : 0;
        }
    };
    read_turn_blocks(begin + warp * KEY_CHUNK);
    // Element offset of key `key`'s row (in turn `turn`) for this KV head.
    auto key_row = [&](int turn, int key) {
        long long slot = (long long)turn_block[turn] * BLOCK_SIZE + key % BLOCK_SIZE;
        return (slot * NUM_KV_HEADS + kv_head) * HEAD_DIM;
    };
#else
    auto key_row = [&](int, int key) {
        long long slot = (long long)table[key / BLOCK_SIZE] * BLOCK_SIZE + key % BLOCK_SIZE;
        return (slot * NUM_KV_HEADS + kv_head) * HEAD_DIM;
    };
#endif
    for (int kb0 = begin + warp * KEY_CHUNK; kb0 < end;
         kb0 += DECODE_TURNS * ATTN_WARPS * KEY_CHUNK) {
        // Every load of the loop's turns first. Keys: n-tile j's column g is key kb + 8j + g;
        // values of keys kb + 2c, +1, +8, +9: the B operand's k rows of this lane.
        KeyLoad::raw_t k_raw[DECODE_TURNS][2][K_LOADS];
        ValueLoad::raw_t v_raw[DECODE_TURNS][4][V_LOADS];
#pragma unroll
        for (int turn = 0; turn < DECODE_TURNS; turn++) {
            int kb = kb0 + turn * ATTN_WARPS * KEY_CHUNK;
#pragma unroll
            for (int j = 0; j < 2; j++) {
                int key = kb + 8 * j + g;
                const cache_t* k = k_cache + (key < end ? key_row(turn, key) : 0) + c * 8;
#pragma unroll
                for (int i = 0; i < K_LOADS; i++)
                    k_raw[turn][j][i] = key < end ? KeyLoad::load(k + i * 32) : KeyLoad::zero();
            }
#pragma unroll
            for (int r = 0; r < 4; r++) {
                int key = kb + 2 * c + (r & 1) + (r >> 1) * 8;
                const cache_t* v = v_cache + (key < end ? key_row(turn, key) : 0) + g * V_SPAN;
#pragma unroll
                for (int u = 0; u < V_LOADS; u++)
                    v_raw[turn][r][u] =
                        key < end ? ValueLoad::load(v + u * 8 * V_SPAN) : ValueLoad::zero();
            }
        }
#if BLOCK_SIZE % KEY_CHUNK == 0
        read_turn_blocks(kb0 + DECODE_TURNS * ATTN_WARPS * KEY_CHUNK);
#endif
#pragma unroll
        for (int turn = 0; turn < DECODE_TURNS; turn++) {
            int kb = kb0 + turn * ATTN_WARPS * KEY_CHUNK;
            uint4 kr[2][K_LOADS];
#pragma unroll
            for (int j = 0; j < 2; j++)
#pragma unroll
                for (int i = 0; i < K_LOADS; i++) kr[j][i] = KeyLoad::widen(k_raw[turn][j][i]);
            unsigned vw[4][V_WORDS];
#pragma unroll
            for (int r = 0; r < 4; r++) {
#pragma unroll
                for (int u = 0; u < V_LOADS; u++) {
                    v_bits_t raw = ValueLoad::widen(v_raw[turn][r][u]);
                    const unsigned* rw = (const unsigned*)&raw;
#pragma unroll
                    for (int w = 0; w < V_SPAN / 2; w++) vw[r][u * (V_SPAN / 2) + w] = rw[w];
                }
            }

            // S = Q·Kᵀ: s[j][e] is head g's score for key kb + 8j + 2c + e.
            float s[2][2];
#pragma unroll
            for (int j = 0; j < 2; j++) {
                s[j][0] = s[j][1] = 0.0f;
#pragma unroll
                for (int i = 0; i < K_LOADS; i++) {
                    uint2 q0 = qa_s[warp][2 * i][lane], q1 = qa_s[warp][2 * i + 1][lane];
                    mma_top_rows(s[j], q0.x, q0.y, kr[j][i].x, kr[j][i].y);
                    mma_top_rows(s[j], q1.x, q1.y, kr[j][i].z, kr[j][i].w);
                }
            }
            float x[4];
#pragma unroll
            for (int j = 0; j < 2; j++)
#pragma unroll
                for (int e = 0; e < 2; e++)
                    x[2 * j + e] = kb + 8 * j + 2 * c + e < end ? s[j][e] * log2_scale : NEG_INF;
            // The turn's maximum over the four lanes of the row. A loop's first turn starts
            // in range, so m is finite from then on (a later turn past the end leaves it).
            float mx = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            // m moves only when a score passes it by more than 2^LAZY_RESCALE_LOG2, so the
            // rescaling of l and the accumulators (a multiply per accumulator) is skipped
            // on most turns: the sums stay exact relative to whichever m they share, and
            // the weights stay below 2^LAZY_RESCALE_LOG2 (P's f16 and bf16 hold that).
            if (__any_sync(0xffffffffu, mx > m + LAZY_RESCALE_LOG2)) {
                float m_new = mx > m + LAZY_RESCALE_LOG2 ? mx : m;
                float correction = exp2f(m - m_new);
                l *= correction;
                m = m_new;
#pragma unroll
                for (int n = 0; n < PV_TILES; n++) {
                    acc[n][0] *= correction;
                    acc[n][1] *= correction;
                }
            }
            float p[4];
#pragma unroll
            for (int e = 0; e < 4; e++) p[e] = exp2f(x[e] - m);
            l += (p[0] + p[1]) + (p[2] + p[3]);
            // O += P·V. P as the A operand: row g, k = 2c, 2c+1 are n-tile 0's scores of this
            // lane, k = 2c+8, 2c+9 n-tile 1's. V's column g of n-tile u * V_SPAN + e is
            // dimension u * 8 * V_SPAN + g * V_SPAN + e: element e of this lane's load u.
            unsigned pa0 = pack_decode(p[0], p[1]), pa2 = pack_decode(p[2], p[3]);
#pragma unroll
            for (int u = 0; u < V_LOADS; u++) {
#pragma unroll
                for (int e = 0; e < V_SPAN; e++) {
                    int w = u * (V_SPAN / 2) + e / 2;
                    // Element e's halves of two keys' words side by side (low, high).
                    unsigned sel = (e & 1) ? 0x7632u : 0x5410u;
                    unsigned b0 = __byte_perm(vw[0][w], vw[1][w], sel);
                    unsigned b1 = __byte_perm(vw[2][w], vw[3][w], sel);
                    mma_top_rows(acc[u * V_SPAN + e], pa0, pa2, b0, b1);
                }
            }
        }
    }
    // The row's sum over its four lanes (m is already the same in all of them).
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (g < HEADS_PER_CTA) {
        if (c == 0) {
            m_s[warp][g] = m;
            l_s[warp][g] = l;
        }
#pragma unroll
        for (int n = 0; n < PV_TILES; n++) {
            int u = n / V_SPAN, e = n % V_SPAN;
#pragma unroll
            for (int col = 0; col < 2; col++)
                acc_s[warp][g][u * 8 * V_SPAN + (2 * c + col) * V_SPAN + e] = acc[n][col];
        }
    }
    __syncthreads();
    // m is in log2 units here.
    for (int idx = threadIdx.x; idx < HEADS_PER_CTA * HEAD_DIM; idx += ATTN_THREADS) {
        int r = idx / HEAD_DIM, d = idx % HEAD_DIM;
        float mx = NEG_INF;
#pragma unroll
        for (int w = 0; w < ATTN_WARPS; w++) mx = fmaxf(mx, m_s[w][r]);
        float num = 0.0f, den = 0.0f;
#pragma unroll
        for (int w = 0; w < ATTN_WARPS; w++) {
            // A warp whose turn never came holds no keys.
            if (m_s[w][r] != NEG_INF) {
                float f = exp2f(m_s[w][r] - mx);
                num += f * acc_s[w][r][d];
                den += f * l_s[w][r];
            }
        }
        if (gridDim.z == 1) {
            out[(long long)t * NUM_HEADS * HEAD_DIM + (head0 + r) * HEAD_DIM + d] =
                from_f(num / den);
        } else {
            // A range past the context's end leaves max -inf and sums 0.
            float* partial = partials + (((long long)blockIdx.x * gridDim.y + blockIdx.y) *
                                             gridDim.z + blockIdx.z) * HEADS_PER_CTA * PARTIAL_STRIDE +
                             r * PARTIAL_STRIDE;
            partial[d] = num;
            if (d == 0) {
                partial[HEAD_DIM] = mx;
                partial[HEAD_DIM + 1] = den;
            }
        }
    }
}

// Combines attention_decode's `splits` partial results per (tile, head) (same grid x, y);
// their maxima are in log2 units.
extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
attention_merge(const float* partials, const int* tiles, elem_t* out, int splits) {
    int t = tiles[blockIdx.x * 4];
    int head0 = (blockIdx.y / HEAD_CHUNKS) * GROUP + (blockIdx.y % HEAD_CHUNKS) * HEADS_PER_CTA;
    const float* base = partials + ((long long)blockIdx.x * gridDim.y + blockIdx.y) * splits *
                                       HEADS_PER_CTA * PARTIAL_STRIDE;
    for (int idx = threadIdx.x; idx < HEADS_PER_CTA * HEAD_DIM; idx += ATTN_THREADS) {
        int r = idx / HEAD_DIM, d = idx % HEAD_DIM;
        float mx = NEG_INF;
        for (int z = 0; z < splits; z++)
            mx = fmaxf(mx, base[(z * HEADS_PER_CTA + r) * PARTIAL_STRIDE + HEAD_DIM]);
        float num = 0.0f, den = 0.0f;
        for (int z = 0; z < splits; z++) {
            const float* p = base + (z * HEADS_PER_CTA + r) * PARTIAL_STRIDE;
            if (p[HEAD_DIM] != NEG_INF) {
                float f = exp2f(p[HEAD_DIM] - mx);
                num += f * p[d];
                den += f * p[HEAD_DIM + 1];
            }
        }
        out[(long long)t * NUM_HEADS * HEAD_DIM + (head0 + r) * HEAD_DIM + d] = from_f(num / den);
    }
}
#endif

// out[t][i] = SiLU(gate) * up, with gate_up[t] = [gate (ffn), up (ffn)].
extern "C" __global__ void silu_mul(const elem_t* gate_up, elem_t* out, int ffn, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += stride) {
        long long t = idx / ffn, i = idx % ffn;
        float g = to_f(gate_up[t * 2 * ffn + i]), u = to_f(gate_up[t * 2 * ffn + ffn + i]);
        out[idx] = from_f(g / (1.0f + expf(-g)) * u);
    }
}

// ---- Sampling: one block of SAMPLE_THREADS per sampled row. ----

// Per-row parameters, as i32 words (floats as their bits); see plan.rs.
#define SP_TEMPERATURE 0
#define SP_TOP_P 1
#define SP_TOP_K 2
#define SP_MIN_P 3
#define SP_REPETITION 4
#define SP_FREQUENCY 5
#define SP_PRESENCE 6
#define SP_GREEDY 7
#define SP_LOGPROB 8
#define SP_TOP_LOGPROBS 9
#define SP_PENALTY_OFFSET 10
#define SP_PENALTY_COUNT 11
#define SP_UNIFORM_LO 12
#define SP_UNIFORM_HI 13
#define SP_ADJUSTED 14
#define SP_FIELDS 15

// A row's logit biases and grammar mask, in the step's adjustment words (see
// adjustments.rs): words[row] is the offset of the row's record, or -1. A record is
// [mask words, bias count, mask (bit t of word t/32: token t allowed), then per bias
// (token, bias bits, the raw logit the kernel saves)]. Tokens past the mask are banned.
#define ADJ_MASK_WORDS 0
#define ADJ_BIAS_COUNT 1
#define ADJ_HEADER 2
#define ADJ_BIAS_BAN -100.0f

struct ArgBest {
    float v;
    int i;
};

// a is better than b: larger value, or equal value and lower id. NaN is never better.
__device__ __forceinline__ bool better(float av, int ai, float bv, int bi) {
    return av > bv || (av == bv && ai < bi && ai >= 0) || (bi < 0 && ai >= 0 && !(av != av));
}

__device__ ArgBest block_best(ArgBest x, ArgBest* scratch) {
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    for (int o = WARP / 2; o > 0; o /= 2) {
        float v = __shfl_xor_sync(0xffffffffu, x.v, o);
        int i = __shfl_xor_sync(0xffffffffu, x.i, o);
        if (better(v, i, x.v, x.i)) x = ArgBest{v, i};
    }
    __syncthreads();
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < SAMPLE_THREADS / WARP ? scratch[lane] : ArgBest{NEG_INF, -1};
    for (int o = WARP / 2; o > 0; o /= 2) {
        float v = __shfl_xor_sync(0xffffffffu, x.v, o);
        int i = __shfl_xor_sync(0xffffffffu, x.i, o);
        if (better(v, i, x.v, x.i)) x = ArgBest{v, i};
    }
    return x;
}

__device__ double block_sum_f64(double v, double* scratch) {
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    for (int o = WARP / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < SAMPLE_THREADS / WARP ? scratch[lane] : 0.0;
    for (int o = WARP / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The arg-max of a row (lowest id on ties).
__device__ ArgBest row_argmax(const float* row, int vocab, ArgBest* scratch) {
    ArgBest best = {NEG_INF, -1};
    for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS)
        if (better(row[i], i, best.v, best.i)) best = ArgBest{row[i], i};
    return block_best(best, scratch);
}

// Sum of the weights w(i) = exp((l_i - max) / T) that are >= threshold, or their count.
__device__ double kept_mass(const float* row, int vocab, float max, float inv_t, float threshold,
                            bool count, double* scratch) {
    double s = 0.0;
    for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
        float w = expf((row[i] - max) * inv_t);
        if (w >= threshold) s += count ? 1.0 : (double)w;
    }
    return block_sum_f64(s, scratch);
}

// The largest weight threshold whose kept count (or mass) is still >= goal, searched over
// the bit patterns of positive floats (ordered like the floats), from `lo_bits` up to 1.0.
__device__ float threshold_for(const float* row, int vocab, float max, float inv_t,
                               unsigned lo_bits, double goal, bool count, double* scratch) {
    unsigned lo = lo_bits, hi = 0x3f800000u;
    while (lo < hi) {
        unsigned mid = lo + (hi - lo + 1) / 2;
        if (kept_mass(row, vocab, max, inv_t, __uint_as_float(mid), count, scratch) >= goal)
            lo = mid;
        else
            hi = mid - 1;
    }
    return __uint_as_float(lo);
}

// The log-sum-exp of a row (its maximum plus the log of the f64 sum of exp(l - max), as the
// CPU's log_sum_exp), and its n_top most likely tokens (ties: lowest id first) written by
// thread 0 to top as (id, f32 bits of log p) pairs.
__device__ float row_lse_and_top(const float* row, int vocab, int n_top, int* top,
                                 ArgBest* best_scratch, double* sum_scratch) {
    float mx = row_argmax(row, vocab, best_scratch).v;
    double s = 0.0;
    for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) s += exp((double)(row[i] - mx));
    float lse = mx + (float)log(block_sum_f64(s, sum_scratch));
    ArgBest prev = {__int_as_float(0x7f800000), -1};
    for (int k = 0; k < n_top; k++) {
        ArgBest b = {NEG_INF, -1};
        for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
            float v = row[i];
            bool after = v < prev.v || (v == prev.v && i > prev.i);
            if (after && better(v, i, b.v, b.i)) b = ArgBest{v, i};
        }
        b = block_best(b, best_scratch);
        if (threadIdx.x == 0) {
            top[2 * k] = b.i;
            top[2 * k + 1] = __float_as_int(b.v - lse);
        }
        prev = b;
    }
    return lse;
}

// Scores given tokens, one row (block) each: out[row] = [f32 bits of log p(targets[row]),
// then tops[row] (id, f32 bits of log p) pairs of the most likely tokens], SCORE_WORDS words
// a row. The prompt log-probabilities of requests that ask for them.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
score_tokens(const float* logits, int vocab, const int* targets, const int* tops, int* out) {
    __shared__ ArgBest best_scratch[32];
    __shared__ double sum_scratch[32];
    const float* row = logits + (long long)blockIdx.x * vocab;
    int* o = out + blockIdx.x * SCORE_WORDS;
    float lse = row_lse_and_top(row, vocab, tops[blockIdx.x], o + 1, best_scratch, sum_scratch);
    if (threadIdx.x == 0) o[0] = __float_as_int(row[targets[blockIdx.x]] - lse);
}

// Samples one token per row of logits (rows: [n][vocab], f32). Order as the CPU sampler:
// log-probabilities of the raw logits, then the row's logit biases and grammar mask (rows
// with SP_ADJUSTED), then penalties (in place), then greedy arg-max or
// temperature, top-k, top-p, min-p and a draw with the row's uniform number. The kept set
// is {w >= threshold}: tokens tied with the k-th or the nucleus's last weight are all kept.
// The draw walks the kept tokens in id order. Outputs: tokens [n], logprobs [n] (f32 bits),
// top [n][MAX_TOP_LOGPROBS][2] (id, f32 bits of log p).
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample(float* logits, int vocab, const int* params, const int* penalties, float* originals,
       int* adjustments, int* out, int n_rows) {
    __shared__ ArgBest best_scratch[32];
    __shared__ double sum_scratch[32];
    __shared__ int pick;
    int row_idx = blockIdx.x;
    float* row = logits + (long long)row_idx * vocab;
    const int* p = params + row_idx * SP_FIELDS;
    int* tokens = out;
    float* logprobs = (float*)(out + n_rows);
    int* top = out + 2 * n_rows + row_idx * MAX_TOP_LOGPROBS * 2;

    int want_logprob = p[SP_LOGPROB], n_top = p[SP_TOP_LOGPROBS];
    float lse = 0.0f;
    if (want_logprob || n_top > 0)
        lse = row_lse_and_top(row, vocab, n_top, top, best_scratch, sum_scratch);

    int* bias = nullptr;
    int bias_count = 0;
    if (p[SP_ADJUSTED] && adjustments[row_idx] >= 0) {
        int* record = adjustments + adjustments[row_idx];
        int mask_words = record[ADJ_MASK_WORDS];
        bias_count = record[ADJ_BIAS_COUNT];
        const unsigned* mask = (const unsigned*)(record + ADJ_HEADER);
        bias = record + ADJ_HEADER + mask_words;
        // Biased tokens are distinct, so each thread owns its entries.
        for (int e = threadIdx.x; e < bias_count; e += SAMPLE_THREADS) {
            int tok = bias[3 * e];
            float v = row[tok], b = __int_as_float(bias[3 * e + 1]);
            bias[3 * e + 2] = __float_as_int(v);
            row[tok] = b <= ADJ_BIAS_BAN ? NEG_INF : v + b;
        }
        __syncthreads();
        if (mask_words > 0) {
            for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
                int w = i >> 5;
                if (w >= mask_words || !((mask[w] >> (i & 31)) & 1u)) row[i] = NEG_INF;
            }
        }
        __syncthreads();
    }

    int pen_off = p[SP_PENALTY_OFFSET], pen_count = p[SP_PENALTY_COUNT];
    float repetition = __int_as_float(p[SP_REPETITION]);
    float frequency = __int_as_float(p[SP_FREQUENCY]), presence = __int_as_float(p[SP_PRESENCE]);
    // Entries are distinct tokens: (token, occurrences in the output).
    for (int e = threadIdx.x; e < pen_count; e += SAMPLE_THREADS) {
        int tok = penalties[2 * (pen_off + e)], n = penalties[2 * (pen_off + e) + 1];
        float v = row[tok];
        originals[pen_off + e] = v;
        if (repetition != 1.0f) v = v > 0.0f ? v / repetition : v * repetition;
        if (n > 0) v -= frequency * (float)n + presence;
        row[tok] = v;
    }
    __syncthreads();

    int token;
    float temperature = __int_as_float(p[SP_TEMPERATURE]);
    float inv_t = 1.0f / temperature;
    if (p[SP_GREEDY] || isinf(inv_t) || isnan(inv_t)) {
        token = row_argmax(row, vocab, best_scratch).i;
    } else {
        float mx = row_argmax(row, vocab, best_scratch).v;
        int top_k = p[SP_TOP_K];
        float top_p = __int_as_float(p[SP_TOP_P]), min_p = __int_as_float(p[SP_MIN_P]);
        float threshold = 0.0f;
        if (top_k > 0 && top_k < vocab)
            threshold = threshold_for(row, vocab, mx, inv_t, 0u, (double)top_k, true, sum_scratch);
        if (top_p < 1.0f) {
            double mass = kept_mass(row, vocab, mx, inv_t, threshold, false, sum_scratch);
            threshold = threshold_for(row, vocab, mx, inv_t, __float_as_uint(threshold),
                                      (double)top_p * mass, false, sum_scratch);
        }
        threshold = fmaxf(threshold, min_p);
        double total = kept_mass(row, vocab, mx, inv_t, threshold, false, sum_scratch);
        double u = __hiloint2double(p[SP_UNIFORM_HI], p[SP_UNIFORM_LO]);
        double target = u * total;
        // Each thread owns a contiguous run of ids; an exclusive scan of the runs' masses
        // finds the run where the cumulative mass passes the target.
        int per = (vocab + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
        int begin = threadIdx.x * per, end = min(vocab, begin + per);
        double mine = 0.0;
        int last_kept = -1;
        for (int i = begin; i < end; i++) {
            float w = expf((row[i] - mx) * inv_t);
            if (w >= threshold) {
                mine += (double)w;
                last_kept = i;
            }
        }
        __shared__ double run_mass[SAMPLE_THREADS];
        __shared__ int fallback;
        run_mass[threadIdx.x] = mine;
        if (threadIdx.x == 0) {
            pick = 0x7fffffff;
            fallback = -1;
        }
        __syncthreads();
        for (int o = 1; o < SAMPLE_THREADS; o *= 2) {
            double add = threadIdx.x >= o ? run_mass[threadIdx.x - o] : 0.0;
            __syncthreads();
            run_mass[threadIdx.x] += add;
            __syncthreads();
        }
        double cum = run_mass[threadIdx.x] - mine;
        if (cum <= target && target < cum + mine) {
            for (int i = begin; i < end; i++) {
                float w = expf((row[i] - mx) * inv_t);
                if (w >= threshold) {
                    cum += (double)w;
                    if (cum > target) {
                        atomicMin(&pick, i);
                        break;
                    }
                }
            }
        }
        if (last_kept >= 0) atomicMax(&fallback, last_kept);
        __syncthreads();
        // Rounding can leave the target at the very end: then the last kept token.
        if (pick != 0x7fffffff)
            token = pick;
        else if (fallback >= 0)
            token = fallback;
        else
            token = row_argmax(row, vocab, best_scratch).i;
    }

    if (threadIdx.x == 0) {
        tokens[row_idx] = token;
        float raw = row[token];
        for (int e = 0; e < pen_count; e++)
            if (penalties[2 * (pen_off + e)] == token) raw = originals[pen_off + e];
        // A bias saved the logit before any change (penalties saw the biased one).
        for (int e = 0; e < bias_count; e++)
            if (bias[3 * e] == token) raw = __int_as_float(bias[3 * e + 2]);
        logprobs[row_idx] = want_logprob ? raw - lse : 0.0f;
    }
}

// ---- FP8 (E4M3) quantization of a whole tensor with one scale (see fp8.rs). ----

#define QUANTIZE_THREADS 256
#define E4M3_MAX 448.0f
#define MIN_ABS_MAX 1e-30f


// The largest |x| of n values, into *max_bits (as f32 bits: for non-negative floats the
// bits order as the values do, so an integer atomicMax finds it). *max_bits starts at 0.
extern "C" __global__ void __launch_bounds__(QUANTIZE_THREADS)
absmax_bits(const elem_t* x, long long n, unsigned* max_bits) {
    __shared__ float scratch[32];
    float m = 0.0f;
    for (long long i = (long long)blockIdx.x * QUANTIZE_THREADS + threadIdx.x; i < n;
         i += (long long)gridDim.x * QUANTIZE_THREADS)
        m = fmaxf(m, fabsf(to_f(x[i])));
    m = warp_max(m);
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    if (lane == 0) scratch[warp] = m;
    __syncthreads();
    if (warp == 0) {
        m = warp_max(lane < QUANTIZE_THREADS / WARP ? scratch[lane] : 0.0f);
        if (lane == 0) atomicMax(max_bits, __float_as_uint(m));
    }
}

// q = e4m3(x * 448 / max|x|) over a whole tensor of 2 * pairs values, the maximum read
// from maximum slot `slot` (scale[1 + slot], absmax_bits' output); scale[0] = max|x| / 448.
// The other slot is zeroed for the next tensor's maximum (fp8.rs: `Fp8Tensor::quantize`).
extern "C" __global__ void __launch_bounds__(QUANTIZE_THREADS)
quantize_fp8_tensor(const elem_t* x, unsigned short* q, float* scale, long long pairs,
                    int slot) {
    float m = fmaxf(__uint_as_float(((const unsigned*)scale)[1 + slot]), MIN_ABS_MAX);
    float inverse = E4M3_MAX / m;
    for (long long i = (long long)blockIdx.x * QUANTIZE_THREADS + threadIdx.x; i < pairs;
         i += (long long)gridDim.x * QUANTIZE_THREADS)
        q[i] = e4m3x2(to_f(x[2 * i]) * inverse, to_f(x[2 * i + 1]) * inverse);
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        scale[0] = m / E4M3_MAX;
        ((unsigned*)scale)[2 - slot] = 0u;
    }
}
