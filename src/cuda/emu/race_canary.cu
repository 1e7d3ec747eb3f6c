// A race planted on purpose, for the emulation's own test (tests/cuda_emu.rs): it proves the
// warps-ahead schedules find what lockstep cannot. Compiled only into the emulation library
// (build.rs), never by NVRTC.
//
// block_sum from prelude.cuh without its first barrier: a second call's lane 0 may write its
// warp's partial sum before the other warps have read the first call's. Lockstep keeps every
// warp at the same barrier, so the slot is always read in time there; a warp that runs ahead
// (on a GPU, or in the warps-ahead schedules) overwrites it.
__device__ float block_sum_missing_a_barrier(float v) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    float t = (lane < warps) ? partial[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffff, t, o);
    return t;
}

// out[i] = sum(2x) - 2 sum(x): exactly 0 (doubling is exact) unless the race struck.
extern "C" __global__ void race_canary(const float* x, float* out) {
    float v = x[threadIdx.x];
    float once = block_sum_missing_a_barrier(v);
    float twice = block_sum_missing_a_barrier(2.0f * v);
    out[threadIdx.x] = twice - 2.0f * once;
}
