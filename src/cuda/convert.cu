// Number formats on the device: block-FP8 (GLM-5-FP8: e4m3 values times a per-128x128-block
// scale_inv, edge blocks partial) decoded to f32 or straight to bf16, and bf16 decoded to f32 (CPU reference:
// checkpoint::dequantize_blocks and st::decode_f32), and f32 rounded to bf16 for the bf16
// products (round to nearest even, NaN kept NaN; CPU reference: half::bf16::from_f32).

// Rows start .. start + n of a view of a block-FP8 weight [*, cols] into out [n, cols], as f32
// (fp8_dequant) or rounded to bf16 for a bf16 product (fp8_dequant_bf16; CPU reference:
// fp8_dequant, then half::bf16::from_f32): one pass, where dequantising to f32 and then rounding
// moved 11 bytes a weight through memory (1 + 4 read and written, 4 + 2 again), this moves 3.
// One block per row, so no thread divides a 64-bit index (split_bf16's lesson on the H200,
// below). The view begins at stored row row0 and scale_inv is the whole weight's grid, so a view
// that does not start on a block boundary still finds its scales.
__device__ inline void store_value(float* p, float v) { *p = v; }
__device__ inline void store_value(bf16_t* p, float v) { *p = f32_to_bf16(v); }

template <typename T>
__device__ inline void fp8_dequant_row(const fp8_t* q, const float* scale_inv, T* out, long long start, int n,
                                       int cols, int row0, int block_rows, int block_cols) {
    long long i = blockIdx.x;
    if (i >= n) return;
    const fp8_t* codes = q + (start + i) * cols;
    int scale_cols = (cols + block_cols - 1) / block_cols;
    const float* scales = scale_inv + ((row0 + start + i) / block_rows) * scale_cols;
    T* row = out + i * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) store_value(row + c, e4m3_to_f32(codes[c]) * scales[c / block_cols]);
}

extern "C" __global__ void fp8_dequant(const fp8_t* q, const float* scale_inv, float* out, long long start, int n,
                                       int cols, int row0, int block_rows, int block_cols) {
    fp8_dequant_row(q, scale_inv, out, start, n, cols, row0, block_rows, block_cols);
}

extern "C" __global__ void fp8_dequant_bf16(const fp8_t* q, const float* scale_inv, bf16_t* out, long long start,
                                            int n, int cols, int row0, int block_rows, int block_cols) {
    fp8_dequant_row(q, scale_inv, out, start, n, cols, row0, block_rows, block_cols);
}

// out[i] = x[start + i] for i < n: a block of a weight's rows, widened for its product.
extern "C" __global__ void bf16_widen(const bf16_t* x, long long start, float* out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = bf16_to_f32(x[start + i]);
}

// out[i] = bf16(x[start + i]) for i < n: activation rows rounded for a bf16 product.
extern "C" __global__ void bf16_round(const float* x, long long start, bf16_t* out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f32_to_bf16(x[start + i]);
}

// The bf16 operands of the attention's and the indexer's products in bf16 mode (cuda::attention):
// copies of x rounded to bf16 (the attention's), or split bf16 (the indexer's): x = hi + lo with
// hi = bf16(x), lo = bf16(x - hi), so hi.hi' + hi.lo' + lo.hi' multiplies with about 16 mantissa
// bits on bf16 tensor cores (CPU reference: the f32 product). Each row of `heads` segments of
// w = a_w + b_w values, x[c] = a[a0 + r * a_rs + h * a_hs + c] for c < a_w, then
// b[b0 + r * b_rs + h * b_hs + c - a_w] (b_hs 0: one segment shared by every head, as the RoPE key),
// is written to out[h, r] as `parts` copies of w values, copy p holding lo where bit p of
// lo_parts is set and hi elsewhere: [hi | lo | hi] and [hi | hi | lo] make one product of three
// terms along k; one copy with no lo is x rounded.
extern "C" __global__ void split_bf16(const float* a, long long a0, long long a_rs, long long a_hs, int a_w,
                                      const float* b, long long b0, long long b_rs, long long b_hs, int b_w,
                                      bf16_t* out, long long rows, int heads, int parts, int lo_parts) {
    // One block per (head, row), so the row's index is divided out once: with a thread per
    // element and four 64-bit divisions each, the split took 0.72 ms a layer on an H200 for
    // about 0.25 ms of memory traffic (docs/gpu-results.md; this form is not yet timed there).
    long long hr = blockIdx.x; // h * rows + r
    if (hr >= (long long)heads * rows) return;
    int h = (int)(hr / rows);
    long long r = hr - (long long)h * rows;
    const float* ar = a + a0 + r * a_rs + h * a_hs;
    const float* br = b + b0 + r * b_rs + h * b_hs;
    int w = a_w + b_w;
    bf16_t* row = out + hr * parts * w;
    for (int c = threadIdx.x; c < w; c += blockDim.x) {
        float x = c < a_w ? ar[c] : br[c - a_w];
        bf16_t hi = f32_to_bf16(x);
        bf16_t lo = f32_to_bf16(x - bf16_to_f32(hi));
        for (int p = 0; p < parts; p++) row[p * w + c] = (lo_parts >> p) & 1 ? lo : hi;
    }
}
