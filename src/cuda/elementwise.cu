// Elementwise ops, one thread per element:
//   silu_mul: the SwiGLU gate, out = silu(gate) * up (dense MLP, experts, shared expert;
//     CPU reference: model::mlp::Mlp::forward);
//   add: the residual additions, out = a + b.

extern "C" __global__ void silu_mul(const float* gate, const float* up, float* out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = gate[i];
    out[i] = g / (1.0f + expf(-g)) * up[i];
}

extern "C" __global__ void add(const float* a, const float* b, float* out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] + b[i];
}
