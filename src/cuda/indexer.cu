// The DSA indexer: scores and the causal top-k.
//   scores: score[b, s, t] = sum_h w[b, s, h] * relu(q[b, s, h] . k[b, t] * scale), -inf for
//     keys after the query (queries at positions offset .. offset + S over T keys); the dots are
//     one cuBLAS product per chunk of queries, then index_combine below. CPU reference:
//     device::Ops::index_scores (CpuOps), which takes k as [B, T, d] too (model::attention's own
//     reads the decode cache's [T, B, d]).
//   topk_causal: the K = min(index_topk, T) best causal keys per query, best first, ties to the
//     lower position; margin = K-th minus (K+1)-th causal score. A query with no more than K
//     causal keys keeps them all, listed by position and padded with the positions after it
//     (0 .. K-1), margin +inf, without ranking (every_key_row). One block per query row;
//     a key's rank is the number of keys that beat it, so no sort is needed. NaN ranks last, as
//     in the CPU sort. That is O(T) work per key, O(T^3) per prefill: fine for a few thousand
//     tokens, not for long contexts.
//   topk_sorted: the same result from a bitonic sort of each row's (score, position) pairs in
//     shared memory (8 bytes a key, padded to a power of two), O(T log^2 T) per row; chosen
//     while the row fits the block's shared memory (cuda::gpu::Gpu::topk_path).
//   topk_chunks_of_scores, topk_chunks_of_pairs, topk_emit: the same result for longer rows,
//     sorting chunks that fit and keeping each one's best K + 1, round after round.
//     CPU reference: model::indexer::top_k_causal.
//   every_key: the rows of queries that see no more than K keys, written without scores.
//     CPU reference: model::indexer::Selection::every_key.

// index_combine: the chunk's scores from g = q . k * scale (a cuBLAS product, cuda::attention):
//   scores[out_row0 + i, j] = sum_h w[w_row0 + i, h] * relu(g[i * n + h, j]) for the causal keys
//   j <= first + i (and j < t_eff, the keys g covers), -inf after. g is [qc * n, t_eff]. A block
//   per (query row i, tile of blockDim keys), so a long row still fills the card: the block's
//   row and tile are one 32-bit division, not a 64-bit one per element. The rows of all queries'
//   scores (out_row0 = w_row0), or of a chunk's own (out_row0 = 0) when its top-k is taken before
//   the next chunk.
extern "C" __global__ void index_combine(const float* g, const float* w, float* scores, int qc, int n, int t_eff,
                                         int t, long long w_row0, long long out_row0, int first) {
    int tiles = (t + (int)blockDim.x - 1) / (int)blockDim.x;
    int i = blockIdx.x / tiles, j = (blockIdx.x % tiles) * blockDim.x + threadIdx.x;
    if (i >= qc || j >= t) return;
    float* out = scores + (out_row0 + i) * t + j;
    if (j > first + i || j >= t_eff) { *out = -INFINITY; return; }
    const float* wr = w + (w_row0 + i) * n;
    const float* gi = g + (long long)i * n * t_eff + j;
    float acc = 0.0f;
    for (int h = 0; h < n; h++) acc += fmaxf(gi[(long long)h * t_eff], 0.0f) * wr[h];
    *out = acc;
}

// Whether key u (score x) ranks before key j (score v): higher score first, NaN last, ties to the
// lower position.
__device__ bool ranks_before(float x, int u, float v, int j) {
    bool xn = isnan(x), vn = isnan(v);
    if (xn != vn) return vn;
    if (xn) return u < j;
    return x > v || (x == v && u < j);
}

// A row that keeps every causal key (no more than kk of them), by the block's threads: keys
// 0..kk-1 by position (those past the query are padding, which attention ignores), margin +inf.
// The CPU lists such a row the same way (model::indexer::Selection::every_key).
__device__ void every_key_row(int* out, int kk, float* margin) {
    for (int r = threadIdx.x; r < kk; r += blockDim.x) out[r] = r;
    if (threadIdx.x == 0) *margin = INFINITY;
}

// every_key: rows row0 .. row0 + rows of idx [*, kk] and margin [*] as every_key_row writes them,
// for queries that see no more than kk keys, whose scores need not be computed at all. One
// block per row.
extern "C" __global__ void every_key(int* idx, float* margin, long long row0, long long rows, int kk) {
    long long row = row0 + blockIdx.x;
    if (blockIdx.x >= rows) return;
    every_key_row(idx + row * kk, kk, margin + row);
}

extern "C" __global__ void topk_causal(const float* scores, int s, int t, int offset, int kk, int* idx, float* margin) {
    long long row = blockIdx.x;
    int p = offset + (int)(row % s); // the query's position: keys 0..=p are causal
    const float* sc = scores + row * t;
    int* out = idx + row * kk;
    __shared__ float cut[2]; // the K-th and (K+1)-th scores
    if (threadIdx.x == 0) { cut[0] = INFINITY; cut[1] = -INFINITY; }
    __syncthreads();
    int causal = min(p + 1, t);
    if (causal <= kk) { // every causal key kept: listed by position, as the CPU lists them
        every_key_row(out, kk, margin + row);
        return;
    }
    for (int j = threadIdx.x; j < causal; j += blockDim.x) {
        float v = sc[j];
        int rank = 0;
        for (int u = 0; u < causal; u++) {
            float x = sc[u];
            rank += ranks_before(x, u, v, j) ? 1 : 0;
        }
        if (rank < kk) out[rank] = j;
        if (rank == kk - 1) cut[0] = v;
        if (rank == kk) cut[1] = v;
    }
    __syncthreads();
    if (threadIdx.x == 0) margin[row] = cut[0] - cut[1];
}

// Sorts len (a power of two) (score, position) pairs in shared memory, best first (ranks_before),
// with the whole block; ends after a barrier.
__device__ void bitonic_sort(float* key, int* pos, int len) {
    for (int size = 2; size <= len; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            // Pair q is slots i < j = i + stride, i the q-th slot whose `stride` bit is clear.
            for (int q = threadIdx.x; q < len / 2; q += blockDim.x) {
                int i = 2 * stride * (q / stride) + q % stride, j = i + stride;
                // Within an ascending run the earlier slot must hold the key that ranks first.
                bool ascending = (i & size) == 0;
                bool swap = ascending ? ranks_before(key[j], pos[j], key[i], pos[i])
                                      : ranks_before(key[i], pos[i], key[j], pos[j]);
                if (swap) {
                    float kx = key[i]; key[i] = key[j]; key[j] = kx;
                    int px = pos[i]; pos[i] = pos[j]; pos[j] = px;
                }
            }
            __syncthreads();
        }
    }
}

// Padding slots: they rank after every key, NaN ones included (NaN at the largest position).
#define PAD_SCORE __int_as_float(0x7fc00000)
#define PAD_POS 0x7fffffff

extern "C" __global__ void topk_sorted(const float* scores, int s, int t, int offset, int kk, int* idx, float* margin) {
    // [len] scores, then [len] positions.
    extern __shared__ float sorted_keys[];
    long long row = blockIdx.x;
    int p = offset + (int)(row % s);
    int causal = min(p + 1, t);
    if (causal <= kk) { // the whole block agrees: no barrier is skipped by some threads only
        every_key_row(idx + row * kk, kk, margin + row);
        return;
    }
    int len = 1;
    while (len < causal) len <<= 1;
    float* key = sorted_keys;
    int* pos = (int*)(sorted_keys + len);
    const float* sc = scores + row * t;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        key[j] = j < causal ? sc[j] : PAD_SCORE;
        pos[j] = j < causal ? j : PAD_POS;
    }
    __syncthreads();
    bitonic_sort(key, pos, len);
    int* out = idx + row * kk;
    for (int r = threadIdx.x; r < kk; r += blockDim.x) out[r] = pos[r];
    if (threadIdx.x == 0) margin[row] = key[kk - 1] - key[kk];
}

// The chunked top-k, for rows longer than a block's shared memory holds (cuda::gpu::TopK::Chunked):
// each chunk of `chunk` (a power of two) candidates of a row is sorted in shared memory and its
// best `keep` = K + 1 written out, best first (the margin needs the (K+1)-th). A key among a
// row's best K + 1 is among its chunk's best K + 1, so the row's best K + 1 are the best of the
// chunks' lists: the launcher repeats this over the lists until one chunk is left, then
// topk_emit writes idx and margin as topk_sorted would. Slots past a row's candidates hold
// (PAD_SCORE, PAD_POS). One block per (row, chunk).
//   topk_chunks_of_scores: the candidates are row r's causal keys (scores [rows, n]).
//   topk_chunks_of_pairs: n (score, position) pairs a row, from the previous round.
template <bool FROM_SCORES>
__device__ void topk_chunk(const float* score, const int* at, int n, int s, int offset, int chunk, int keep,
                           float* key, int* pos, float* out_score, int* out_pos) {
    int chunks = (n + chunk - 1) / chunk;
    long long row = blockIdx.x / chunks;
    long long c = blockIdx.x % chunks;
    long long avail = FROM_SCORES ? min(offset + (int)(row % s) + 1, n) : n;
    long long dst = (row * chunks + c) * keep;
    if (c * chunk >= avail) { // past the row's causal keys (the whole block agrees): padding only
        for (int r = threadIdx.x; r < keep; r += blockDim.x) {
            out_score[dst + r] = PAD_SCORE;
            out_pos[dst + r] = PAD_POS;
        }
        return;
    }
    for (int j = threadIdx.x; j < chunk; j += blockDim.x) {
        long long g = c * chunk + j;
        bool real = g < avail;
        long long src = row * n + g;
        key[j] = real ? score[src] : PAD_SCORE;
        pos[j] = real ? (FROM_SCORES ? (int)g : at[src]) : PAD_POS;
    }
    __syncthreads();
    bitonic_sort(key, pos, chunk);
    for (int r = threadIdx.x; r < keep; r += blockDim.x) {
        out_score[dst + r] = r < chunk ? key[r] : PAD_SCORE;
        out_pos[dst + r] = r < chunk ? pos[r] : PAD_POS;
    }
}

extern "C" __global__ void topk_chunks_of_scores(const float* scores, int n, int s, int offset, int chunk, int keep,
                                                 float* out_score, int* out_pos) {
    extern __shared__ float scores_chunk[];
    topk_chunk<true>(scores, 0, n, s, offset, chunk, keep, scores_chunk, (int*)(scores_chunk + chunk), out_score,
                     out_pos);
}

extern "C" __global__ void topk_chunks_of_pairs(const float* score, const int* at, int n, int chunk, int keep,
                                                float* out_score, int* out_pos) {
    extern __shared__ float pairs_chunk[];
    topk_chunk<false>(score, at, n, 1, 0, chunk, keep, pairs_chunk, (int*)(pairs_chunk + chunk), out_score, out_pos);
}

// topk_emit: rows' sorted best K + 1 pairs (n a row) -> idx [rows, kk] and margin [rows], as
// topk_sorted writes them. One block per row.
extern "C" __global__ void topk_emit(const float* score, const int* at, long long rows, int n, int s, int t,
                                     int offset, int kk, int* idx, float* margin) {
    long long row = blockIdx.x;
    if (row >= rows) return;
    if (min(offset + (int)(row % s) + 1, t) <= kk) { // every causal key is kept
        every_key_row(idx + row * kk, kk, margin + row);
        return;
    }
    const float* sc = score + row * n;
    for (int r = threadIdx.x; r < kk; r += blockDim.x) idx[row * kk + r] = at[row * n + r];
    if (threadIdx.x == 0) margin[row] = sc[kk - 1] - sc[kk];
}
