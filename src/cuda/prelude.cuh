// Shared by every kernel file: prepended to each .cu source before NVRTC compiles it (NVRTC has
// no toolkit headers to include, so bf16 and e4m3 are decoded by hand here).
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#ifndef NAN
#define NAN __int_as_float(0x7fffffff)
#endif

typedef unsigned short bf16_t;
typedef unsigned char fp8_t;

__device__ __forceinline__ float bf16_to_f32(bf16_t b) { return __uint_as_float(((unsigned int)b) << 16); }

// f32 to bf16, round to nearest even, NaN kept NaN (CPU reference: half::bf16::from_f32).
__device__ __forceinline__ bf16_t f32_to_bf16(float x) {
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

// Two bf16 values as one 32-bit register, the first in the low half (the layout of a pair of
// neighbouring elements in an mma fragment).
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    return (unsigned)f32_to_bf16(lo) | ((unsigned)f32_to_bf16(hi) << 16);
}

// Two neighbouring bf16 values (4-byte aligned) as one register.
__device__ __forceinline__ unsigned ld_bf16x2(const bf16_t* p) {
#ifdef GLIMPSE_EMU
    if ((uintptr_t)p & 3) flag(MISALIGNED); // (a GPU faults: misaligned address)
    unsigned r;
    memcpy(&r, p, 4); // no type punning in host C++
    return r;
#else
    return *(const unsigned*)p;
#endif
}

// Eight bf16 values (16 bytes, 16-byte aligned) as one load or store.
struct __align__(16) bf16x8 {
    unsigned w[4];
};

__device__ __forceinline__ bf16x8 ld_bf16x8(const bf16_t* p) {
#ifdef GLIMPSE_EMU
    if ((uintptr_t)p & 15) flag(MISALIGNED);
    bf16x8 r;
    memcpy(&r, p, 16);
    return r;
#else
    return *(const bf16x8*)p;
#endif
}

__device__ __forceinline__ void st_bf16x8(bf16_t* p, bf16x8 v) {
#ifdef GLIMPSE_EMU
    if ((uintptr_t)p & 15) flag(MISALIGNED);
    memcpy(p, &v, 16);
#else
    *(bf16x8*)p = v;
#endif
}

// D += A B for one warp on bf16 tensor cores with f32 accumulation (mma.sync m16n8k16): A 16 x 16
// row-major in a[4], B 16 x 8 column-major in b[2], D 16 x 8 in d[4], each thread holding the
// elements the PTX ISA's fragment layouts give it (spelled out in emu.h, which emulates it).
// sm_80 and later: the launchers refuse older devices.
#ifndef GLIMPSE_EMU
__device__ __forceinline__ void mma_bf16_16816(float* d, const unsigned* a, const unsigned* b) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();
#endif
}
#endif

// OCP E4M3 (the "fn" variant GLM-5-FP8 stores): 1 sign, 4 exponent (bias 7), 3 mantissa bits;
// no infinities, S.1111.111 is NaN.
__device__ __forceinline__ float e4m3_to_f32(fp8_t v) {
    float sign = (v & 0x80) ? -1.0f : 1.0f;
    int e = (v >> 3) & 0xF, m = v & 0x7;
    if (e == 0xF && m == 0x7) return __int_as_float(0x7fc00000);
    if (e == 0) return sign * ldexpf((float)m / 8.0f, -6);
    return sign * ldexpf(1.0f + (float)m / 8.0f, e - 7);
}

// Sum over a block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    float t = (lane < warps) ? partial[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffff, t, o);
    return t;
}

// Maximum over a block, same contract as block_sum.
__device__ float block_max(float v) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    float t = (lane < warps) ? partial[lane] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffff, t, o));
    return t;
}
