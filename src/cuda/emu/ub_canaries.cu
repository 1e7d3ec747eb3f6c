// Undefined behaviour planted on purpose, for the emulation's own test (tests/cuda_emu.rs): each
// kernel runs to the end on the host's fibers, and must fail its launch all the same, as it may
// on a GPU. Compiled only into the emulation library (build.rs), never by NVRTC.

// Thread 0 writes the float just past the block's dynamic shared memory (`n` floats of it).
extern "C" __global__ void ub_overrun_shared(int n) {
    extern __shared__ float shared_end[];
    if (threadIdx.x == 0) shared_end[n] = 1.0f;
}

// The block's two warps wait at two different __syncthreads.
extern "C" __global__ void ub_divergent_barriers(float* out) {
    if (threadIdx.x < 32) {
        __syncthreads();
        out[threadIdx.x] = 1.0f;
    } else {
        __syncthreads();
        out[threadIdx.x] = 2.0f;
    }
}

// Half the warp has returned; the other half shuffles with the whole warp's mask.
extern "C" __global__ void ub_full_mask_over_half_a_warp(float* out) {
    if (threadIdx.x < 16) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffff, (float)threadIdx.x, 1);
}

// A 16-byte load from 2 bytes past an aligned address.
extern "C" __global__ void ub_misaligned_load(const bf16_t* p, float* out) {
    bf16x8 v = ld_bf16x8(p + 1);
    out[threadIdx.x] = (float)(v.w[0] & 1u);
}

// Each block's thread 0 reads a static shared value before the block writes it, then writes it:
// on a GPU the read is undefined. The emulation's statics outlive a block, so unless each block's
// shared memory starts afresh, block 1 would read the 1.0 block 0 left, a value a GPU may not
// give. Not a failed launch (nothing here is flagged): the test reads what each block saw.
extern "C" __global__ void ub_shared_read_before_written(float* out) {
    __shared__ float left[1];
    if (threadIdx.x == 0) {
        out[blockIdx.x] = left[0];
        left[0] = 1.0f;
    }
}
