// Elementwise ops, one thread per element:
//   swiglu: out[r, j] = silu(gate) * up over the fused gate and up products [rows, 2 * inter],
//     gate in the first half of each row, up in the second (dense MLP, experts, shared expert;
//     CPU reference: model::mlp::Mlp::forward);
//   add: the residual additions, out = a + b.

extern "C" __global__ void swiglu(const float* gate_up, float* out, long long rows, int inter) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * inter) return;
    const float* row = gate_up + (i / inter) * 2 * inter;
    int j = (int)(i % inter);
    float g = row[j];
    out[i] = g / (1.0f + expf(-g)) * row[inter + j];
}

extern "C" __global__ void add(const float* a, const float* b, float* out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] + b[i];
}
