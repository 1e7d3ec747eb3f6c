// RMSNorm and LayerNorm over the last dimension, one block per row, f32 in and out:
//   rms_norm:   y = w * x / sqrt(mean(x^2) + eps)
//   layer_norm: y = (x - mean) / sqrt(var + eps) * w + b   (biased variance, the indexer's k_norm)
// CPU reference: model::nn::{RmsNorm, LayerNorm}.

extern "C" __global__ void rms_norm(const float* x, const float* w, float* y, int cols, float eps) {
    const float* xr = x + (long long)blockIdx.x * cols;
    float* yr = y + (long long)blockIdx.x * cols;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) ss += xr[i] * xr[i];
    float inv = rsqrtf(block_sum(ss) / (float)cols + eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) yr[i] = xr[i] * inv * w[i];
}

extern "C" __global__ void layer_norm(const float* x, const float* w, const float* b, float* y, int cols, float eps) {
    const float* xr = x + (long long)blockIdx.x * cols;
    float* yr = y + (long long)blockIdx.x * cols;
    float s = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) s += xr[i];
    float mean = block_sum(s) / (float)cols;
    float v = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) v += (xr[i] - mean) * (xr[i] - mean);
    float inv = rsqrtf(block_sum(v) / (float)cols + eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) yr[i] = (xr[i] - mean) * inv * w[i] + b[i];
}

// L2 norm of each row (the hook reductions kv_norm_pre / kv_norm / k_rope_norm): [rows, cols] -> [rows].
extern "C" __global__ void row_l2_norm(const float* x, float* out, int cols) {
    const float* xr = x + (long long)blockIdx.x * cols;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) ss += xr[i] * xr[i];
    float t = block_sum(ss);
    if (threadIdx.x == 0) out[blockIdx.x] = sqrtf(t);
}
