// Host emulation of the CUDA execution model, as much of it as glimpse's kernels use, so their
// source runs (and is checked against the CPU references) on a machine without a GPU.
// build.rs compiles every .cu file with this header as C++ (src/cuda/emu.rs launches them).
//
// A launch runs its blocks one after another; the threads of a block are fibers (ucontext) on
// one OS thread, switched only at barriers, so a run is deterministic for a given schedule.
// The schedules differ in which thread runs when, which a GPU does not promise:
// - lockstep: every live thread in order runs to its next barrier, round after round, so all
//   threads keep pace;
// - warps ahead: one warp at a time runs as far as it can (through its own shuffles, up to a
//   block barrier) before the next starts, as a GPU's warps drift apart: a warp that overwrites
//   shared memory another warp has yet to read shows up here; in order, reversed (blocks and
//   warps), or shuffled (a seeded permutation of the blocks, and of the warps and lanes at every
//   step).
// A kernel whose result depends on the schedule has a race a GPU can hit, so the tests run every
// kernel under each. Shared memory starts each block as 0xFF bytes (NaN floats, -1 ints): a
// GPU's holds whatever was there before, never zeros (and never, reliably, what this block's
// predecessor on the host left in a static).
//
// __syncthreads is a barrier over the block's live threads (a thread that returned counts as
// arrived, as on the hardware), __shfl_xor_sync and __shfl_sync a barrier-separated exchange
// within the warp, __shared__ a static (one launch runs at a time, one block at a time; build.rs
// has the first thread of a block to reach its declaration fill it, fresh_shared), atomics
// plain adds. A round in which no fiber can move (threads waiting at different barriers) is
// reported as a deadlock: the divergent-barrier bug that is undefined behaviour on a GPU.
//
// What runs here but is undefined on a GPU fails the launch too (`violation`), where a fiber
// could otherwise pass it: threads of a block meeting at two different __syncthreads (or lanes
// of a warp at two different shuffles), a shuffle whose mask leaves out its own lane or names
// more lanes than are live, an mma with lanes missing; a block writing past its dynamic shared
// memory (a canary after it); a vector load or store off its alignment.
//
// Not emulated: interleavings finer than a round (each thread runs from one barrier to the next
// at once, so two unsynchronised read-modify-writes of one location never lose an update here),
// blocks running at the same time, NVRTC's code generation, and the device's math library (expf
// and friends come from the host's libm, within a few ulp).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

namespace glimpse_emu {

using std::isfinite;
using std::isnan;
using std::max;
using std::min;

struct dim3 {
    unsigned x, y, z;
};

// Which thread runs when (the values glimpse_emu_launch takes; see the top of this file).
enum class Order { Lockstep = 0, WarpsAhead = 1, WarpsAheadReversed = 2, Shuffled = 3 };

struct Schedule {
    Order order;
    uint64_t state;  // the shuffle's generator (splitmix64)

    uint64_t next() {
        uint64_t z = (state += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    }

    // first..first+n-1 in this schedule's order (a fresh permutation each call when shuffled).
    void arrange(std::vector<unsigned>& v, unsigned first, unsigned n) {
        v.resize(n);
        for (unsigned i = 0; i < n; i++) v[i] = first + (order == Order::WarpsAheadReversed ? n - 1 - i : i);
        if (order == Order::Shuffled)
            for (unsigned i = n; i > 1; i--) std::swap(v[i - 1], v[next() % i]);
    }

    bool warps_ahead() const { return order != Order::Lockstep; }
};

// A barrier among fibers: the last to arrive releases the others, which see the new generation
// the next time the scheduler resumes them.
struct Barrier {
    int expected = 0, arrived = 0;
    unsigned long generation = 0;
    int site = 0;  // where this generation's first arrival waits (a source line)
    void reset(int n) { expected = n; arrived = 0; }
    void wait(int at);
    // A thread that returned: it no longer holds the others back.
    void leave();
};

// The launch running now (one at a time, under launch_lock) and the fiber running in it.
struct Launch {
    dim3 grid, block, thread_idx, block_idx;
    std::vector<unsigned char> dynamic_shared;
    Barrier sync;
    std::vector<Barrier> warps;
    std::vector<uint64_t> lanes;  // the shuffle exchange: one slot per thread
    std::vector<std::array<unsigned, 6>> mma;  // the mma exchange: each thread's a and b registers
    ucontext_t scheduler;
    std::vector<ucontext_t> fibers;
    std::vector<char> done;
    unsigned current = 0;
    unsigned long progress = 0;  // arrivals, releases and exits: a round without any is a deadlock
    unsigned long long block_serial = 0;  // this block's number among every launch's (fresh_shared)
    void (*body)(void*) = nullptr;
    void* args = nullptr;
    int violation = 0;  // the first undefined behaviour seen (a status code), 0 for none
};

inline Launch* L = nullptr;

// Statuses of what is undefined on a GPU (see the top of this file).
constexpr int OVERRAN_SHARED = -5, DIVERGED = -6, MISALIGNED = -7;
// Bytes after the dynamic shared memory that a block must leave as they were.
constexpr unsigned CANARY = 256;

inline void flag(int status) {
    if (L->violation == 0) L->violation = status;
}

inline void yield_to_scheduler() { swapcontext(&L->fibers[L->current], &L->scheduler); }

inline void Barrier::wait(int at) {
    unsigned long g = generation;
    if (arrived == 0) site = at;
    else if (site != at) flag(DIVERGED);
    L->progress++;
    if (++arrived >= expected) {
        arrived = 0;
        generation++;
        return;
    }
    while (generation == g) yield_to_scheduler();
}

inline void Barrier::leave() {
    expected--;
    if (arrived > 0 && arrived >= expected) {
        arrived = 0;
        generation++;
    }
}

// Lane `src_lane`'s value of v, for every lane of the warp (__shfl_sync).
// (`mask` names the lanes taking part: this lane, and no more lanes than are live; `at` is
// the call's source line.)
template <class T>
T shfl(unsigned mask, T v, unsigned src_lane, int at) {
    unsigned t = L->thread_idx.x, warp = t >> 5;
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a wide type");
    if (!(mask >> (t & 31) & 1u) || __builtin_popcount(mask) > L->warps[warp].expected) flag(DIVERGED);
    std::memcpy(&L->lanes[t], &v, sizeof(T));
    L->warps[warp].wait(at);
    unsigned src = (warp << 5) | (src_lane & 31);
    T r = v;
    if (src < L->block.x) std::memcpy(&r, &L->lanes[src], sizeof(T));
    L->warps[warp].wait(at);  // nobody overwrites a slot before every lane has read it
    return r;
}

template <class T>
T shfl_xor(unsigned mask, T v, int lane_mask, int at) {
    return shfl(mask, v, (L->thread_idx.x & 31) ^ (unsigned)lane_mask, at);
}

inline float int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline void* dynamic_shared() { return L->dynamic_shared.data(); }

// A static __shared__ array's start in each block (build.rs puts a call after each declaration):
// the first thread of the block to pass the declaration fills it with 0xFF bytes, as a launch does
// the dynamic shared memory. No thread can have written it before: each must pass the
// declaration first. `seen` is the array's own, the serial of the block that last filled it.
inline void fresh_shared(void* p, size_t bytes, unsigned long long& seen) {
    if (seen == L->block_serial) return;
    std::memset(p, 0xFF, bytes);
    seen = L->block_serial;
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 with d as c, over the warp (prelude.cuh's
// mma_bf16_16816): every lane posts its a[4] and b[2], then reads the whole A (16 x 16) and B
// (16 x 8) back from the PTX ISA's fragment layouts (g = lane / 4, q = lane % 4; the lower
// element of a register in its low 16 bits):
//   a[0] = A[g][2q, 2q+1]   a[1] = A[g+8][2q, 2q+1]   a[2] = A[g][2q+8, 2q+9]   a[3] = A[g+8][2q+8, 2q+9]
//   b[0] = B[2q, 2q+1][g]   b[1] = B[2q+8, 2q+9][g]
//   d[0..1] = D[g][2q, 2q+1]   d[2..3] = D[g+8][2q, 2q+1]
// and adds its own four products in f32, k in order. The layouts are the kernels' assumption as
// much as this file's: only a GPU run checks them against the hardware.
inline float bf16_bits(unsigned r, int high) { return uint_as_float((high ? r >> 16 : r & 0xffffu) << 16); }

inline void mma_bf16_16816(float* d, const unsigned* a, const unsigned* b) {
    unsigned t = L->thread_idx.x, warp = t >> 5, lane = t & 31;
    if (L->warps[warp].expected != 32) flag(DIVERGED);  // every lane of the warp takes part
    L->mma[t] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    L->warps[warp].wait(-1);
    float A[16][16], B[16][8];
    for (unsigned l = 0; l < 32; l++) {
        const std::array<unsigned, 6>& r = L->mma[(warp << 5) | l];
        unsigned g = l >> 2, q = l & 3;
        for (int e = 0; e < 2; e++) {
            A[g][2 * q + e] = bf16_bits(r[0], e);
            A[g + 8][2 * q + e] = bf16_bits(r[1], e);
            A[g][2 * q + 8 + e] = bf16_bits(r[2], e);
            A[g + 8][2 * q + 8 + e] = bf16_bits(r[3], e);
            B[2 * q + e][g] = bf16_bits(r[4], e);
            B[2 * q + 8 + e][g] = bf16_bits(r[5], e);
        }
    }
    unsigned g = lane >> 2, q = lane & 3;
    for (int i = 0; i < 4; i++) {
        unsigned row = g + (i >= 2 ? 8 : 0), col = 2 * q + (i & 1);
        float acc = d[i];
        for (int k = 0; k < 16; k++) acc += A[row][k] * B[k][col];
        d[i] = acc;
    }
    L->warps[warp].wait(-1);  // nobody posts the next registers before every lane has read these
}

inline void fiber_entry() {
    L->body(L->args);
    unsigned t = L->current;
    L->sync.leave();
    L->warps[t >> 5].leave();
    L->done[t] = 1;
    L->progress++;
    swapcontext(&L->fibers[t], &L->scheduler);  // never resumed
}

constexpr size_t FIBER_STACK = 64 << 10;

// A fiber that starts at fiber_entry on `stack`. Kept out of line: getcontext returns twice as
// far as the compiler knows, which would make it distrust launch()'s locals.
__attribute__((noinline)) inline void prepare_fiber(ucontext_t* f, char* stack, ucontext_t* link) {
    getcontext(f);
    f->uc_stack.ss_sp = stack;
    f->uc_stack.ss_size = FIBER_STACK;
    f->uc_link = link;
    makecontext(f, fiber_entry, 0);
}

// 0 when every block ran; -2 a deadlock at a barrier; -3 a block size the hardware refuses.
inline int launch(dim3 grid, dim3 block, unsigned shared, Schedule schedule, void (*body)(void*), void* args) {
    static std::mutex launch_lock;
    static std::vector<std::vector<char>> stacks;
    std::lock_guard<std::mutex> hold(launch_lock);
    unsigned n = block.x;
    if (n == 0 || n > 1024 || block.y != 1 || block.z != 1) return -3;
    Launch launch_state;
    Launch* l = &launch_state;
    l->grid = grid;
    l->block = block;
    l->lanes.assign(n, 0);
    l->mma.assign(n, {});
    l->warps.resize((n + 31) / 32);
    l->fibers.resize(n);
    l->done.assign(n, 0);
    l->body = body;
    l->args = args;
    if (stacks.size() < n) stacks.resize(n);
    for (auto& s : stacks) s.resize(FIBER_STACK);
    L = l;
    int status = 0;
    // Lockstep schedules the whole block as one group, one barrier a round; otherwise each warp
    // is a group, run again and again while it moves.
    unsigned group = schedule.warps_ahead() ? 32 : n, groups = (n + group - 1) / group;
    std::vector<unsigned> blocks, order, lanes;
    schedule.arrange(blocks, 0, grid.x);
    static unsigned long long serial = 0;  // blocks run so far, every launch's (under launch_lock)
    for (unsigned i = 0; i < grid.x && status == 0; i++) {
        l->block_idx = {blocks[i], 0, 0};
        l->block_serial = ++serial;
        l->dynamic_shared.assign(shared + CANARY, 0xFF);
        std::fill(l->dynamic_shared.begin() + shared, l->dynamic_shared.end(), 0xA5);
        l->sync.reset((int)n);
        for (unsigned w = 0; w < l->warps.size(); w++) l->warps[w].reset((int)std::min(32u, n - 32 * w));
        for (unsigned t = 0; t < n; t++) {
            prepare_fiber(&l->fibers[t], stacks[t].data(), &l->scheduler);
            l->done[t] = 0;
        }
        unsigned live = n;
        while (live > 0) {
            unsigned long before = l->progress;
            schedule.arrange(order, 0, groups);
            for (unsigned g : order) {
                unsigned long moved;
                do {
                    moved = l->progress;
                    schedule.arrange(lanes, g * group, std::min(group, n - g * group));
                    for (unsigned t : lanes) {
                        if (l->done[t]) continue;
                        l->current = t;
                        l->thread_idx = {t, 0, 0};
                        swapcontext(&l->scheduler, &l->fibers[t]);
                        if (l->done[t]) live--;
                    }
                } while (schedule.warps_ahead() && l->progress != moved);
            }
            if (live > 0 && l->progress == before) {
                status = -2;
                break;
            }
        }
        if (std::any_of(l->dynamic_shared.begin() + shared, l->dynamic_shared.end(), [](unsigned char c) { return c != 0xA5; }))
            flag(OVERRAN_SHARED);
        if (status == 0 && l->violation != 0) status = l->violation;
    }
    L = nullptr;
    return status;
}

template <class... A, size_t... I>
void call(void (*k)(A...), void** p, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<A>*>(p[I])...);
}

template <class... A>
struct Kernel {
    void (*k)(A...);
    void** params;
};

template <class... A>
void body(void* c) {
    auto* kp = static_cast<Kernel<A...>*>(c);
    call(kp->k, kp->params, std::index_sequence_for<A...>{});
}

// Runs kernel k over `grid` blocks of `block` threads in `schedule`'s order; params[i] points at
// argument i, as cuLaunchKernel takes them.
template <class... A>
int run(void (*k)(A...), unsigned grid, unsigned block, unsigned shared, Schedule schedule, void** params) {
    Kernel<A...> kp{k, params};
    return launch({grid, 1, 1}, {block, 1, 1}, shared, schedule, &body<A...>, &kp);
}

}  // namespace glimpse_emu

// The CUDA names the kernels use; GLIMPSE_EMU tells prelude.cuh to take this file's mma.
#define GLIMPSE_EMU 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __align__(n) alignas(n)
#define threadIdx (::glimpse_emu::L->thread_idx)
#define blockIdx (::glimpse_emu::L->block_idx)
#define blockDim (::glimpse_emu::L->block)
#define gridDim (::glimpse_emu::L->grid)
#define __syncthreads() (::glimpse_emu::L->sync.wait(__LINE__))
#define __shfl_xor_sync(mask, v, lane) ::glimpse_emu::shfl_xor((unsigned)(mask), (v), (lane), __LINE__)
#define __shfl_sync(mask, v, lane) ::glimpse_emu::shfl((unsigned)(mask), (v), (unsigned)(lane), __LINE__)
#define __int_as_float(i) ::glimpse_emu::int_as_float(i)
#define __uint_as_float(i) ::glimpse_emu::uint_as_float(i)
#define __float_as_uint(f) ::glimpse_emu::float_as_uint(f)
#define rsqrtf(x) (1.0f / std::sqrt((float)(x)))
#define atomicAdd(p, v) __atomic_fetch_add((p), (v), __ATOMIC_RELAXED)
#define atomicOr(p, v) __atomic_fetch_or((p), (v), __ATOMIC_RELAXED)
#define __launch_bounds__(...)
