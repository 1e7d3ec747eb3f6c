// Interleaved RoPE as GLM-5 applies it in MLA and in the DSA indexer: within each head of
// `width` values, the slice [start, start + 2*half) rotates pair (x[2j], x[2j+1]) by the table's
// angle j for the row's position, and is written de-interleaved (evens, then odds), as
// transformers does. The tables carry the default or YaRN frequencies and YaRN's attention
// scaling already (model::rope::RotaryEmbedding::tables), so one kernel serves both.
// x: [rows, heads, width] in place, row r at table position r % seq; cos, sin: [seq, half].
// One thread per (row, head). CPU reference: model::rope::RopeTables::apply.

extern "C" __global__ void rope_interleaved(float* x, const float* cos_t, const float* sin_t, int rows, int seq,
                                            int heads, int width, int start, int half) {
    long long id = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (id >= (long long)rows * heads || half > 64) return;
    int s = (int)((id / heads) % seq);
    float* v = x + id * width + start;
    const float* c = cos_t + (long long)s * half;
    const float* sn = sin_t + (long long)s * half;
    float out[128];
    for (int j = 0; j < half; j++) {
        float a = v[2 * j], b = v[2 * j + 1];
        out[j] = a * c[j] - b * sn[j];
        out[j + half] = b * c[j] + a * sn[j];
    }
    for (int j = 0; j < 2 * half; j++) v[j] = out[j];
}
