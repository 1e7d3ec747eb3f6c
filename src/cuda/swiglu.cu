// The SwiGLU gate: out = silu(gate) * up, elementwise (dense MLP, experts, shared expert).
// CPU reference: model::mlp::Mlp::forward.

extern "C" __global__ void silu_mul(const float* gate, const float* up, float* out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = gate[i];
    out[i] = g / (1.0f + expf(-g)) * up[i];
}
