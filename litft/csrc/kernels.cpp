// litft's compiled CPU kernels, fp32: causal (grouped-query) attention forward/backward (optionally within packed
// segments), RMSNorm and SwiGLU forward/backward and the cross-entropy's softmax gradient (these three in bf16 too),
// the small-batch linear of decoding, and the dequantization of QLoRA's 4-bit weights; bf16: causal attention
// backward on AMX tiles (at the end of the file).
// litft/native.py builds this file once per machine (g++ -O3 -march=native -fopenmp) and calls it through ctypes;
// litft/models/gpt.py uses it where it applies and torch everywhere else.
//
// Attention. torch's CPU flash-attention kernel (F.scaled_dot_product_attention) runs its block products
// through BLAS calls sized for general use; for 64..256-wide heads those are small and it reaches a fraction of
// the matmul roofline. Here the block products are one register-tiled loop nest (6 or 4 rows x up to 64 columns
// in vector registers), the softmax uses exp2 (one polynomial, no libm call), key blocks above the diagonal are
// skipped, and grouped kv heads are read in place (no repeat).
// Math (flash attention 2, Dao 2023): per query block, running max m and sum l over key blocks,
//   S = c q k^T with c = scale * log2(e);  P = 2^(S - m);  O = sum P v / l;  lse2 = m + log2(l)
// and in backward, with D_i = dO_i . O_i:  P = 2^(S - lse2);  dV += P^T dO;  dS = P (dO v^T - D);
//   dQ = scale dS k;  dK = scale dS^T q.
// Layouts (element strides; the last dimension is contiguous):
//   q (B, H, T, Dh) strided by qs0/qs1/qs2; kt, vt (B, KV, Dh, Tp) and kp, vp (B, KV, Tp, Dh) packed and
//   zero-padded to Tp (a multiple of 64) by the caller; o, dout, dq (B, T, H, Dh) contiguous; lse2 (B, H, T);
//   dk, dv (G, B, T, KV, Dh) partial sums per query head of the group, summed by the caller.
// Packed samples: seg_start (B, T) int32, or null: query t attends to keys seg_start[t]..t only (its own sample,
// causal), seg_start non-decreasing along t (contiguous segments; the caller checks). Key blocks wholly before
// a query block's first segment start are skipped, so packing costs the attention of its samples, not of the row.
//
// Small-batch linear (decoding): y = x W^T + b for a few rows of x. Decoding one token reads every weight once per
// token, so its speed is the speed of streaming the weights from memory. torch's fp32 path (MKL's sgemv over the
// (out, in) row-major weight) reached ~11 GB/s on the development machine against ~33 GB/s the memory delivers; the
// loop below keeps 16 weight rows in flight at once (16 independent streams, one accumulator vector each) and reached
// 22 GB/s on one thread and ~34 on two. Each output is one row's dot product summed in a fixed order, so results do
// not depend on the thread count.
//
// RMSNorm and SwiGLU: torch runs each as 3-5 separate passes over the activation (pow, mean, mul, mul; silu,
// mul, ...); here each direction is one pass, which matters on a memory-bound CPU step.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// One vector register of floats: 16 with AVX-512 (32 registers: tiles of 6 rows x 4 vectors = 64 columns),
// else 8 (AVX2's 16 registers: tiles of 6 rows x 2 vectors = 16 columns). -march=native picks.
#if defined(__AVX512F__)
constexpr int VW = 16, NVMAX = 4;
#else
constexpr int VW = 8, NVMAX = 2;
#endif
typedef float vf __attribute__((vector_size(4 * VW), aligned(4)));
typedef int32_t vi __attribute__((vector_size(4 * VW), aligned(4)));
static const int BQ = 64, BK = 64, MAXD = 256;

static inline vf splat(float x) {  // written out: one broadcast instruction (a loop or `vf{} + x` is not)
#if defined(__AVX512F__)
    return vf{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
#else
    return vf{x, x, x, x, x, x, x, x};
#endif
}

// 2^x for x <= 0, relative error ~2e-7; exactly 0 below 2^-126 (no denormals, and 2^-inf = 0 for masked keys)
static inline vf exp2v(vf x) {
    vi under = x < splat(-126.f);
    x = x < splat(-126.f) ? splat(-126.f) : x;
    vi ti = __builtin_convertvector(x, vi);                  // truncation toward zero ...
    ti += (vi)(__builtin_convertvector(ti, vf) > x);          // ... minus 1 where that rounded up: floor
    vf f = x - __builtin_convertvector(ti, vf);                // in [0, 1)
    vf p = splat(1.8775767e-3f);                                // minimax polynomial of 2^f on [0, 1)
    p = p * f + splat(8.9893397e-3f);
    p = p * f + splat(5.5826318e-2f);
    p = p * f + splat(2.4015361e-1f);
    p = p * f + splat(6.9315308e-1f);
    p = p * f + splat(9.9999994e-1f);
    vf scale = (vf)((ti + 127) << 23);                         // 2^floor(x) as float bits
    return (vf)((vi)(p * scale) & ~under);
}

// C[r][0:VW NV] (+)= sum_k A[r sai + k sak] B[k ldb + 0:VW NV] for R rows r: the register tile
// (R x NV accumulators + NV values of B in vector registers: 6 x 4 + 4 of the 32 with AVX-512).
template <int R, int NV>
static inline void tile(int K, const float* A, long sai, long sak, const float* B, long ldb, float* C, long ldc,
                        bool acc) {
    vf c[R][NV];
    for (int r = 0; r < R; r++)
        for (int x = 0; x < NV; x++) c[r][x] = acc ? *(const vf*)(C + r * ldc + VW * x) : splat(0.f);
    for (int k = 0; k < K; k++) {
        vf b[NV];
        for (int x = 0; x < NV; x++) {
            b[x] = *(const vf*)(B + k * ldb + VW * x);
#if defined(__x86_64__)
            asm("" : "+v"(b[x]));  // keep b in a register: one load per k, not one per row
#endif
        }
        for (int r = 0; r < R; r++) {
            vf a = splat(A[r * sai + k * sak]);
            for (int x = 0; x < NV; x++) c[r][x] += a * b[x];
        }
    }
    for (int r = 0; r < R; r++)
        for (int x = 0; x < NV; x++) *(vf*)(C + r * ldc + VW * x) = c[r][x];
}

template <int R>
static inline void tile_n(int nv, int K, const float* A, long sai, long sak, const float* B, long ldb, float* C,
                          long ldc, bool acc) {
    if constexpr (NVMAX == 4) {
        if (nv == 4) return tile<R, 4>(K, A, sai, sak, B, ldb, C, ldc, acc);
        if (nv == 3) return tile<R, 3>(K, A, sai, sak, B, ldb, C, ldc, acc);
    }
    if (nv == 2) tile<R, 2>(K, A, sai, sak, B, ldb, C, ldc, acc);
    else tile<R, 1>(K, A, sai, sak, B, ldb, C, ldc, acc);
}

// C (M x N) (+)= A (M x K; row stride sai, column stride sak) @ B (K x N; row stride ldb). M % 4 == 0, N % 16 == 0.
static void gemm(int M, int N, int K, const float* A, long sai, long sak, const float* B, long ldb, float* C,
                 long ldc, bool acc) {
    int m6 = M / 6;
    while ((M - 6 * m6) % 4) m6--;  // 6-row tiles, then 4-row tiles for the rest
    for (int n = 0; n < N; n += NVMAX * VW) {
        const int nv = N - n >= NVMAX * VW ? NVMAX : (N - n) / VW;
        int m = 0;
        for (; m < 6 * m6; m += 6) tile_n<6>(nv, K, A + m * sai, sai, sak, B + n, ldb, C + m * ldc + n, ldc, acc);
        for (; m < M; m += 4) tile_n<4>(nv, K, A + m * sai, sai, sak, B + n, ldb, C + m * ldc + n, ldc, acc);
    }
}

static inline float hsum(vf x) {  // (order fixed: results do not depend on threads)
    float s = 0.f;
    for (int i = 0; i < VW; i++) s += x[i];
    return s;
}

static inline float hmax(vf x) {
    float s = x[0];
    for (int i = 1; i < VW; i++) s = x[i] > s ? x[i] : s;
    return s;
}

// Copy rows [i0, i0 + n) of one head (row stride rs) into a (n4 x Dh) block times `mul`, zero rows past n.
static void load_rows(float* dst, const float* src, long rs, int n, int n4, int Dh, float mul) {
    for (int i = 0; i < n4; i++)
        for (int d = 0; d < Dh; d++) dst[i * Dh + d] = i < n ? src[i * rs + d] * mul : 0.f;
}

// Keys past the causal limit (and padded keys) of a score block become -inf; with seg_start (this batch row's),
// so do keys before the query's segment start.
static void mask_block(float* S, int nq4, int nq, int nk16, int nk, int i0, int j0, const int* seg_start) {
    for (int i = 0; i < nq4; i++) {
        int lim = i >= nq ? 0 : i0 + i - j0 + 1;
        lim = lim < 0 ? 0 : (lim > nk ? nk : lim);
        for (int j = lim; j < nk16; j++) S[i * BK + j] = -INFINITY;
        if (seg_start && i < nq) {
            int lo = seg_start[i0 + i] - j0;
            lo = lo < 0 ? 0 : (lo > lim ? lim : lo);
            for (int j = 0; j < lo; j++) S[i * BK + j] = -INFINITY;
        }
    }
}

// The first key block a query block starting at i0 needs (all of them without segments).
static inline int first_key_block(const int* seg_start, int i0) { return seg_start ? seg_start[i0] / BK * BK : 0; }

// One (batch b, query head h) task's dK (times dk_mul) and dV, accumulated over the head's keys as (Tp x Dh), into
// the caller's (G, B, T, KV, Dh) partial sums at the head's place g in its kv group kh (one slot per task: no races).
static void store_kv_partials(float* dk, float* dv, const float* dKa, const float* dVa, float dk_mul, int g, int b,
                              int kh, int B, int T, int KV, int Dh) {
    const long KD = (long)KV * Dh;
    float* dkp = dk + ((long)g * B + b) * T * KD + (long)kh * Dh;
    float* dvp = dv + ((long)g * B + b) * T * KD + (long)kh * Dh;
    for (int j = 0; j < T; j++)
        for (int d = 0; d < Dh; d++) {
            dkp[j * KD + d] = dKa[(long)j * Dh + d] * dk_mul;
            dvp[j * KD + d] = dVa[(long)j * Dh + d];
        }
}

// ------------------------------------------------------------------------------------------ attention
extern "C" int litft_attention_forward(int nthreads, int B, int H, int KV, int T, int Tp, int Dh, float scale,
                                       const float* q, long qs0, long qs1, long qs2, const float* kt,
                                       const float* vp, const int* seg_start, float* o, float* lse2) {
    if (Dh % 16 || Dh > MAXD || H % KV || Tp % BK || Tp < T) return 1;
    const int G = H / KV, nqb = (T + BQ - 1) / BQ;
    const float c = scale * 1.4426950408889634f;
    int no_memory = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float* Qs = (float*)aligned_alloc(64, sizeof(float) * BQ * MAXD);
        float* Acc = (float*)aligned_alloc(64, sizeof(float) * BQ * MAXD);
        float* S = (float*)aligned_alloc(64, sizeof(float) * BQ * BK);
        const bool ok = Qs && Acc && S;
        if (!ok) {
#pragma omp atomic write
            no_memory = 1;
        }
        float m[BQ], l[BQ];
#pragma omp for schedule(dynamic, 1)
        for (long task = 0; task < (long)B * H * nqb; task++) {
            if (!ok) continue;  // the caller gets code 2 and raises; outputs are discarded
            const int qb = nqb - 1 - (int)(task % nqb);  // the longest (last) query blocks first
            const int h = (int)(task / nqb % H), b = (int)(task / nqb / H), kh = h / G;
            const int i0 = qb * BQ, nq = T - i0 < BQ ? T - i0 : BQ, nq4 = (nq + 3) & ~3;
            const float* ktp = kt + ((long)b * KV + kh) * Dh * Tp;
            const float* vpp = vp + ((long)b * KV + kh) * Tp * Dh;
            const int* ss = seg_start ? seg_start + (long)b * T : nullptr;
            load_rows(Qs, q + b * qs0 + h * qs1 + i0 * qs2, qs2, nq, nq4, Dh, c);
            for (int i = 0; i < BQ; i++) m[i] = -INFINITY, l[i] = 0.f;
            memset(Acc, 0, sizeof(float) * nq4 * Dh);
            for (int j0 = first_key_block(ss, i0); j0 < i0 + nq; j0 += BK) {
                const int nk = i0 + nq - j0 < BK ? i0 + nq - j0 : BK, nk16 = (nk + 15) & ~15;
                gemm(nq4, nk16, Dh, Qs, Dh, 1, ktp + j0, Tp, S, BK, false);
                mask_block(S, nq4, nq, nk16, nk, i0, j0, ss);
                for (int i = 0; i < nq; i++) {
                    float* s = S + i * BK;
                    vf mx = splat(m[i]);
                    for (int j = 0; j < nk16; j += VW) mx = *(vf*)(s + j) > mx ? *(vf*)(s + j) : mx;
                    const float m_new = hmax(mx);  // finite without segments: key j0 <= query i0 + i is never masked
                    if (m_new == -INFINITY) {  // every key of this block lies before the query's segment
                        memset(s, 0, sizeof(float) * BK);
                        continue;
                    }
                    const float alpha = exp2f(m[i] - m_new);
                    vf sum = splat(0.f), mv = splat(m_new);
                    for (int j = 0; j < nk16; j += VW) {
                        vf p = exp2v(*(vf*)(s + j) - mv);
                        *(vf*)(s + j) = p;
                        sum += p;
                    }
                    l[i] = l[i] * alpha + hsum(sum);
                    m[i] = m_new;
                    if (alpha != 1.f)
                        for (int d = 0; d < Dh; d++) Acc[i * Dh + d] *= alpha;
                }
                for (int i = nq; i < nq4; i++) memset(S + i * BK, 0, sizeof(float) * BK);
                gemm(nq4, Dh, nk16, S, BK, 1, vpp + (long)j0 * Dh, Dh, Acc, Dh, true);
            }
            for (int i = 0; i < nq; i++) {
                float* op = o + (((long)b * T + i0 + i) * H + h) * Dh;
                const float inv = 1.f / l[i];
                for (int d = 0; d < Dh; d++) op[d] = Acc[i * Dh + d] * inv;
                lse2[((long)b * H + h) * T + i0 + i] = m[i] + log2f(l[i]);
            }
        }
        free(Qs), free(Acc), free(S);
    }
    return no_memory ? 2 : 0;  // 1: shapes outside the kernel; 2: no memory for its work buffers
}

extern "C" int litft_attention_backward(int nthreads, int B, int H, int KV, int T, int Tp, int Dh, float scale,
                                        const float* q, long qs0, long qs1, long qs2, const float* kt,
                                        const float* kp, const float* vt, const float* o, const float* dout,
                                        const float* lse2, const int* seg_start, float* dq, float* dk, float* dv) {
    if (Dh % 16 || Dh > MAXD || H % KV || Tp % BK || Tp < T) return 1;
    const int G = H / KV, nqb = (T + BQ - 1) / BQ;
    const float c = scale * 1.4426950408889634f;
    const long HD = (long)H * Dh;
    int no_memory = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float* Qs = (float*)aligned_alloc(64, sizeof(float) * BQ * MAXD);
        float* dOs = (float*)aligned_alloc(64, sizeof(float) * BQ * MAXD);
        float* dQa = (float*)aligned_alloc(64, sizeof(float) * BQ * MAXD);
        float* S = (float*)aligned_alloc(64, sizeof(float) * BQ * BK);
        float* dP = (float*)aligned_alloc(64, sizeof(float) * BQ * BK);
        float* dKa = (float*)aligned_alloc(64, sizeof(float) * Tp * Dh);
        float* dVa = (float*)aligned_alloc(64, sizeof(float) * Tp * Dh);
        const bool ok = Qs && dOs && dQa && S && dP && dKa && dVa;
        if (!ok) {
#pragma omp atomic write
            no_memory = 1;
        }
        float Dl[BQ], Ls[BQ];
        // one task per (batch, query head): it owns its dq rows and its head's partial dk, dv (no races)
#pragma omp for schedule(dynamic, 1)
        for (long task = 0; task < (long)B * H; task++) {
            if (!ok) continue;
            const int h = (int)(task % H), b = (int)(task / H), kh = h / G, g = h % G;
            const float* ktp = kt + ((long)b * KV + kh) * Dh * Tp;
            const float* kpp = kp + ((long)b * KV + kh) * Tp * Dh;
            const float* vtp = vt + ((long)b * KV + kh) * Dh * Tp;
            const int* ss = seg_start ? seg_start + (long)b * T : nullptr;
            memset(dKa, 0, sizeof(float) * Tp * Dh);
            memset(dVa, 0, sizeof(float) * Tp * Dh);
            for (int ib = 0; ib < nqb; ib++) {
                const int i0 = ib * BQ, nq = T - i0 < BQ ? T - i0 : BQ, nq4 = (nq + 3) & ~3;
                const long row0 = ((long)b * T + i0) * HD + (long)h * Dh;  // (b, i0, h) in (B, T, H, Dh)
                load_rows(Qs, q + b * qs0 + h * qs1 + i0 * qs2, qs2, nq, nq4, Dh, c);
                load_rows(dOs, dout + row0, HD, nq, nq4, Dh, 1.f);
                for (int i = 0; i < nq4; i++) {
                    float acc = 0.f;
                    if (i < nq)
                        for (int d = 0; d < Dh; d++) acc += dOs[i * Dh + d] * o[row0 + i * HD + d];
                    Dl[i] = acc;
                    Ls[i] = i < nq ? lse2[((long)b * H + h) * T + i0 + i] : 0.f;
                }
                const int jfirst = first_key_block(ss, i0);
                for (int j0 = jfirst; j0 < i0 + nq; j0 += BK) {
                    const int nk = i0 + nq - j0 < BK ? i0 + nq - j0 : BK, nk16 = (nk + 15) & ~15;
                    const int nk4 = (nk + 3) & ~3;
                    gemm(nq4, nk16, Dh, Qs, Dh, 1, ktp + j0, Tp, S, BK, false);   // S = c q k^T
                    gemm(nq4, nk16, Dh, dOs, Dh, 1, vtp + j0, Tp, dP, BK, false);  // dP = dO v^T
                    mask_block(S, nq4, nq, nk16, nk, i0, j0, ss);
                    for (int i = 0; i < nq4; i++) {
                        const vf lv = splat(Ls[i]), dl = splat(Dl[i]);
                        float* s = S + i * BK;
                        float* dp = dP + i * BK;
                        for (int j = 0; j < nk16; j += VW) {
                            const vf p = exp2v(*(vf*)(s + j) - lv);
                            *(vf*)(s + j) = p;                           // P
                            *(vf*)(dp + j) = p * (*(vf*)(dp + j) - dl);  // dS (natural-log units)
                        }
                    }
                    gemm(nk4, Dh, nq4, S, 1, BK, dOs, Dh, dVa + (long)j0 * Dh, Dh, true);    // dV += P^T dO
                    gemm(nk4, Dh, nq4, dP, 1, BK, Qs, Dh, dKa + (long)j0 * Dh, Dh, true);    // dK += dS^T (c q)
                    gemm(nq4, Dh, nk16, dP, BK, 1, kpp + (long)j0 * Dh, Dh, dQa, Dh, j0 > jfirst);  // dQ += dS k
                }
                for (int i = 0; i < nq; i++)
                    for (int d = 0; d < Dh; d++) dq[row0 + i * HD + d] = dQa[i * Dh + d] * scale;
            }
            // dKa holds dS^T (c q) = log2(e) * scale dS^T q: times ln(2) gives dK
            store_kv_partials(dk, dv, dKa, dVa, 0.6931471805599453f, g, b, kh, B, T, KV, Dh);
        }
        free(Qs), free(dOs), free(dQa), free(S), free(dP), free(dKa), free(dVa);
    }
    return no_memory ? 2 : 0;  // 1: shapes outside the kernel; 2: no memory for its work buffers
}

// ------------------------------------------------------------------------------------------ small-batch linear
// x (M, K) contiguous, W (N, K) contiguous, bias (N) or null, y (M, N) contiguous.
template <int R>
static inline void linear_rows(int M, int N, int K, const float* x, const float* W, const float* bias, float* y,
                               int n0) {
    const int Kv = K & ~(VW - 1);
    for (int m = 0; m < M; m++) {
        const float* xm = x + (long)m * K;
        vf acc[R];
        for (int r = 0; r < R; r++) acc[r] = splat(0.f);
        for (int k = 0; k < Kv; k += VW) {
            const vf xv = *(const vf*)(xm + k);
#pragma GCC unroll 16
            for (int r = 0; r < R; r++) acc[r] += *(const vf*)(W + (long)(n0 + r) * K + k) * xv;
        }
        for (int r = 0; r < R; r++) {
            const float* wr = W + (long)(n0 + r) * K;
            float s = hsum(acc[r]);
            for (int k = Kv; k < K; k++) s += wr[k] * xm[k];
            y[(long)m * N + n0 + r] = bias ? s + bias[n0 + r] : s;
        }
    }
}

extern "C" void litft_linear_small(int nthreads, int M, int N, int K, const float* x, const float* W,
                                   const float* bias, float* y) {
    const int RB = 16, nblocks = N / RB;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int b = 0; b < nblocks; b++) linear_rows<RB>(M, N, K, x, W, bias, y, b * RB);
    for (int n0 = nblocks * RB; n0 < N; n0++) linear_rows<1>(M, N, K, x, W, bias, y, n0);
}

// ------------------------------------------------------------------------------------------ bf16 storage
// RMSNorm and SwiGLU also take bf16 tensors (precision bf16-true): values are widened to fp32 in registers, the math
// is the fp32 math, and results are rounded to bf16 (to nearest even, as torch rounds) once per stored value --
// torch's bf16 path instead makes 3-5 passes, several of them in fp32 temporaries. bf16 is the top half of an fp32.
typedef uint16_t bf16;
typedef uint16_t vh __attribute__((vector_size(2 * VW), aligned(2)));
typedef uint32_t vu __attribute__((vector_size(4 * VW), aligned(4)));

static inline float widen1(bf16 h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline float round1(float f) {  // f rounded to bf16 precision, as an fp32
    uint32_t u; memcpy(&u, &f, 4);
    u = (f != f) ? 0x7fc00000u : (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    memcpy(&f, &u, 4);
    return f;
}
static inline vf roundv(vf f) {
    const vu u = (vu)f, r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    const vu nan = (vu)(f != f);  // all ones where f is NaN: keep a (quiet) NaN, do not round it into an infinity
    return (vf)((nan & 0x7fc00000u) | (~nan & r));
}

static inline vf load(const float* p) { return *(const vf*)p; }
static inline vf load(const bf16* p) { return (vf)(__builtin_convertvector(*(const vh*)p, vu) << 16); }
static inline float load1(const float* p) { return *p; }
static inline float load1(const bf16* p) { return widen1(*p); }
static inline void store(float* p, vf v) { *(vf*)p = v; }
static inline void store(bf16* p, vf v) { *(vh*)p = __builtin_convertvector((vu)roundv(v) >> 16, vh); }
static inline void store1(float* p, float v) { *p = v; }
static inline void store1(bf16* p, float v) { float r = round1(v); uint32_t u; memcpy(&u, &r, 4); *p = u >> 16; }
// the value a store then a load would give: the identity for fp32
static inline vf rounded(vf v, const float*) { return v; }
static inline vf rounded(vf v, const bf16*) { return roundv(v); }
static inline float rounded1(float v, const float*) { return v; }
static inline float rounded1(float v, const bf16*) { return round1(v); }

// ------------------------------------------------------------------------------------------ RMSNorm
// x, out: (rows, C) contiguous (fp32 or bf16); w: the effective weight in fp32 (C) (Gemma's 1 + w is formed by the
// caller); rstd (rows) fp32. round_normed: round x * rstd to the storage type before the weight multiplies it
// (Llama's order in low precision: HF casts the normalised x back, then scales; Gemma scales in fp32).
template <class T>
static void rmsnorm_forward(int nthreads, long rows, int C, float eps, const T* x, const float* w, T* out,
                            float* rstd, bool round_normed) {
    const int Cv = C & ~(VW - 1);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long r = 0; r < rows; r++) {
        const T* xr = x + r * C;
        T* orow = out + r * C;
        vf acc = splat(0.f);
        for (int c = 0; c < Cv; c += VW) {
            const vf a = load(xr + c);
            acc += a * a;
        }
        float ss = hsum(acc);
        for (int c = Cv; c < C; c++) ss += load1(xr + c) * load1(xr + c);
        const float rs = 1.f / sqrtf(ss / C + eps);
        rstd[r] = rs;
        const vf rv = splat(rs);
        for (int c = 0; c < Cv; c += VW) {
            const vf n = load(xr + c) * rv;
            store(orow + c, *(const vf*)(w + c) * (round_normed ? rounded(n, xr) : n));
        }
        for (int c = Cv; c < C; c++) {
            const float n = load1(xr + c) * rs;
            store1(orow + c, w[c] * (round_normed ? rounded1(n, xr) : n));
        }
    }
}

// dx = rstd (dy w) - x rstd^3 mean(dy w x): d/dx of w x rstd(x)
template <class T>
static void rmsnorm_backward(int nthreads, long rows, int C, const T* x, const float* w, const float* rstd,
                             const T* dy, T* dx) {
    const int Cv = C & ~(VW - 1);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long r = 0; r < rows; r++) {
        const T *xr = x + r * C, *dr = dy + r * C;
        T* o = dx + r * C;
        const float rs = rstd[r];
        vf acc = splat(0.f);
        for (int c = 0; c < Cv; c += VW) acc += load(dr + c) * *(const vf*)(w + c) * load(xr + c);
        float dot = hsum(acc);
        for (int c = Cv; c < C; c++) dot += load1(dr + c) * w[c] * load1(xr + c);
        const float k = rs * rs * rs * dot / C;
        const vf kv = splat(k), rv = splat(rs);
        for (int c = 0; c < Cv; c += VW)
            store(o + c, rv * load(dr + c) * *(const vf*)(w + c) - load(xr + c) * kv);
        for (int c = Cv; c < C; c++) store1(o + c, rs * load1(dr + c) * w[c] - load1(xr + c) * k);
    }
}

extern "C" void litft_rmsnorm_forward(int nthreads, long rows, int C, float eps, const float* x, const float* w,
                                      float* out, float* rstd) {
    rmsnorm_forward(nthreads, rows, C, eps, x, w, out, rstd, false);
}
extern "C" void litft_rmsnorm_forward_bf16(int nthreads, long rows, int C, float eps, const bf16* x, const float* w,
                                           bf16* out, float* rstd, int round_normed) {
    rmsnorm_forward(nthreads, rows, C, eps, x, w, out, rstd, round_normed != 0);
}
extern "C" void litft_rmsnorm_backward(int nthreads, long rows, int C, const float* x, const float* w,
                                       const float* rstd, const float* dy, float* dx) {
    rmsnorm_backward(nthreads, rows, C, x, w, rstd, dy, dx);
}
extern "C" void litft_rmsnorm_backward_bf16(int nthreads, long rows, int C, const bf16* x, const float* w,
                                            const float* rstd, const bf16* dy, bf16* dx) {
    rmsnorm_backward(nthreads, rows, C, x, w, rstd, dy, dx);
}

// ------------------------------------------------------------------------------------------ SwiGLU
static inline vf sigmoid(vf g) {  // stable: e^-|g| never overflows
    const vf z = exp2v((g < 0 ? g : -g) * splat(1.4426950408889634f));
    const vf r = splat(1.f) / (splat(1.f) + z);
    return g >= 0 ? r : z * r;
}

static inline float sigmoid1(float g) {
    const float z = expf(-fabsf(g)), r = 1.f / (1.f + z);
    return g >= 0 ? r : z * r;
}

// out = silu(gate) * up over n contiguous elements
template <class T>
static void swiglu_forward(int nthreads, long n, const T* gate, const T* up, T* out) {
    const long nv = n / VW;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long i = 0; i < nv; i++) {
        const vf g = load(gate + VW * i);
        store(out + VW * i, g * sigmoid(g) * load(up + VW * i));
    }
    for (long i = VW * nv; i < n; i++) {
        const float g = load1(gate + i);
        store1(out + i, g * sigmoid1(g) * load1(up + i));
    }
}

// d up = dy silu(g);  d gate = dy up silu'(g), silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g)
template <class T>
static void swiglu_backward(int nthreads, long n, const T* gate, const T* up, const T* dy, T* dgate, T* dup) {
    const long nv = n / VW;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long i = 0; i < nv; i++) {
        const vf g = load(gate + VW * i), d = load(dy + VW * i), s = sigmoid(g);
        store(dup + VW * i, d * g * s);
        store(dgate + VW * i, d * load(up + VW * i) * s * (splat(1.f) + g * (splat(1.f) - s)));
    }
    for (long i = VW * nv; i < n; i++) {
        const float g = load1(gate + i), d = load1(dy + i), s = sigmoid1(g);
        store1(dup + i, d * g * s);
        store1(dgate + i, d * load1(up + i) * s * (1.f + g * (1.f - s)));
    }
}

extern "C" void litft_swiglu_forward(int nthreads, long n, const float* gate, const float* up, float* out) {
    swiglu_forward(nthreads, n, gate, up, out);
}
extern "C" void litft_swiglu_forward_bf16(int nthreads, long n, const bf16* gate, const bf16* up, bf16* out) {
    swiglu_forward(nthreads, n, gate, up, out);
}
extern "C" void litft_swiglu_backward(int nthreads, long n, const float* gate, const float* up, const float* dy,
                                      float* dgate, float* dup) {
    swiglu_backward(nthreads, n, gate, up, dy, dgate, dup);
}
extern "C" void litft_swiglu_backward_bf16(int nthreads, long n, const bf16* gate, const bf16* up, const bf16* dy,
                                           bf16* dgate, bf16* dup) {
    swiglu_backward(nthreads, n, gate, up, dy, dgate, dup);
}

// ------------------------------------------------------------------------------------------ 4-bit dequantization
// QLoRA's frozen base in bitsandbytes' 4-bit layout (nf4 / fp4): n values packed two per byte, the high nibble
// first; one fp32 absmax per block of `blocksize` values (blocksize even); out[i] = lut[code_i] * absmax[i / bs],
// one fp32 product, as bitsandbytes computes it. bitsandbytes' own CPU dequantization allocates its output each
// call; this one writes into the caller's buffer, which a training step reuses for every layer (no fresh 4-64 MB
// allocation and page faults per layer, forward and backward).
extern "C" void litft_dequantize_4bit(int nthreads, long n, int blocksize, const uint8_t* codes, const float* absmax,
                                      const float* lut, float* out) {
    const long nblocks = n / blocksize;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long b = 0; b < nblocks; b++) {
        const float a = absmax[b];
        const uint8_t* c = codes + b * (blocksize / 2);
        float* o = out + b * blocksize;
        int i = 0;
#if defined(__AVX512F__)
        const __m512 table = _mm512_loadu_ps(lut), scale = _mm512_set1_ps(a);
        const __m512i first = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
        const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
        const __m512i shifts = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
        const __m512i low4 = _mm512_set1_epi32(15);
        for (; i + 32 <= blocksize; i += 32) {  // 16 bytes -> 32 values
            const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(c + i / 2)));
            const __m512i q0 = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(first, bytes), shifts), low4);
            const __m512i q1 = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(second, bytes), shifts), low4);
            _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_permutexvar_ps(q0, table), scale));
            _mm512_storeu_ps(o + i + 16, _mm512_mul_ps(_mm512_permutexvar_ps(q1, table), scale));
        }
#endif
        for (; i < blocksize; i += 2) {
            o[i] = lut[c[i / 2] >> 4] * a;
            o[i + 1] = lut[c[i / 2] & 15] * a;
        }
    }
    for (long i = nblocks * blocksize; i < n; i++)  // a last, shorter block
        out[i] = lut[(i & 1) ? codes[i / 2] & 15 : codes[i / 2] >> 4] * absmax[nblocks];
}

// ------------------------------------------------------------------------------------------ bf16 attention backward
// Causal (grouped-query) attention backward for bf16 q, k, v on AMX tiles (Intel Sapphire Rapids and later).
// torch's bf16 SDPA forward runs its block products on AMX (oneDNN's brgemm), but its backward took ~6.5x the
// forward's time on a SmolLM2 layer: the largest item left in a bf16 LoRA step. Same math as the fp32 kernel
// above (flash attention 2 backward), transposed so that every elementwise pass runs along query rows:
//   S^T = K Q^T;  dP^T = V dO^T;  P^T = 2^(c S^T - lse2);  dS^T = P^T (dP^T - D)   (D_i = dO_i . O_i)
//   dV += P^T dO;  dK += dS^T Q;  dQ^T += K^T dS^T;  then dK, dQ times `scale`.
// Products take bf16 operands and accumulate in fp32 (AMX's tdpbf16ps); scores, P and dS are fp32 until P and dS
// are rounded to bf16 as operands of the next products, as torch's and flash attention's bf16 kernels round them.
// AMX multiplies A (16 x 32 bf16) by B given in its pair layout: element (k, n) of B at [k / 2][n][k % 2].
// lse is the natural-log log-sum-exp SDPA's forward returns (torch.ops.aten._scaled_dot_product_flash_attention_
// for_cpu); the caller keeps that forward. Returns 3 where this build or this process has no AMX.
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BW__) && defined(__linux__)
#define LITFT_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

// 1 if the kernel can run here: built with AMX and granted the tile state (Linux gives it to a process that asks)
extern "C" int litft_amx_available() {
#ifdef LITFT_AMX
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
#else
    return 0;
#endif
}

#ifdef LITFT_AMX
struct TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

// The tile configuration is per thread and shared with torch's own AMX users (oneDNN, cpublas::brgemm), which
// configure on entry and release on exit; so does this kernel (configure per call, _tile_release at the end).
static void amx_configure() {  // eight tiles of 16 rows x 64 bytes: 4 accumulators, 2 A, 2 B
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
}

// C (M x N fp32, row stride ldc) (+)= A (M x K bf16, row stride lda) B, B in pair layout with ldb elements per
// pair of rows (element (k, n) at Bv[(k / 2) ldb + 2 n + k % 2]). M, N, K multiples of 32: 2 x 2 output tiles.
static void amx_gemm(int M, int N, int K, const bf16* A, long lda, const bf16* Bv, long ldb, float* C, long ldc,
                     bool acc) {
    for (int m = 0; m < M; m += 32)
        for (int n = 0; n < N; n += 32) {
            float* c = C + (long)m * ldc + n;
            if (acc) {
                _tile_loadd(0, c, ldc * 4);
                _tile_loadd(1, c + 16, ldc * 4);
                _tile_loadd(2, c + 16 * ldc, ldc * 4);
                _tile_loadd(3, c + 16 * ldc + 16, ldc * 4);
            } else {
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
            }
            for (int k = 0; k < K; k += 32) {
                const bf16* a = A + (long)m * lda + k;
                const bf16* b = Bv + (long)(k / 2) * ldb + 2 * n;
                _tile_loadd(4, a, lda * 2);
                _tile_loadd(5, a + 16 * lda, lda * 2);
                _tile_loadd(6, b, ldb * 2);
                _tile_loadd(7, b + 32, ldb * 2);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
            _tile_stored(0, c, ldc * 4);
            _tile_stored(1, c + 16, ldc * 4);
            _tile_stored(2, c + 16 * ldc, ldc * 4);
            _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
        }
}

static inline uint32_t pair(bf16 lo, bf16 hi) { return (uint32_t)lo | (uint32_t)hi << 16; }
#endif

// q (B, H, T, Dh), o and dout (B, H, T, Dh): strided, last dimension contiguous; kp, vp (B, KV, Tp, Dh) and
// kt (B, KV, Dh, Tp) packed and zero-padded to Tp (a multiple of 64) by the caller; lse (B, H, T) fp32 contiguous;
// dq (B, T, H, Dh) bf16; dk, dv (G, B, T, KV, Dh) fp32 partial sums per query head of the group.
extern "C" int litft_attention_backward_bf16(int nthreads, int B, int H, int KV, int T, int Tp, int Dh, float scale,
                                             const bf16* q, long qs0, long qs1, long qs2, const bf16* kp,
                                             const bf16* kt, const bf16* vp, const bf16* o, long os0, long os1,
                                             long os2, const bf16* dout, long ds0, long ds1, long ds2,
                                             const float* lse, bf16* dq, float* dk, float* dv) {
#ifndef LITFT_AMX
    return 3;
#else
    if (Dh % 32 || Dh > MAXD || H % KV || Tp % BK || Tp < T) return 1;
    const int G = H / KV, nqb = (T + BQ - 1) / BQ;
    const float log2e = 1.4426950408889634f, c = scale * log2e;
    const vi lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};  // LITFT_AMX implies AVX-512: VW == 16
    int no_memory = 0;
#pragma omp parallel num_threads(nthreads)
    {
        bf16* Qs = (bf16*)aligned_alloc(64, 2 * BQ * MAXD);    // this query block's rows (BQ x Dh), zero past nq
        bf16* dOs = (bf16*)aligned_alloc(64, 2 * BQ * MAXD);
        bf16* Qtp = (bf16*)aligned_alloc(64, 2 * BQ * MAXD);   // Q^T in pair layout (over d): B of S^T = K Q^T
        bf16* dOtp = (bf16*)aligned_alloc(64, 2 * BQ * MAXD);
        bf16* Qp = (bf16*)aligned_alloc(64, 2 * BQ * MAXD);    // Q in pair layout (over queries): B of dS^T Q
        bf16* dOp = (bf16*)aligned_alloc(64, 2 * BQ * MAXD);
        float* St = (float*)aligned_alloc(64, 4 * BQ * MAXD);   // S^T (BK x BQ fp32); at the end of a query block dQ
        float* dPt = (float*)aligned_alloc(64, 4 * BK * BQ);
        bf16* Pt = (bf16*)aligned_alloc(64, 2 * BK * BQ);       // P^T (BK x BQ) row-major: A of P^T dO
        bf16* dSt = (bf16*)aligned_alloc(64, 2 * BK * BQ);      // dS^T row-major: A of dS^T Q
        bf16* dStp = (bf16*)aligned_alloc(64, 2 * BK * BQ);     // dS^T in pair layout (over keys): B of K^T dS^T
        float* dQt = (float*)aligned_alloc(64, 4 * MAXD * BQ);  // dQ^T (Dh x BQ)
        float* dKa = (float*)aligned_alloc(64, 4 * (long)Tp * Dh);
        float* dVa = (float*)aligned_alloc(64, 4 * (long)Tp * Dh);
        const bool ok = Qs && dOs && Qtp && dOtp && Qp && dOp && St && dPt && Pt && dSt && dStp && dQt && dKa && dVa;
        if (!ok) {
#pragma omp atomic write
            no_memory = 1;
        }
        if (ok) amx_configure();
        alignas(64) float Ls[BQ], Dl[BQ];
#pragma omp for schedule(dynamic, 1)
        for (long task = 0; task < (long)B * H; task++) {
            if (!ok) continue;
            const int h = (int)(task % H), b = (int)(task / H), kh = h / G, g = h % G;
            const bf16* kpp = kp + ((long)b * KV + kh) * Tp * Dh;
            const bf16* ktp = kt + ((long)b * KV + kh) * Dh * Tp;
            const bf16* vpp = vp + ((long)b * KV + kh) * Tp * Dh;
            memset(dKa, 0, 4 * (long)Tp * Dh);
            memset(dVa, 0, 4 * (long)Tp * Dh);
            for (int ib = 0; ib < nqb; ib++) {
                const int i0 = ib * BQ, nq = T - i0 < BQ ? T - i0 : BQ, nq32 = (nq + 31) & ~31;
                for (int i = 0; i < nq32; i++) {
                    if (i >= nq) {  // padded rows: zero, so they add nothing to dK, dV
                        memset(Qs + i * Dh, 0, 2 * Dh), memset(dOs + i * Dh, 0, 2 * Dh);
                        Dl[i] = Ls[i] = 0.f;
                        continue;
                    }
                    const bf16* dr = dout + b * ds0 + h * ds1 + (long)(i0 + i) * ds2;
                    const bf16* orow = o + b * os0 + h * os1 + (long)(i0 + i) * os2;
                    memcpy(Qs + i * Dh, q + b * qs0 + h * qs1 + (long)(i0 + i) * qs2, 2 * Dh);
                    memcpy(dOs + i * Dh, dr, 2 * Dh);
                    vf dot = splat(0.f);
                    for (int d = 0; d < Dh; d += VW) dot += load(dr + d) * load(orow + d);
                    Dl[i] = hsum(dot);
                    Ls[i] = lse[((long)b * H + h) * T + i0 + i] * log2e;
                }
                for (int i = nq32; i < BQ; i++) Dl[i] = Ls[i] = 0.f;
                uint32_t *qtp = (uint32_t*)Qtp, *dotp = (uint32_t*)dOtp, *qp = (uint32_t*)Qp, *dop = (uint32_t*)dOp;
                const uint32_t *qw = (const uint32_t*)Qs, *dow = (const uint32_t*)dOs;
                for (int i = 0; i < nq32; i++)  // (d, i) at [d / 2][i][d % 2]: the 32-bit words of Q's rows, transposed
                    for (int w = 0; w < Dh / 2; w++) {
                        qtp[w * nq32 + i] = qw[i * Dh / 2 + w];
                        dotp[w * nq32 + i] = dow[i * Dh / 2 + w];
                    }
                for (int i = 0; i < nq32; i += 2)  // (i, d) at [i / 2][d][i % 2]: rows i and i + 1 interleaved
                    for (int d = 0; d < Dh; d += VW) {
                        *(vu*)(qp + i / 2 * Dh + d) = ((vu)load(Qs + i * Dh + d) >> 16) |
                                                      ((vu)load(Qs + (i + 1) * Dh + d) & 0xffff0000u);
                        *(vu*)(dop + i / 2 * Dh + d) = ((vu)load(dOs + i * Dh + d) >> 16) |
                                                       ((vu)load(dOs + (i + 1) * Dh + d) & 0xffff0000u);
                    }
                for (int j0 = 0; j0 < i0 + nq; j0 += BK) {
                    const int nk = i0 + nq - j0 < BK ? i0 + nq - j0 : BK, nk32 = (nk + 31) & ~31;
                    amx_gemm(nk32, nq32, Dh, kpp + (long)j0 * Dh, Dh, Qtp, 2 * nq32, St, BQ, false);    // S^T
                    amx_gemm(nk32, nq32, Dh, vpp + (long)j0 * Dh, Dh, dOtp, 2 * nq32, dPt, BQ, false);  // dP^T
                    for (int j = 0; j < nk32; j += 2) {
                        for (int i = 0; i < nq32; i += VW) {
                            const vi col = lanes + (i0 + i);  // the 16 queries' positions
                            const vf lv = *(const vf*)(Ls + i), dl = *(const vf*)(Dl + i);
                            vu words[2];
                            for (int r = 0; r < 2; r++) {  // keys j and j + 1: one pair-layout word per query
                                const int jj = j + r;
                                // query i0 + i attends to key j0 + jj if j0 + jj <= i0 + i (and i < nq)
                                const vi keep = (col >= j0 + jj) & (col < i0 + nq);
                                const vf s = *(const vf*)(St + jj * BQ + i) * splat(c) - lv;
                                const vf p = exp2v(keep ? s : splat(-INFINITY));
                                const vf ds = p * (*(const vf*)(dPt + jj * BQ + i) - dl);
                                store(Pt + jj * BQ + i, p);
                                store(dSt + jj * BQ + i, ds);
                                words[r] = (vu)roundv(ds);
                            }
                            // bf16 of key j in the low half, key j + 1 in the high half (little-endian pairs)
                            *(vu*)(dStp + (long)(j / 2) * 2 * nq32 + 2 * i) =
                                (words[0] >> 16) | (words[1] & 0xffff0000u);
                        }
                    }
                    amx_gemm(nk32, Dh, nq32, Pt, BQ, dOp, 2 * Dh, dVa + (long)j0 * Dh, Dh, true);   // dV += P^T dO
                    amx_gemm(nk32, Dh, nq32, dSt, BQ, Qp, 2 * Dh, dKa + (long)j0 * Dh, Dh, true);   // dK += dS^T Q
                    amx_gemm(Dh, nq32, nk32, ktp + j0, Tp, dStp, 2 * nq32, dQt, BQ, j0 > 0);       // dQ^T += K^T dS^T
                }
                for (int d = 0; d < Dh; d++)  // dQ^T -> dQ (fp32, reusing St), then rows rounded to bf16
                    for (int i = 0; i < nq; i++) St[i * Dh + d] = dQt[d * BQ + i] * scale;
                for (int i = 0; i < nq; i++) {
                    bf16* out = dq + (((long)b * T + i0 + i) * H + h) * Dh;
                    for (int d = 0; d < Dh; d += VW) store(out + d, *(const vf*)(St + i * Dh + d));
                }
            }
            store_kv_partials(dk, dv, dKa, dVa, scale, g, b, kh, B, T, KV, Dh);  // dKa holds dS^T Q
        }
        if (ok) _tile_release();
        free(Qs), free(dOs), free(Qtp), free(dOtp), free(Qp), free(dOp), free(St), free(dPt), free(Pt), free(dSt);
        free(dStp), free(dQt), free(dKa), free(dVa);
    }
    return no_memory ? 2 : 0;  // 1: shapes outside the kernel; 2: no memory for its work buffers
#endif
}

// ------------------------------------------------------------------------------------------ cross-entropy
// The loss's softmax gradient, in place: each row x of logits (rows x V, fp32 or bf16, contiguous) becomes
// softmax(x) - onehot(t) in x's type, and loss[r] = logsumexp(x) - x[t] (fp32). torch's ops make ~7 passes over the
// (chunk x vocab) block (amax, sub, exp, sum, div, scatter, and in bf16 a cast each way, ~0.1 s of a SmolLM2 bf16
// step); here the row is read once from memory and the two later passes find it in cache (a 49k-token row is
// 100-200 KB). Math in fp32 from exact (widened) inputs, rounded once on store, as torch's fp32 softmax then cast.
template <class T>
static int cross_entropy_rows(int nthreads, long rows, int V, T* x, const int64_t* targets, float* loss) {
    for (long r = 0; r < rows; r++)
        if (targets[r] < 0 || targets[r] >= V) return 1;  // a label outside the vocabulary: nothing written
    const int Vv = V & ~(VW - 1);
    const float log2e = 1.4426950408889634f;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long r = 0; r < rows; r++) {
        T* row = x + r * V;
        vf mv = splat(-INFINITY);
        for (int j = 0; j < Vv; j += VW) mv = load(row + j) > mv ? load(row + j) : mv;
        float mx = hmax(mv);
        for (int j = Vv; j < V; j++) mx = load1(row + j) > mx ? load1(row + j) : mx;
        // exp(x - max) = 2^((x - max) log2 e): the subtraction is exact near the max, where the mass is
        const vf mxv = splat(mx), l2 = splat(log2e);
        vf sv = splat(0.f);
        for (int j = 0; j < Vv; j += VW) sv += exp2v((load(row + j) - mxv) * l2);
        float sum = hsum(sv);
        for (int j = Vv; j < V; j++) sum += exp2v(splat((load1(row + j) - mx) * log2e))[0];
        const long t = targets[r];
        const float xt = load1(row + t), inv = 1.f / sum;
        loss[r] = mx + logf(sum) - xt;
        const vf iv = splat(inv);
        for (int j = 0; j < Vv; j += VW) store(row + j, exp2v((load(row + j) - mxv) * l2) * iv);
        for (int j = Vv; j < V; j++) store1(row + j, exp2v(splat((load1(row + j) - mx) * log2e))[0] * inv);
        // the target's probability as the loops computed it, minus one
        store1(row + t, exp2v(splat((xt - mx) * log2e))[0] * inv - 1.f);
    }
    return 0;
}

extern "C" int litft_cross_entropy(int nthreads, long rows, int V, float* x, const int64_t* targets, float* loss) {
    return cross_entropy_rows(nthreads, rows, V, x, targets, loss);
}
extern "C" int litft_cross_entropy_bf16(int nthreads, long rows, int V, bf16* x, const int64_t* targets,
                                        float* loss) {
    return cross_entropy_rows(nthreads, rows, V, x, targets, loss);
}
