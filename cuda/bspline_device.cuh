// B-spline evaluation on the device, shared by the kernels that need bases of one input
// value: bspline.cu (bases and derivatives), kan.cu (the KAN layer's input gradient).
//
// A row is one input value x with its knot vector t (n_knots knots): find the interval s
// with t[s] <= x < t[s+1], then the k + 1 bases N_{s-k..s} that can be non-zero there
// (or their derivatives) by de Boor's triangular scheme, in registers.
#pragma once
#include "common.cuh"

namespace hk_bspline {

// What a lane found for its row.
enum RowKind : int { ROW_ZERO = 0, ROW_BASES = 1, ROW_NAN = 2 };

__device__ __forceinline__ float span_ratio(float num, float den) { return den > 0.f ? num / den : 0.f; }

// Largest s with t[s] <= x, for x in [t[0], t[n-1]); then t[s] <= x < t[s+1].
__device__ __forceinline__ int find_interval(const float* __restrict__ t, int n, float x) {
    int lo = 0, hi = n - 1;  // invariant: t[lo] <= x < t[hi]
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (__ldg(t + mid) <= x) lo = mid; else hi = mid;
    }
    return lo;
}

// Knot a of the feature, clamped into the array. Out-of-range knots only feed bases that
// do not exist (j < 0 or j >= n_bases), which are never written: a valid N_{j,d} depends
// only on knots of its own support [t_j, t_{j+d+1}].
__device__ __forceinline__ float knot(const float* __restrict__ t, int n, int a) {
    return __ldg(t + min(max(a, 0), n - 1));
}

// de Boor: n[r] = N_{s-L+r, L}(x) for r = 0..L, with t[s] <= x < t[s+1].
template <int K, int L>
__device__ __forceinline__ void de_boor(const float* __restrict__ t, int n_knots, int s, float x, float (&n)[K + 1]) {
    float left[K + 1], right[K + 1];
    n[0] = 1.f;
#pragma unroll
    for (int j = 1; j <= L; ++j) {
        left[j] = x - knot(t, n_knots, s + 1 - j);
        right[j] = knot(t, n_knots, s + j) - x;
        float saved = 0.f;
#pragma unroll
        for (int r = 0; r < j; ++r) {
            // right[r+1] + left[j-r] is the width of the support of N_{s-j+1+r, j-1}.
            const float temp = span_ratio(n[r], right[r + 1] + left[j - r]);
            n[r] = saved + right[r + 1] * temp;
            saved = left[j - r] * temp;
        }
        n[j] = saved;
    }
}

// The k + 1 values for bases s-K..s of one row: the bases themselves, or their derivatives
// d/dx N_{j,K} = K (N_{j,K-1} / (t_{j+K} - t_j) - N_{j+1,K-1} / (t_{j+K+1} - t_{j+1})).
template <int K, bool Derivative>
__device__ __forceinline__ void row_values(const float* __restrict__ t, int n_knots, int s, float x, float (&v)[K + 1]) {
    if constexpr (!Derivative) {
        de_boor<K, K>(t, n_knots, s, x, v);
    } else if constexpr (K == 0) {
        v[0] = 0.f;
    } else {
        float lower[K + 1];  // lower[r] = N_{s-K+1+r, K-1}, r = 0..K-1
        de_boor<K, K - 1>(t, n_knots, s, x, lower);
        float prev = 0.f;  // N_{j,K-1} / (t_{j+K} - t_j) for j = s-K: outside the window, 0
#pragma unroll
        for (int r = 0; r <= K; ++r) {
            // Output r is basis j = s-K+r; it needs A_j (prev) and A_{j+1}.
            const int j1 = s - K + r + 1;
            const float a1 = r < K ? span_ratio(lower[r], knot(t, n_knots, j1 + K) - knot(t, n_knots, j1)) : 0.f;
            v[r] = float(K) * (prev - a1);
            prev = a1;
        }
    }
}

// What one lane knows about its row after the row phase.
template <int K>
struct RowResult {
    int kind;   // RowKind
    int first;  // basis index of v[0]: s - K
    float v[K + 1];
};

template <int K>
__device__ __forceinline__ RowResult<K> zero_row() {
    RowResult<K> res;
    res.kind = ROW_ZERO;
    res.first = 0;
#pragma unroll
    for (int r = 0; r <= K; ++r) res.v[r] = 0.f;
    return res;
}

template <int K, bool Derivative>
__device__ __forceinline__ RowResult<K> evaluate_row(float xv, const float* __restrict__ t, int n_knots) {
    RowResult<K> res = zero_row<K>();
    if (xv != xv) {
        res.kind = ROW_NAN;
    } else if (xv >= __ldg(t) && xv < __ldg(t + n_knots - 1)) {
        const int s = find_interval(t, n_knots, xv);
        row_values<K, Derivative>(t, n_knots, s, xv, res.v);
        res.kind = ROW_BASES;
        res.first = s - K;
    }
    return res;
}


}  // namespace hk_bspline
