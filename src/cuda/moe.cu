// MoE dispatch around the grouped expert GEMMs (cuBLAS, one per expert with tokens):
//   moe_dispatch: the (token, choice) pairs grouped by expert (with router.cu's expert_counts,
//     whose prefix sums are the groups' offsets): slot[p] is pair p's row among the packed rows,
//     rows[slot[p]] its token.
//   gather_rows: the rows of x routed to the experts, packed: out[i] = x[rows[i]] (also the
//     embeddings' lookup, from the table's rows); gather_rows_bf16, the same rounded to bf16 for
//     the expert GEMMs in bf16 mode (CPU reference: gather_rows, then half::bf16::from_f32). One
//     block per row, so no thread divides a 64-bit index (split_bf16's lesson on the H200,
//     convert.cu).
//   combine: each token's expert outputs weighted and summed in ascending expert id (the CPU
//     reference's order, model::moe::Moe::forward, so the sum is deterministic), then the shared
//     expert added: out[t] = sum_j w[t, j] * y[slot[t, j]] + shared[t].
// slot[t, j] is the row of the packed expert outputs y holding token t's j-th choice.
// The rows these kernels read through indices held in other buffers are checked against the
// source's rows (x_rows, y_rows), and moe_dispatch's places against n: the launchers cannot see
// those values, and one out of range reads or writes past a buffer. A row out of range reads as
// NaN, so it shows in the output rather than as another row's values.

extern "C" __global__ void gather_rows(const float* x, long long x_rows, const int* rows, float* out, int n, int cols) {
    long long r = blockIdx.x;
    if (r >= n) return;
    int from = rows[r];
    float* dst = out + r * cols;
    if (from < 0 || from >= x_rows) {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = NAN;
        return;
    }
    const float* src = x + (long long)from * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
}

// Packed rows row0 .. row0 + n (those a group of expert GEMMs spans) into out [n, cols].
extern "C" __global__ void gather_rows_bf16(const float* x, long long x_rows, const int* rows, long long row0,
                                            bf16_t* out, int n, int cols) {
    long long r = blockIdx.x;
    if (r >= n) return;
    int from = rows[row0 + r];
    bf16_t* dst = out + r * cols;
    if (from < 0 || from >= x_rows) {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = f32_to_bf16(NAN);
        return;
    }
    const float* src = x + (long long)from * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = f32_to_bf16(src[c]);
}

// One block per token: its first thread orders the token's choices by expert id (k <= 16) into
// shared memory, then the block sums the rows, each thread a column at a time (coalesced).
extern "C" __global__ void combine(const float* y, long long y_rows, const int* ids, const int* slot, const float* w,
                                   const float* shared, float* out, int n, int k, int cols) {
    __shared__ long long row[16];
    __shared__ float weight[16];
    long long t = blockIdx.x;
    if (t >= n || k > 16) return;
    if (threadIdx.x == 0) {
        int order[16];
        for (int j = 0; j < k; j++) order[j] = j;
        for (int a = 1; a < k; a++) // insertion sort of the token's choices by expert id
            for (int b = a; b > 0 && ids[t * k + order[b]] < ids[t * k + order[b - 1]]; b--) {
                int tmp = order[b]; order[b] = order[b - 1]; order[b - 1] = tmp;
            }
        for (int j = 0; j < k; j++) {
            // (A slot out of range weighs row 0 by NaN: the sum below stays branch-free.)
            int at = slot[t * k + order[j]];
            bool ok = at >= 0 && at < y_rows;
            row[j] = ok ? (long long)at * cols : 0;
            weight[j] = ok ? w[t * k + order[j]] : NAN;
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < k; j++) acc += weight[j] * y[row[j] + c];
        out[t * cols + c] = acc + shared[t * cols + c];
    }
}

// One block per expert scans the pairs' ids [n] in order, a chunk of blockDim at a time, and
// places the pairs that chose it at offsets[e] + their rank (a block-wide prefix sum of "chose
// me"): within an expert the pairs keep ascending pair order, as the host's stable sort did
// (model::moe and Ops::dispatch's host version). Dynamic shared memory: blockDim ints.
extern "C" __global__ void moe_dispatch(const int* ids, int n, int k, const int* offsets, int* slot, int* rows) {
    extern __shared__ int scan[];
    int e = blockIdx.x, tid = threadIdx.x, width = blockDim.x;
    int base = offsets[e];
    for (int start = 0; start < n; start += width) {
        int p = start + tid;
        int mine = p < n && ids[p] == e;
        scan[tid] = mine;
        __syncthreads();
        for (int o = 1; o < width; o <<= 1) {  // inclusive Hillis-Steele scan
            int v = tid >= o ? scan[tid - o] : 0;
            __syncthreads();
            scan[tid] += v;
            __syncthreads();
        }
        int pos = base + scan[tid] - 1;
        if (mine && pos >= 0 && pos < n) {
            slot[p] = pos;
            rows[pos] = p / k;
        }
        base += scan[width - 1];
        __syncthreads();  // every thread has read the total before the next chunk overwrites it
    }
}
