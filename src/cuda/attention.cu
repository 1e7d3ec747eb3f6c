// MLA attention over the keys DSA selected, in the expanded form (CPU reference:
// model::mla::Attention::forward): for query (b, s) at position offset + s and head h,
//   score_j = (q_nope . k_nope_h(key_j) + q_rope . k_rope(key_j)) * scale over the selected keys
//   key_j <= offset + s (later entries are padding), softmax, then sum_j p_j v_h(key_j).
// q [B, S, nh, nope + rd] roped; kv [B, T, nh, nope + vd] (kv_b_proj of the latent);
// k_rope [B, T, rd] roped, shared by all heads; idx [B, S, K]; out [B, S, nh, vd].
// One block per (b, s, h), blockDim a multiple of 32; shared memory K floats. For long contexts
// only (cuda::attention picks the masked form while the causal keys are few enough).

extern "C" __global__ void sparse_attention(const float* q, const float* kv, const float* k_rope, const int* idx,
                                            float* out, int s, int t, int nh, int nope, int rd, int vd, int kk,
                                            int offset, float scale) {
    extern __shared__ float prob[];
    long long bs = blockIdx.x / nh; // b * S + query
    int h = blockIdx.x % nh;
    int b = (int)(bs / s), p = offset + (int)(bs % s);
    const float* qv = q + (bs * nh + h) * (nope + rd);
    const int* sel = idx + bs * kk;
    // Scores: a warp per key, its lanes over the key's dimensions, so each key row is read in
    // coalesced runs; the sum goes round the warp by shuffles.
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int j = warp; j < kk; j += warps) {
        int key = sel[j];
        bool valid = key >= 0 && key <= p && key < t; // the same for the whole warp
        float dot = 0.0f;
        if (valid) {
            const float* kn = kv + (((long long)b * t + key) * nh + h) * (nope + vd);
            const float* kr = k_rope + ((long long)b * t + key) * rd;
            for (int i = lane; i < nope; i += 32) dot += qv[i] * kn[i];
            for (int i = lane; i < rd; i += 32) dot += qv[nope + i] * kr[i];
        }
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffff, dot, o);
        if (lane == 0) prob[j] = valid ? dot * scale : -INFINITY;
    }
    __syncthreads();
    float local_max = -INFINITY;
    for (int j = threadIdx.x; j < kk; j += blockDim.x) local_max = fmaxf(local_max, prob[j]);
    float m = block_max(local_max);
    float local_sum = 0.0f;
    for (int j = threadIdx.x; j < kk; j += blockDim.x) {
        float e = prob[j] == -INFINITY ? 0.0f : expf(prob[j] - m);
        prob[j] = e;
        local_sum += e;
    }
    float total = block_sum(local_sum);
    __syncthreads();
    float* o = out + (bs * nh + h) * vd;
    for (int d = threadIdx.x; d < vd; d += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < kk; j++) {
            if (prob[j] == 0.0f) continue;
            int key = sel[j];
            acc += prob[j] * kv[(((long long)b * t + key) * nh + h) * (nope + vd) + nope + d];
        }
        o[d] = acc / total;
    }
}

// The masked form (cuda::attention, for contexts not much longer than K): the scores of a chunk
// of queries against every causal key come from cuBLAS, and these two kernels restrict them to
// the selection. A key selected twice counts once here (transformers applies DSA as a mask too);
// the top-k never selects one twice.
//   selection_mask: mask[i, j] = 1 if key j is selected for query i of the chunk (position
//     first + i), is causal and j < t_eff; else 0. One block per query.
//   masked_softmax: each row (h, i) of scores [heads, qc, t_eff] becomes the softmax over its
//     masked-in keys, 0 elsewhere (a row with no key is NaN, as in the gathered form). One block
//     per row.
//   masked_softmax_split: the same softmax, written as split bf16 (convert.cu's split_bf16) rows
//     of out [heads, qc, 2 half], the high halves at 0 and the low ones at half (>= t_eff: rows
//     padded so each half starts 16-byte aligned for cuBLAS), for the bf16 mode's value products;
//     scores untouched.

extern "C" __global__ void selection_mask(const int* idx, long long idx0, float* mask, int kk, int t_eff, int first) {
    int i = blockIdx.x, p = first + i;
    float* row = mask + (long long)i * t_eff;
    for (int j = threadIdx.x; j < t_eff; j += blockDim.x) row[j] = 0.0f;
    __syncthreads();
    const int* sel = idx + idx0 + (long long)i * kk;
    for (int j = threadIdx.x; j < kk; j += blockDim.x) {
        int key = sel[j];
        if (key >= 0 && key <= p && key < t_eff) row[key] = 1.0f;
    }
}

extern "C" __global__ void masked_softmax(float* scores, const float* mask, int qc, int t_eff) {
    long long r = blockIdx.x;
    float* row = scores + r * t_eff;
    const float* m = mask + (r % qc) * t_eff;
    float local_max = -INFINITY;
    for (int j = threadIdx.x; j < t_eff; j += blockDim.x)
        if (m[j] != 0.0f) local_max = fmaxf(local_max, row[j]);
    float mx = block_max(local_max);
    float local_sum = 0.0f;
    for (int j = threadIdx.x; j < t_eff; j += blockDim.x) {
        float e = m[j] != 0.0f ? expf(row[j] - mx) : 0.0f;
        row[j] = e;
        local_sum += e;
    }
    float inv = 1.0f / block_sum(local_sum);
    for (int j = threadIdx.x; j < t_eff; j += blockDim.x) row[j] *= inv;
}

// One warp per row, 8 rows a block of 256: the row's max and sum go round the warp by shuffles,
// with no block barrier (the block-per-row masked_softmax, reducing about 5 values a thread at
// GLM-5's 2048 tokens, spent most of its time at its barriers: 1.1 ms a layer on an H200, three
// times the memory's pace; this form is not yet timed there).
extern "C" __global__ void masked_softmax_split(const float* scores, const float* mask, bf16_t* out, int rows,
                                                int qc, int t_eff, int half) {
    long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return; // the same for the whole warp
    int lane = threadIdx.x & 31;
    const float* row = scores + r * t_eff;
    const float* m = mask + (r % qc) * t_eff;
    bf16_t* hi = out + r * 2 * half;
    bf16_t* lo = hi + half;
    float mx = -INFINITY;
    for (int j = lane; j < t_eff; j += 32)
        if (m[j] != 0.0f) mx = fmaxf(mx, row[j]);
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
    float sum = 0.0f;
    for (int j = lane; j < t_eff; j += 32) sum += m[j] != 0.0f ? expf(row[j] - mx) : 0.0f;
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
    float inv = 1.0f / sum;
    for (int j = lane; j < t_eff; j += 32) {
        // As masked_softmax: 0 * inv, so a row with no key (inv infinite) is NaN.
        float p = (m[j] != 0.0f ? expf(row[j] - mx) : 0.0f) * inv;
        bf16_t h = f32_to_bf16(p);
        hi[j] = h;
        lo[j] = f32_to_bf16(p - bf16_to_f32(h));
    }
}
