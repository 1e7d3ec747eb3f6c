// Elementwise ops:
//   swiglu: out[r, j] = silu(gate) * up over the fused gate and up products [rows, 2 * inter],
//     gate in the first half of each row, up in the second (dense MLP, experts, shared expert;
//     CPU reference: model::mlp::Mlp::forward). One block per row, so no thread divides a 64-bit
//     index (split_bf16's lesson on the H200, convert.cu).
//   add: the residual additions, out = a + b, one thread per element.
//   columns: columns in_col0 .. in_col0 + cols of x [rows, in_width] copied to columns out_col0 ..
//     of out [rows, out_width]: a stacked product's output cut into its parts (the MLA's q_a,
//     latent and rope key), or parts put side by side (the MTP head's two normed inputs, which
//     eh_proj takes as one row). One block per row.

extern "C" __global__ void swiglu(const float* gate_up, float* out, long long rows, int inter) {
    long long r = blockIdx.x;
    if (r >= rows) return;
    const float* row = gate_up + r * 2 * inter;
    float* dst = out + r * inter;
    for (int j = threadIdx.x; j < inter; j += blockDim.x) {
        float g = row[j];
        dst[j] = g / (1.0f + expf(-g)) * row[inter + j];
    }
}

extern "C" __global__ void add(const float* a, const float* b, float* out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] + b[i];
}

extern "C" __global__ void columns(const float* x, float* out, int in_width, int in_col0, int out_width,
                                   int out_col0, int cols) {
    const float* src = x + (long long)blockIdx.x * in_width + in_col0;
    float* dst = out + (long long)blockIdx.x * out_width + out_col0;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) dst[j] = src[j];
}
