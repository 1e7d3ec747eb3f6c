// The MoE router, fused: sigmoid of the gate logits, + e_score_correction_bias for selection
// only, group-limited (n_group > 1: keep the topk_group groups whose top-2 biased scores sum
// highest) or flat top-k, weights from the unbiased sigmoid, normalised (norm_topk) and scaled by
// routed_scaling_factor, and the margin (k-th minus (k+1)-th biased score). One thread per token:
// k <= E <= 256 and k <= 15 (the launcher refuses more). Ties go to the lower index, as the CPU
// reference (model::moe::route) orders them. A NaN score ranks above every number whatever its
// sign and wherever it sits, as torch.topk and the CPU reference rank it (a NaN router logit
// means the run is already broken; this keeps both sides alike and the indices in range).
// logits [n, e], bias [e] -> ids [n, k], weights [n, k], margin [n].

#define MAX_EXPERTS 256
#define MAX_K 16

__device__ bool better(float a, int ia, float b, int ib) {
    bool na = isnan(a), nb = isnan(b);
    if (na != nb) return na;
    return na || a == b ? ia < ib : a > b;
}

extern "C" __global__ void route(const float* logits, const float* bias, int n, int e, int k, int n_group,
                                 int topk_group, int norm_topk, float scaling, int* ids, float* weights,
                                 float* margin) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n || e > MAX_EXPERTS || k + 1 > MAX_K) return;
    const float* l = logits + (long long)t * e;
    float choice[MAX_EXPERTS];
    for (int j = 0; j < e; j++) choice[j] = 1.0f / (1.0f + expf(-l[j])) + bias[j];

    if (n_group > 1) {
        int per = e / n_group;
        float group[MAX_EXPERTS];
        for (int g = 0; g < n_group; g++) {
            // top-2 (or top-1) of the group
            int a = -1, b = -1;
            for (int j = g * per; j < (g + 1) * per; j++) {
                if (a < 0 || better(choice[j], j, choice[a], a)) { b = a; a = j; }
                else if (b < 0 || better(choice[j], j, choice[b], b)) { b = j; }
            }
            group[g] = choice[a] + (b >= 0 ? choice[b] : 0.0f);
        }
        unsigned int kept[MAX_EXPERTS / 32] = {0};
        for (int r = 0; r < topk_group; r++) {
            int best = -1;
            for (int g = 0; g < n_group; g++)
                if (!(kept[g >> 5] >> (g & 31) & 1) && (best < 0 || better(group[g], g, group[best], best))) best = g;
            if (best >= 0) kept[best >> 5] |= 1u << (best & 31);
        }
        for (int g = 0; g < n_group; g++)
            if (!(kept[g >> 5] >> (g & 31) & 1))
                for (int j = g * per; j < (g + 1) * per; j++) choice[j] = -INFINITY;
    }

    // top-(k+1) by repeated selection; the (k+1)-th only decides the margin.
    int order[MAX_K];
    unsigned int taken[MAX_EXPERTS / 32] = {0};
    int found = 0;
    for (int r = 0; r < k + 1 && r < e; r++) {
        int best = -1;
        for (int j = 0; j < e; j++)
            if (!(taken[j >> 5] >> (j & 31) & 1) && (best < 0 || better(choice[j], j, choice[best], best))) best = j;
        taken[best >> 5] |= 1u << (best & 31);
        order[found++] = best;
    }
    float m = INFINITY;
    if (found > k && isfinite(choice[order[k]])) m = choice[order[k - 1]] - choice[order[k]];
    margin[t] = m;

    float w[MAX_K], sum = 0.0f;
    for (int r = 0; r < k; r++) {
        w[r] = 1.0f / (1.0f + expf(-l[order[r]]));
        sum += w[r];
    }
    for (int r = 0; r < k; r++) {
        float v = norm_topk ? w[r] / (sum + 1e-20f) : w[r];
        ids[(long long)t * k + r] = order[r];
        weights[(long long)t * k + r] = v * scaling;
    }
}

// How many tokens chose each expert (expert load reduced on the device, for the audit; checked
// by selftest, not yet called by the forward pass): ids [n*k] -> counts [e].
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
