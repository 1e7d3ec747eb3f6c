// Elementwise ops:
//   swiglu: out[r, j] = silu(gate) * up over the fused gate and up products [rows, 2 * inter],
//     gate in the first half of each row, up in the second (dense MLP, experts, shared expert;
//     CPU reference: model::mlp::Mlp::forward). One block per row, so no thread divides a 64-bit
//     index (split_bf16's lesson on the H200, convert.cu).
//   add: the residual additions, out = a + b, one thread per element.

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
