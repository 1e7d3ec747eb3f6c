// Interleaved RoPE as GLM-5 applies it in MLA and in the DSA indexer: within each head of
// `width` values, the slice [start, start + 2*half) rotates pair (x[2j], x[2j+1]) by the table's
// angle j for the row's position, and is written de-interleaved (evens, then odds), as
// transformers does. The tables carry the default or YaRN frequencies and YaRN's attention
// scaling already (model::rope::RotaryEmbedding::tables), so one kernel serves both.
// x: [rows, heads, width] in place, row r at table position r % seq; cos, sin: [seq, half].
// One warp per (row, head), lane l rotating pairs l and l + 32 (half <= 64), so a warp's reads of a
// head are contiguous and nothing is held in a local array. Every pair is read before the block's
// barrier and written after it, as the de-interleaved writes land on values other lanes read.
// CPU reference: model::rope::RopeTables::apply.

extern "C" __global__ void rope_interleaved(float* x, const float* cos_t, const float* sin_t, int rows, int seq,
                                            int heads, int width, int start, int half) {
    long long id = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;  // (row, head)
    int lane = threadIdx.x % 32;
    bool live = id < (long long)rows * heads && half <= 64;
    float* v = live ? x + id * width + start : x;
    float lo0 = 0.0f, hi0 = 0.0f, lo1 = 0.0f, hi1 = 0.0f;  // pair lane's, then pair lane + 32's
    if (live) {
        long long s = (id / heads) % seq;
        const float* c = cos_t + s * half;
        const float* sn = sin_t + s * half;
        if (lane < half) {
            float a = v[2 * lane], b = v[2 * lane + 1];
            lo0 = a * c[lane] - b * sn[lane];
            hi0 = b * c[lane] + a * sn[lane];
        }
        int j = lane + 32;
        if (j < half) {
            float a = v[2 * j], b = v[2 * j + 1];
            lo1 = a * c[j] - b * sn[j];
            hi1 = b * c[j] + a * sn[j];
        }
    }
    __syncthreads();
    if (!live) return;
    if (lane < half) { v[lane] = lo0; v[lane + half] = hi0; }
    if (lane + 32 < half) { v[lane + 32] = lo1; v[lane + 32 + half] = hi1; }
}
