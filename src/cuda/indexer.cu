// The DSA indexer: scores and the causal top-k.
//   index_scores: score[b, s, t] = sum_h w[b, s, h] * relu(q[b, s, h] . k[b, t] * scale), -inf for
//     keys after the query (queries at positions offset .. offset + S over T keys). One thread per
//     (b, s, t). CPU reference: model::indexer::IndexerWeights::scores.
//   topk_causal: the K = min(index_topk, T) best causal keys per query, best first, ties to the
//     lower position, padded with the positions after the query when it has fewer than K keys;
//     margin = K-th minus (K+1)-th causal score (+inf when nothing is cut). One block per query row;
//     a key's rank is the number of keys that beat it, so no sort is needed. NaN ranks last, as
//     in the CPU sort.
//     CPU reference: model::indexer::top_k_causal.

extern "C" __global__ void index_scores(const float* q, const float* k, const float* w, float* scores, int batch,
                                        int s, int t, int n, int d, int offset, float scale) {
    long long id = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (id >= (long long)batch * s * t) return;
    int key = (int)(id % t);
    long long row = id / t; // b * s + query
    int b = (int)(row / s), query = (int)(row % s);
    if (key > offset + query) { scores[id] = -INFINITY; return; }
    const float* kv = k + ((long long)b * t + key) * d;
    float acc = 0.0f;
    for (int h = 0; h < n; h++) {
        const float* qv = q + (row * n + h) * d;
        float dot = 0.0f;
        for (int i = 0; i < d; i++) dot += qv[i] * kv[i];
        acc += fmaxf(dot * scale, 0.0f) * w[row * n + h];
    }
    scores[id] = acc;
}

// Whether key u (score x) ranks before key j (score v): higher score first, NaN last, ties to the
// lower position.
__device__ bool ranks_before(float x, int u, float v, int j) {
    bool xn = isnan(x), vn = isnan(v);
    if (xn != vn) return vn;
    if (xn) return u < j;
    return x > v || (x == v && u < j);
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
    for (int r = causal + threadIdx.x; r < kk; r += blockDim.x) out[r] = r; // padding past the query
    if (threadIdx.x == 0) margin[row] = causal > kk ? cut[0] - cut[1] : INFINITY;
}
