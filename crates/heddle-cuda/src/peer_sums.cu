// ===== Tensor parallelism: peer-to-peer all-reduce fused with the residual add and RMSNorm =====
// (peer_sums.rs), and greedy sampling over vocabulary slices. Appended to kernels.cu by
// kernels.rs: elem_t, to_f, from_f, block_sum and the sampler's ArgBest, better and
// row_argmax come from there.
//
// One process drives every GPU, with peer access enabled between them, so a kernel on one
// GPU reads another GPU's memory through NVLink directly. Each rank's row-parallel
// projection writes its partial output into its own exchange buffer (a slot: the attention
// output, the MLP output, the embedding; a fourth holds greedy sampling's bests); the next
// norm, on every rank, reads every rank's slot, adds them in rank order to the residual
// (so every rank computes the same bits), writes the residual back and normalises it. That is the all-reduce, the
// residual add and the norm in one kernel, and one read of the peers' data over NVLink.
//
// Synchronisation works unchanged when replayed from CUDA graphs, as nothing in it comes
// from the host at launch: each block keeps its own call counter (the epoch) in its rank's
// signal area, and on entry writes the new epoch into every peer's `arrived` word for
// (block, this rank), then waits until each peer's block of the same index has written
// the same epoch into its own. A peer's block running this call means the peer's earlier
// kernels (the projection that wrote its slot) are complete. Every rank launches the same
// calls with the same grid, so the counters agree. No barrier is needed on exit: a rank
// overwrites a slot only after a later call's barrier, which its peers pass only once
// they have finished reading this call's slot (the attention and MLP outputs alternate
// between two slots; the embedding and the greedy bests come once a step).

#define PEER_MAX_RANKS 8
#define PEER_SLOTS 4
#define PEER_MAX_BLOCKS 256
// Threads of a block (at most; fewer when a row needs fewer), elements each carries per
// chunk of the row, and chunks per row: rows up to 512 x 8 x 4 = 16384 elements (the host
// checks the model fits). 512 threads leave each 128 registers: every rank's chunk in
// flight at once, and the row's values kept for the norm.
#define PEER_THREADS 512
#define PEER_ELEMS 8
#define PEER_MAX_CHUNKS 4
// A peer that has not arrived after this long is not coming (a failed launch on its GPU):
// the kernel traps, and the step fails instead of hanging.
#define PEER_TIMEOUT_NS 10000000000ull

// Laid out by the host (PeerSums::new), one copy on each rank's GPU.
struct PeerTable {
    // The exchange slots of every rank, by slot then rank.
    unsigned long long partials[PEER_SLOTS][PEER_MAX_RANKS];
    // Every rank's signal area: arrived[PEER_MAX_BLOCKS][PEER_MAX_RANKS], then
    // epoch[PEER_MAX_BLOCKS].
    unsigned long long signals[PEER_MAX_RANKS];
};

__device__ __forceinline__ void store_release_system(unsigned* at, unsigned value) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(at), "r"(value) : "memory");
}

__device__ __forceinline__ unsigned load_acquire_system(const unsigned* at) {
    unsigned value;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(value) : "l"(at) : "memory");
    return value;
}

__device__ __forceinline__ unsigned long long global_timer_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Returns once block blockIdx.x of every rank has entered the same call.
__device__ void peer_barrier(const PeerTable* table, int rank, int ranks) {
    __shared__ unsigned epoch;
    unsigned* own = (unsigned*)table->signals[rank];
    if (threadIdx.x == 0) {
        unsigned* counter = own + PEER_MAX_BLOCKS * PEER_MAX_RANKS + blockIdx.x;
        epoch = *counter + 1;
        *counter = epoch;
    }
    __syncthreads();
    int peer = threadIdx.x;
    if (peer < ranks && peer != rank) {
        unsigned* theirs = (unsigned*)table->signals[peer];
        store_release_system(theirs + blockIdx.x * PEER_MAX_RANKS + rank, epoch);
        const unsigned* arrived = own + blockIdx.x * PEER_MAX_RANKS + peer;
        unsigned long long started = global_timer_ns();
        // Wrapping comparison: the epochs count up from 0 for the runner's life.
        while ((int)(load_acquire_system(arrived) - epoch) < 0) {
            if (global_timer_ns() - started > PEER_TIMEOUT_NS) __trap();
        }
    }
    __syncthreads();
}

// 8 bytes of an exchange slot, read past the caches (as below).
__device__ __forceinline__ uint2 load_uncached_pair(const void* at) {
    uint2 v;
    asm volatile("ld.volatile.global.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(at));
    return v;
}

// 16 bytes of an exchange slot, read past the caches: a slot is rewritten every second
// call, by a peer GPU, so a cached copy would be stale.
__device__ __forceinline__ uint4 load_uncached(const void* at) {
    uint4 v;
    asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(at));
    return v;
}

// PEER_ELEMS consecutive values of a slot as f32: one 16-byte load of bf16, two of f32.
__device__ __forceinline__ void load_slot(const unsigned short* at, float* v) {
    uint4 bits = load_uncached(at);
    unsigned words[4] = {bits.x, bits.y, bits.z, bits.w};
#pragma unroll
    for (int k = 0; k < 4; k++) {
        v[2 * k] = bf16_bits_to_f32((unsigned short)(words[k] & 0xffffu));
        v[2 * k + 1] = bf16_bits_to_f32((unsigned short)(words[k] >> 16));
    }
}

__device__ __forceinline__ void load_slot(const float* at, float* v) {
    uint4 a = load_uncached(at), b = load_uncached(at + 4);
    unsigned words[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int k = 0; k < 8; k++) v[k] = __uint_as_float(words[k]);
}

// PEER_ELEMS consecutive f32 of this rank's own memory (the residual).
__device__ __forceinline__ void load_own(const float* at, float* v) {
    float4 a = *(const float4*)at, b = *(const float4*)(at + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

__device__ __forceinline__ void store_elems(unsigned short* at, const float* v) {
    unsigned words[4];
#pragma unroll
    for (int k = 0; k < 4; k++)
        words[k] = (unsigned)f32_to_bf16_bits(v[2 * k]) |
                   ((unsigned)f32_to_bf16_bits(v[2 * k + 1]) << 16);
    *(uint4*)at = make_uint4(words[0], words[1], words[2], words[3]);
}

__device__ __forceinline__ void store_elems(float* at, const float* v) {
    *(float4*)at = make_float4(v[0], v[1], v[2], v[3]);
    *(float4*)(at + 4) = make_float4(v[4], v[5], v[6], v[7]);
}

// For each output row (blocks stride over them): x = residual[src] (or 0 when !add, for the
// embedding, whose partials are the whole value) + the ranks' partials of slot `slot` at
// src, in rank order; x written back to the residual when write_back; out[row] = x /
// rms(x) * weight. rows (may be null) picks the source row of each output row.
template <typename Partial>
__device__ void peer_sum_rmsnorm(float* residual, const PeerTable* table, int slot, bool add,
                                 const elem_t* weight, elem_t* out, const int* rows,
                                 int num_rows, int hidden, float eps, int write_back, int rank,
                                 int ranks) {
    __shared__ float scratch[32];
    peer_barrier(table, rank, ranks);
    for (int row = blockIdx.x; row < num_rows; row += gridDim.x) {
        long long src = (long long)(rows ? rows[row] : row) * hidden;
        float x[PEER_MAX_CHUNKS][PEER_ELEMS];
        float squares = 0.0f;
#pragma unroll
        for (int c = 0; c < PEER_MAX_CHUNKS; c++) {
            int i = (c * blockDim.x + threadIdx.x) * PEER_ELEMS;
            if (i >= hidden) continue;
            float parts[PEER_MAX_RANKS][PEER_ELEMS];
            // Every rank's load issued before any is used: one NVLink round trip, not one
            // per rank.
#pragma unroll
            for (int r = 0; r < PEER_MAX_RANKS; r++)
                if (r < ranks)
                    load_slot((const Partial*)table->partials[slot][r] + src + i, parts[r]);
            if (add) {
                load_own(residual + src + i, x[c]);
            } else {
#pragma unroll
                for (int k = 0; k < PEER_ELEMS; k++) x[c][k] = 0.0f;
            }
#pragma unroll
            for (int r = 0; r < PEER_MAX_RANKS; r++)
                if (r < ranks)
#pragma unroll
                    for (int k = 0; k < PEER_ELEMS; k++) x[c][k] += parts[r][k];
            if (write_back) store_elems(residual + src + i, x[c]);
#pragma unroll
            for (int k = 0; k < PEER_ELEMS; k++) squares += x[c][k] * x[c][k];
        }
        float scale = rsqrtf(block_sum(squares, scratch) / hidden + eps);
#pragma unroll
        for (int c = 0; c < PEER_MAX_CHUNKS; c++) {
            int i = (c * blockDim.x + threadIdx.x) * PEER_ELEMS;
            if (i >= hidden) continue;
            float y[PEER_ELEMS];
#pragma unroll
            for (int k = 0; k < PEER_ELEMS; k++) y[k] = (x[c][k] * scale) * to_f(weight[i + k]);
            store_elems(out + (long long)row * hidden + i, y);
        }
    }
}

// A layer's all-reduce of its partial projections (elem_t) into the residual, then the norm.
extern "C" __global__ void __launch_bounds__(PEER_THREADS)
peer_add_rmsnorm(float* residual, const PeerTable* table, int slot, const elem_t* weight,
                 elem_t* out, const int* rows, int num_rows, int hidden, float eps,
                 int write_back, int rank, int ranks) {
    peer_sum_rmsnorm<elem_t>(residual, table, slot, true, weight, out, rows, num_rows, hidden,
                             eps, write_back, rank, ranks);
}

// The embedding's all-reduce (f32 partials, each token's row nonzero on one rank) into the
// residual, replacing it, then the first layer's norm.
extern "C" __global__ void __launch_bounds__(PEER_THREADS)
peer_embed_rmsnorm(float* residual, const PeerTable* table, int slot, const elem_t* weight,
                   elem_t* out, int num_rows, int hidden, float eps, int rank, int ranks) {
    peer_sum_rmsnorm<float>(residual, table, slot, false, weight, out, 0, num_rows, hidden, eps,
                            1, rank, ranks);
}

// Greedy sampling over vocabulary slices (every row plain greedy: see plan.rs). Each rank's
// block finds the best (value, token id) of its slice of each of its rows (logits: [rows]
// [vocab] f32, the slice starting at token first_token) and writes it to its slot; after
// the barrier, rank 0 (the one given `out`) combines the ranks' bests in rank order, which
// is token order, with the sampler's own rule (larger value, then lower id), so it picks
// what the arg-max of the whole row picks. Thread k of block b takes row b + k * grid.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
peer_greedy(const float* logits, int vocab, int first_token, const PeerTable* table, int slot,
            int* out, int num_rows, int rank, int ranks) {
    __shared__ ArgBest best_scratch[32];
    int* mine = (int*)table->partials[slot][rank];
    for (int row = blockIdx.x; row < num_rows; row += gridDim.x) {
        ArgBest best = row_argmax(logits + (long long)row * vocab, vocab, best_scratch);
        if (threadIdx.x == 0) {
            mine[2 * row] = __float_as_int(best.v);
            mine[2 * row + 1] = best.i < 0 ? -1 : best.i + first_token;
        }
    }
    peer_barrier(table, rank, ranks);
    if (!out) return;
    int row = blockIdx.x + threadIdx.x * gridDim.x;
    if (row >= num_rows) return;
    ArgBest best = {NEG_INF, -1};
    for (int r = 0; r < ranks; r++) {
        uint2 theirs = load_uncached_pair((const int*)table->partials[slot][r] + 2 * row);
        float v = __uint_as_float(theirs.x);
        int i = (int)theirs.y;
        if (better(v, i, best.v, best.i)) best = ArgBest{v, i};
    }
    out[row] = best.i;
}
