// Number formats on the device: block-FP8 (GLM-5-FP8: e4m3 values times a per-128x128-block
// scale_inv, edge blocks partial) and bf16 decoded to f32 (CPU reference:
// checkpoint::dequantize_blocks and st::decode_f32), and f32 rounded to bf16 for the bf16
// products (round to nearest even, NaN kept NaN; CPU reference: half::bf16::from_f32).

// Rows start .. start + n of a view of a block-FP8 weight [*, cols] into out [n, cols]. The view
// begins at stored row row0 and scale_inv is the whole weight's grid, so a view that does not
// start on a block boundary still finds its scales.
extern "C" __global__ void fp8_dequant(const fp8_t* q, const float* scale_inv, float* out, long long start, int n,
                                       int cols, int row0, int block_rows, int block_cols) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n * cols) return;
    long long r = start + i / cols;
    int c = (int)(i % cols);
    int scale_cols = (cols + block_cols - 1) / block_cols;
    out[i] = e4m3_to_f32(q[r * cols + c]) * scale_inv[((row0 + r) / block_rows) * scale_cols + c / block_cols];
}

// out[i] = x[start + i] for i < n: a block of a weight's rows, widened for its product.
extern "C" __global__ void bf16_widen(const bf16_t* x, long long start, float* out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = bf16_to_f32(x[start + i]);
}

// out[i] = bf16(x[start + i]) for i < n: activation rows rounded for a bf16 product.
extern "C" __global__ void bf16_round(const float* x, long long start, bf16_t* out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned int u = __float_as_uint(x[start + i]);
    if ((u & 0x7fffffffu) > 0x7f800000u) { out[i] = (bf16_t)((u >> 16) | 0x40u); return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    out[i] = (bf16_t)(u >> 16);
}
