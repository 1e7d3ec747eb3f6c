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
// of queries against every causal key come from cuBLAS, and these kernels restrict them to the
// selection. A key selected twice counts once here (transformers applies DSA as a mask too); the
// top-k never selects one twice.
//   selection_bits: bits[i, w] bit b is 1 when key 32 w + b is selected for query i of the chunk
//     (position first + i), is causal and < t_eff; words = ceil(t_eff / 32) a row (a
//     thirty-second of an f32 mask's bytes, which every head's rows read again). One block per
//     query.
//   masked_softmax: each row (h, i) of scores [heads, qc, t_eff] becomes the softmax over the
//     keys bits[i] keeps, 0 elsewhere (a row with no key is NaN, as in the gathered form), in
//     place.
//   masked_softmax_bf16: the same softmax, rounded to bf16 into rows of out [heads, qc, width]
//     (width >= t_eff: rows padded so each starts 16-byte aligned for cuBLAS), for the bf16
//     mode's value product; scores untouched.
// Both softmaxes run one warp per row, 8 rows a block of 256: the row's max and sum go round the
// warp by shuffles, with no block barrier (a block per row, reducing about 5 values a thread at
// GLM-5's 2048 tokens, spent most of its time at its barriers: 1.1 ms a layer on an H200, three
// times the memory's pace), and a row of up to 2048 keys stays in the warp's registers, so it is
// read once, not three times (masked_row_softmax). Neither form is timed on a GPU yet.

extern "C" __global__ void selection_bits(const int* idx, long long idx0, unsigned* bits, int kk, int t_eff,
                                          int first) {
    int i = blockIdx.x, p = first + i, words = (t_eff + 31) >> 5;
    unsigned* row = bits + (long long)i * words;
    for (int w = threadIdx.x; w < words; w += blockDim.x) row[w] = 0u;
    __syncthreads();
    const int* sel = idx + idx0 + (long long)i * kk;
    for (int j = threadIdx.x; j < kk; j += blockDim.x) {
        int key = sel[j];
        if (key >= 0 && key <= p && key < t_eff) atomicOr(&row[key >> 5], 1u << (key & 31));
    }
}

// Whether word row b keeps key j (a warp's 32 lanes, at j = lane + 32 n, read one word together).
__device__ __forceinline__ bool kept(const unsigned* b, int j) { return (b[j >> 5] >> (j & 31)) & 1u; }

// The values a lane holds in registers: a row of up to 32 * SOFTMAX_HELD keys (GLM-5's 2048 at
// index_topk's reach) is read from memory once, each exp computed once; a longer row is read three
// times (max, sum, write). Both give the same values: each lane sums its keys in the same order.
#define SOFTMAX_HELD 64

// The softmax of row `row` over the keys b keeps (0 elsewhere; a row with no key is NaN: 0 times
// an infinite 1 / sum), handed to put(j, p) for each key j < t_eff of this lane (j = lane + 32 n),
// after this lane's last read of row[j]: put may overwrite row[j], and no other key.
template <typename Put>
__device__ __forceinline__ void masked_row_softmax(const float* row, const unsigned* b, int t_eff, int lane, Put put) {
    float m = -INFINITY, sum = 0.0f;
    if (t_eff <= 32 * SOFTMAX_HELD) {
        // The loops run whole past a shorter row's end: stopping them there (`break`) took NVRTC
        // from 80 registers a thread to 167, one block an SM.
        float v[SOFTMAX_HELD]; // the kept scores, then their exps; -inf for a key not kept
#pragma unroll
        for (int n = 0; n < SOFTMAX_HELD; n++) {
            int j = lane + 32 * n;
            v[n] = (j < t_eff && kept(b, j)) ? row[j] : -INFINITY;
            m = fmaxf(m, v[n]);
        }
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
#pragma unroll
        for (int n = 0; n < SOFTMAX_HELD; n++) {
            v[n] = v[n] == -INFINITY ? 0.0f : expf(v[n] - m);
            sum += v[n];
        }
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
        float inv = 1.0f / sum;
#pragma unroll
        for (int n = 0; n < SOFTMAX_HELD; n++)
            if (lane + 32 * n < t_eff) put(lane + 32 * n, v[n] * inv);
        return;
    }
    for (int j = lane; j < t_eff; j += 32)
        if (kept(b, j)) m = fmaxf(m, row[j]);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
    for (int j = lane; j < t_eff; j += 32) sum += kept(b, j) ? expf(row[j] - m) : 0.0f;
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
    float inv = 1.0f / sum;
    for (int j = lane; j < t_eff; j += 32) put(j, (kept(b, j) ? expf(row[j] - m) : 0.0f) * inv);
}

extern "C" __global__ void masked_softmax(float* scores, const unsigned* bits, int rows, int qc, int t_eff) {
    long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return; // the same for the whole warp
    float* row = scores + r * t_eff;
    const unsigned* b = bits + (r % qc) * ((t_eff + 31) >> 5);
    masked_row_softmax(row, b, t_eff, threadIdx.x & 31, [&](int j, float p) { row[j] = p; });
}

extern "C" __global__ void masked_softmax_bf16(const float* scores, const unsigned* bits, bf16_t* out, int rows,
                                               int qc, int t_eff, int width) {
    long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return; // the same for the whole warp
    const unsigned* b = bits + (r % qc) * ((t_eff + 31) >> 5);
    bf16_t* p = out + r * width;
    masked_row_softmax(scores + r * t_eff, b, t_eff, threadIdx.x & 31,
                       [&](int j, float v) { p[j] = f32_to_bf16(v); });
}

// flash_attention_bf16: bf16 mode's masked form in one pass (cuda::attention, AttentionPath::Fused),
// with no scores in memory. For query i of a chunk (position first + i, row row0 + i of q and out)
// and head h:
//   out[i, h] = sum_j p_j v_h(key0 + j) / sum_j p_j,  p_j = exp(s_j - max),
//   s_j = scale * bf16(q_i) . k_h(key0 + j)  over the keys j < t_eff whose bit is set in bits[i],
// the products on tensor cores (mma_bf16_16816) with f32 accumulation. As a flash attention does,
// each p_j is rounded to bf16 before its product, not p_j / sum (the masked form's
// masked_softmax_bf16): a different rounding of the same values, not a different result. A row with
// no key is NaN (0 / 0), as in the other forms.
// q [.., nh, qk] f32 (rounded here); keys [nh, bt, qk] and values [nh, bt, vd] bf16 (split_bf16's
// rounded copies); bits [qc, ceil(t_eff / 32)] (selection_bits: a step's 32 keys are one word);
// out [.., nh, vd]. vd <= 8 * FA_VT.
// One block of 4 warps per (head, 64 queries), each warp 16 queries; a step loads 32 keys and
// their values (transposed) into shared memory. Dynamic shared memory: (96 * sq + vdp * 40) bf16,
// sq = qk rounded up to 16, plus 8 (the padding puts a fragment's 8 rows in different banks).
#define FA_M 64
#define FA_N 32
// The selection is read as one 32-bit word of bits a step of keys (below).
static_assert(FA_N == 32, "a step of keys is one word of selection bits");
#define FA_VT 32

extern "C" __global__ void __launch_bounds__(128) flash_attention_bf16(const float* q, const bf16_t* keys,
                                                                         const bf16_t* values, const unsigned* bits,
                                                                         float* out, long long row0, long long key0,
                                                                         long long bt, int qc, int t_eff, int first,
                                                                         int nh, int qk, int vd, float scale) {
    // 16-byte aligned: the tiles are stored 16 bytes at a time.
    extern __shared__ bf16x8 fa_smem[];
    int qkp = (qk + 15) & ~15, vdp = (vd + 7) & ~7, sq = qkp + 8, sv = FA_N + 8;
    bf16_t* qs = (bf16_t*)fa_smem;
    bf16_t* ks = qs + FA_M * sq;
    bf16_t* vt = ks + FA_N * sq; // vt[c * sv + j]: value c of key j
    int qtiles = (qc + FA_M - 1) / FA_M;
    // The longest tiles (the last queries see the most keys) first.
    int h = blockIdx.x / qtiles, i0 = (qtiles - 1 - (int)(blockIdx.x % qtiles)) * FA_M;
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
    for (int e = tid; e < FA_M * qkp; e += blockDim.x) {
        int r = e / qkp, c = e % qkp;
        float x = (i0 + r < qc && c < qk) ? q[((row0 + i0 + r) * nh + h) * qk + c] : 0.0f;
        qs[r * sq + c] = f32_to_bf16(x);
    }
    // Keys past the block's last query's position are masked out for every query of it.
    int kend = min(t_eff, first + min(i0 + FA_M, qc));
    const bf16_t* kh = keys + ((long long)h * bt + key0) * qk;
    const bf16_t* vh = values + ((long long)h * bt + key0) * vd;
    // Whole 16-byte vectors: every row of keys and values starts 16-byte aligned (the buffers are).
    bool vec = (qk & 7) == 0 && (vd & 7) == 0;
    int r0 = warp * 16 + g; // this thread's rows: r0 and r0 + 8 of the block's
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    float o[FA_VT][4];
#pragma unroll
    for (int nv = 0; nv < FA_VT; nv++)
        for (int e = 0; e < 4; e++) o[nv][e] = 0.0f;

    for (int j0 = 0; j0 < kend; j0 += FA_N) {
        __syncthreads(); // every warp is done with the last step's keys and values (and q is in)
        if (vec) {
            // 16 bytes a load: rows of keys and values are whole vectors of 8 (and so is the
            // padding up to qkp and vdp, zeros).
            const bf16x8 zero = {{0u, 0u, 0u, 0u}};
            for (int e = tid; e < FA_N * (qkp >> 3); e += blockDim.x) {
                int r = e / (qkp >> 3), c = (e % (qkp >> 3)) << 3;
                bool in = j0 + r < kend && c < qk;
                st_bf16x8(ks + r * sq + c, in ? ld_bf16x8(kh + (long long)(j0 + r) * qk + c) : zero);
            }
            // A warp's lanes take 32 keys of one vector of values: their transposed stores are
            // neighbouring bf16 of one row of vt (with lanes along a key's vectors instead, the
            // stores of a warp would all fall in one bank).
            for (int e = tid; e < FA_N * (vdp >> 3); e += blockDim.x) {
                int r = e % FA_N, c = (e / FA_N) << 3;
                bool in = j0 + r < kend && c < vd;
                bf16x8 v = in ? ld_bf16x8(vh + (long long)(j0 + r) * vd + c) : zero;
                for (int i = 0; i < 8; i++) vt[(c + i) * sv + r] = (bf16_t)(v.w[i >> 1] >> ((i & 1) * 16));
            }
        } else {
            for (int e = tid; e < FA_N * qkp; e += blockDim.x) {
                int r = e / qkp, c = e % qkp;
                ks[r * sq + c] = (j0 + r < kend && c < qk) ? kh[(long long)(j0 + r) * qk + c] : (bf16_t)0;
            }
            for (int e = tid; e < FA_N * vdp; e += blockDim.x) {
                int r = e / vdp, c = e % vdp;
                vt[c * sv + r] = (j0 + r < kend && c < vd) ? vh[(long long)(j0 + r) * vd + c] : (bf16_t)0;
            }
        }
        __syncthreads();

        // s = q k^T for the warp's 16 queries and the step's 32 keys: 4 tiles of 8 keys.
        float s[4][4];
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
            for (int e = 0; e < 4; e++) s[nt][e] = 0.0f;
        for (int k = 0; k < qkp; k += 16) {
            const bf16_t* qa = qs + r0 * sq + k + 2 * tq;
            unsigned a[4] = {ld_bf16x2(qa), ld_bf16x2(qa + 8 * sq), ld_bf16x2(qa + 8), ld_bf16x2(qa + 8 * sq + 8)};
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                const bf16_t* kb = ks + (nt * 8 + g) * sq + k + 2 * tq;
                unsigned b[2] = {ld_bf16x2(kb), ld_bf16x2(kb + 8)};
                mma_bf16_16816(s[nt], a, b);
            }
        }

        // Scaled and masked; element e of tile nt is row r0 + 8 (e / 2), key j0 + 8 nt + 2 tq + e % 2,
        // whose bit in the row's word for this step is 8 nt + 2 tq + e % 2.
        unsigned word[2];
        for (int rr = 0; rr < 2; rr++) {
            int i = i0 + r0 + rr * 8;
            word[rr] = i < qc ? bits[(long long)i * ((t_eff + 31) >> 5) + (j0 >> 5)] : 0u;
        }
        float mx[2] = {m[0], m[1]};
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
            for (int e = 0; e < 4; e++) {
                int b = nt * 8 + 2 * tq + (e & 1);
                bool in = j0 + b < kend && ((word[e >> 1] >> b) & 1u);
                s[nt][e] = in ? s[nt][e] * scale : -INFINITY;
                mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
            }
        // A row's values are spread over the 4 lanes of a quad.
        float alpha[2];
        for (int rr = 0; rr < 2; rr++) {
            mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffff, mx[rr], 1));
            mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffff, mx[rr], 2));
            alpha[rr] = mx[rr] == -INFINITY ? 1.0f : expf(m[rr] - mx[rr]); // no key yet: nothing to rescale
            m[rr] = mx[rr];
            l[rr] *= alpha[rr];
        }
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
            for (int e = 0; e < 4; e++) {
                float p = s[nt][e] == -INFINITY ? 0.0f : expf(s[nt][e] - m[e >> 1]);
                s[nt][e] = p;
                l[e >> 1] += p; // this lane's share; the quad's are summed at the end
            }
#pragma unroll
        for (int nv = 0; nv < FA_VT; nv++)
            for (int e = 0; e < 4; e++) o[nv][e] *= alpha[e >> 1];

        // o += p v: p's accumulator tiles are the A operand's layout already (two tiles of 8 keys
        // make one of 16), so p never leaves the registers.
#pragma unroll
        for (int kt = 0; kt < 2; kt++) {
            unsigned a[4] = {pack_bf16x2(s[2 * kt][0], s[2 * kt][1]), pack_bf16x2(s[2 * kt][2], s[2 * kt][3]),
                             pack_bf16x2(s[2 * kt + 1][0], s[2 * kt + 1][1]),
                             pack_bf16x2(s[2 * kt + 1][2], s[2 * kt + 1][3])};
#pragma unroll
            for (int nv = 0; nv < FA_VT; nv++) {
                if (nv * 8 >= vdp) break;
                const bf16_t* vb = vt + (nv * 8 + g) * sv + kt * 16 + 2 * tq;
                unsigned b[2] = {ld_bf16x2(vb), ld_bf16x2(vb + 8)};
                mma_bf16_16816(o[nv], a, b);
            }
        }
    }

    for (int rr = 0; rr < 2; rr++) {
        l[rr] += __shfl_xor_sync(0xffffffff, l[rr], 1);
        l[rr] += __shfl_xor_sync(0xffffffff, l[rr], 2);
    }
#pragma unroll
    for (int nv = 0; nv < FA_VT; nv++)
        for (int e = 0; e < 4; e++) {
            int i = i0 + r0 + (e >> 1) * 8, c = nv * 8 + 2 * tq + (e & 1);
            if (i < qc && c < vd) out[((row0 + i) * nh + h) * vd + c] = o[nv][e] / l[e >> 1];
        }
}

// mma_probe: one mma_bf16_16816 of a [16, 16] by b [16, 8] into d [16, 8] (row-major; b given
// transposed, bt [8, 16], as flash_attention_bf16 holds its keys and values), the fragments loaded
// and stored as that kernel does. selftest's check of the PTX fragment layouts the tensor-core
// kernels rest on, with inputs that make each output name the elements it took: where the hardware
// differs from the layouts assumed here (and in the emulation's mma), the check's line says how.
extern "C" __global__ void __launch_bounds__(32) mma_probe(const bf16_t* a, const bf16_t* bt, float* d) {
    int lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const bf16_t* pa = a + g * 16 + 2 * tq;
    unsigned ra[4] = {ld_bf16x2(pa), ld_bf16x2(pa + 8 * 16), ld_bf16x2(pa + 8), ld_bf16x2(pa + 8 * 16 + 8)};
    const bf16_t* pb = bt + g * 16 + 2 * tq;
    unsigned rb[2] = {ld_bf16x2(pb), ld_bf16x2(pb + 8)};
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    mma_bf16_16816(acc, ra, rb);
    for (int e = 0; e < 4; e++) d[(g + (e >> 1) * 8) * 8 + 2 * tq + (e & 1)] = acc[e];
}
