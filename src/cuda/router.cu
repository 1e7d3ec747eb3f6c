// The MoE router, fused: sigmoid of the gate logits, + e_score_correction_bias for selection
// only, group-limited (n_group > 1: keep the topk_group groups whose top-2 biased scores sum
// highest) or flat top-k, weights from the unbiased sigmoid, normalised (norm_topk) and scaled by
// routed_scaling_factor, and the margin (k-th minus (k+1)-th biased score; grouped, the smaller of
// that and the topk_group-th minus the next group's score where the groups' choice matters, as
// model::moe::route). One warp per token:
// lane l holds experts l, l + 32, ... in registers (E <= 256), group g's score sits in lane g
// (n_group <= 32), and each choice is a warp-wide argmax by shuffles (k + 1 <= 16); the launcher
// refuses more. Ties go to the lower index, as the CPU reference (model::moe::route) orders them.
// A NaN score ranks above every number whatever its sign and wherever it sits, as torch.topk and
// the CPU reference rank it (a NaN router logit means the run is already broken; this keeps both
// sides alike and the indices in range).
// logits [n, e], bias [e] -> ids [n, k], weights [n, k], margin [n].

#define MAX_PER_LANE 8 // 256 experts / 32 lanes
#define MAX_K 16

// Whether (a, ia) ranks before (b, ib); index -1 is no candidate and ranks after everything.
__device__ bool better(float a, int ia, float b, int ib) {
    if (ia < 0 || ib < 0) return ib < 0 && ia >= 0;
    bool na = isnan(a), nb = isnan(b);
    if (na != nb) return na;
    return na || a == b ? ia < ib : a > b;
}

// The warp's best (value, index) of every lane's candidate; every lane gets it.
__device__ void warp_best(float& v, int& i) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffff, v, o);
        int oi = __shfl_xor_sync(0xffffffff, i, o);
        if (better(ov, oi, v, i)) { v = ov; i = oi; }
    }
}

extern "C" __global__ void route(const float* logits, const float* bias, int n, int e, int k, int n_group,
                                 int topk_group, int norm_topk, float scaling, int* ids, float* weights,
                                 float* margin) {
    long long t = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; // the warp's token
    int lane = threadIdx.x & 31;
    if (t >= n || e > 32 * MAX_PER_LANE || k + 1 > MAX_K || n_group > 32) return; // whole warps
    const float* l = logits + t * e;
    float choice[MAX_PER_LANE];
    for (int r = 0; r < MAX_PER_LANE; r++) {
        int j = lane + 32 * r;
        choice[r] = j < e ? 1.0f / (1.0f + expf(-l[j])) + bias[j] : 0.0f;
    }

    // Where grouped routing cut its groups (as model::moe::GroupCut): the last kept group's lead
    // over the next, the two groups, and the next one's best expert.
    float group_margin = INFINITY, best_next = -INFINITY;
    int last_group = -1, next_group = -1, per = 1;
    if (n_group > 1) {
        per = e / n_group;
        float mine = 0.0f; // group `lane`'s score (lanes >= n_group: unused)
        for (int g = 0; g < n_group; g++) {
            // The group's top 2: this lane's best two of the group's experts, then the warp's.
            float a = 0.0f, b = 0.0f;
            int ia = -1, ib = -1;
            for (int r = 0; r < MAX_PER_LANE; r++) {
                int j = lane + 32 * r;
                if (j < g * per || j >= (g + 1) * per) continue;
                if (better(choice[r], j, a, ia)) { b = a; ib = ia; a = choice[r]; ia = j; }
                else if (better(choice[r], j, b, ib)) { b = choice[r]; ib = j; }
            }
            float first = a;
            int i_first = ia;
            warp_best(first, i_first);
            // The second: the best left once the first is taken (this lane's b if it held the first).
            float second = ia == i_first ? b : a;
            int i_second = ia == i_first ? ib : ia;
            warp_best(second, i_second);
            float score = (i_first >= 0 ? first : 0.0f) + (i_second >= 0 ? second : 0.0f);
            if (lane == g) mine = score;
        }
        // Keep the topk_group best groups (lane g holds group g's score), then the next one's
        // score gives the groups' margin.
        bool kept = false;
        float last = 0.0f;
        for (int r = 0; r <= topk_group && r < n_group; r++) {
            float v = mine;
            int g = lane < n_group && !kept ? lane : -1;
            warp_best(v, g);
            if (r == topk_group) {
                if (isfinite(v)) group_margin = last - v;
                next_group = g;
            } else {
                if (lane == g) kept = true;
                last = v;
                last_group = g;
            }
        }
        if (next_group >= 0) {
            for (int r = 0; r < MAX_PER_LANE; r++) {
                int j = lane + 32 * r;
                if (j < e && j / per == next_group) best_next = fmaxf(best_next, choice[r]);
            }
            for (int o = 16; o > 0; o >>= 1) best_next = fmaxf(best_next, __shfl_xor_sync(0xffffffff, best_next, o));
        }
        for (int r = 0; r < MAX_PER_LANE; r++) {
            int j = lane + 32 * r;
            int owner = j < e ? j / per : 0;
            bool owner_kept = __shfl_sync(0xffffffff, (int)kept, owner) != 0; // lane `owner` holds it
            if (j < e && !owner_kept) choice[r] = -INFINITY;
        }
    }

    // top-(k+1) by repeated warp argmax; the (k+1)-th only decides the margin.
    int order[MAX_K];
    float value[MAX_K];
    unsigned taken = 0; // this lane's experts already chosen, bit r for expert lane + 32 r
    int found = 0;
    for (int r = 0; r < k + 1 && r < e; r++) {
        float v = 0.0f;
        int i = -1;
        for (int q = 0; q < MAX_PER_LANE; q++) {
            int j = lane + 32 * q;
            if (j < e && !(taken >> q & 1) && better(choice[q], j, v, i)) { v = choice[q]; i = j; }
        }
        warp_best(v, i);
        if ((i & 31) == lane) taken |= 1u << (i >> 5);
        order[found] = i;
        value[found++] = v;
    }
    if (lane == 0) {
        float experts = found > k && isfinite(value[k]) ? value[k - 1] - value[k] : INFINITY;
        // The groups' gap counts where swapping the last kept group for the next could change the
        // experts: the last kept one holds a chosen expert, or the next one's best reaches the k-th.
        bool matters = next_group >= 0 && best_next >= value[k - 1];
        for (int i = 0; i < k && next_group >= 0; i++) matters = matters || order[i] / per == last_group;
        margin[t] = !matters ? experts : isnan(experts) || isnan(group_margin) ? NAN : fminf(experts, group_margin);
    }

    float w = lane < k ? 1.0f / (1.0f + expf(-l[order[lane < k ? lane : 0]])) : 0.0f;
    float sum = w;
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
    if (lane < k) {
        float v = norm_topk ? w / (sum + 1e-20f) : w;
        ids[t * k + lane] = order[lane];
        weights[t * k + lane] = v * scaling;
    }
}

// How many (token, choice) pairs chose each expert, the MoE dispatch's group sizes (moe.cu):
// ids [n*k] -> counts [e] (added to).
extern "C" __global__ void expert_counts(const int* ids, long long n, int e, int* counts) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n && ids[i] >= 0 && ids[i] < e) atomicAdd(&counts[ids[i]], 1);
}

// Whether each token's chosen experts differ, as a set, from those chosen without the correction
// bias (`route` again with a zero bias): the audit's moe.bias_changed, reduced on the device so
// only a flag per token is copied back. ids, plain [n, k] -> changed
// [n]. One thread per token. CPU reference: model::moe::bias_changed.
extern "C" __global__ void bias_changed(const int* ids, const int* plain, int n, int k, int* changed) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    const int* a = ids + (long long)t * k;
    const int* b = plain + (long long)t * k;
    // As multisets, as the CPU compares sorted rows: a replayed route may repeat an id.
    int differ = 0;
    for (int r = 0; r < k; r++) {
        int in_a = 0, in_b = 0;
        for (int q = 0; q < k; q++) {
            in_a += a[q] == a[r];
            in_b += b[q] == a[r];
        }
        differ |= in_a != in_b;
    }
    changed[t] = differ;
}
