/* The cpu backend's bf16 fast path in C (built and loaded by cpu_native.py): GEMMs on AMX tiles
 * (hosts with AMX) or else a single-row GEMV, RMSNorm with the fused residual add, in-place RoPE,
 * SiLU-and-mul of small steps, the KV-cache store, and attention of short stages read straight
 * from the paged KV cache.
 *
 * torch runs RMSNorm and RoPE as 5-10 separate ops over tiny [T, H] tensors, each with its own
 * dispatch and pass over memory the GEMMs have just evicted. Here each is one pass over the rows. Decode attention in torch needs the K/V history gathered (or kept as copies)
 * and a padded SDPA call; here each (stage, KV head) reads its blocks where they lie.
 * The maths and rounding points are those of the torch references in reference.py (rms_norm_ref,
 * rope_ref, attention_ref), which the tests compare against. The compiler vectorises the loops
 * for the host (-O3 -march=native); -ffp-contract=off keeps a*b+c as two roundings, as torch
 * computes it.
 *
 * bf16 values travel as uint16_t. Rows (and attention stages) are independent, so results never
 * depend on the batch. The attention loops for head sizes 64 and 128 also come in explicit
 * AVX-512 (a horizontal sum per score, accumulators held in registers); every other machine
 * compiles the plain-C loops, which the tests build and check too.
 */
#define _GNU_SOURCE /* syscall() under -std=c11 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Threads of every parallel region: px_set_num_threads(n) (n <= 0: OpenMP's default). A setting
 * held here applies to calls from any thread, unlike omp_set_num_threads. */
static int px_threads = 0;
void px_set_num_threads(int64_t n) { px_threads = (int)n; }
static inline int px_nthreads(void) {
#ifdef _OPENMP
    return px_threads > 0 ? px_threads : omp_get_max_threads();
#else
    return 1;
#endif
}
#if defined(__AVX512F__) || defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#define LANES 16

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* round to nearest even, NaN kept quiet: torch's float -> bfloat16 conversion */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* exp(x) to ~2 ulp: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2]; below -87 it returns
 * exp(-87), above 88.7 +inf (as expf overflows). Branch-free, so that the SiLU and softmax
 * loops vectorise (libm's expf does not). */
static inline float exp_f32(float in) {
    float x = in < -87.0f ? -87.0f : (in > 88.0f ? 88.0f : in);
    float n = nearbyintf(x * 1.44269504f);
    float r = x - n * 0.693145752f;
    r = r - n * 1.42860677e-06f;
    float p = 1.98756912e-4f;
    p = p * r + 1.39819994e-3f;
    p = p * r + 8.33345205e-3f;
    p = p * r + 4.16657962e-2f;
    p = p * r + 1.66666657e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, 4);
    return in > 88.7f ? INFINITY : p * scale;
}

/* out[t] = bf16(bf16(s * rsqrt(mean(s^2) + eps)) * w), s = x[t] (+ res[t] in fp32).
 * x, out, w: bf16; res, res_out: fp32 [rows, d] or NULL (then s = x). res_out may alias res. */
void px_rms_norm_bf16(const uint16_t *x, const float *res, float *res_out, const uint16_t *w, uint16_t *out,
                      int64_t rows, int64_t d, float eps) {
    for (int64_t t = 0; t < rows; t++) {
        const uint16_t *xt = x + t * d;
        float *s = res_out ? res_out + t * d : NULL;
        float acc[LANES] = {0};
        int64_t i = 0;
        if (res) {
            const float *rt = res + t * d;
            for (; i + LANES <= d; i += LANES)
                for (int j = 0; j < LANES; j++) {
                    float v = bf16_to_f32(xt[i + j]) + rt[i + j];
                    s[i + j] = v;
                    acc[j] += v * v;
                }
            for (; i < d; i++) {
                s[i] = bf16_to_f32(xt[i]) + rt[i];
                acc[0] += s[i] * s[i];
            }
        } else {
            for (; i + LANES <= d; i += LANES)
                for (int j = 0; j < LANES; j++) {
                    float v = bf16_to_f32(xt[i + j]);
                    acc[j] += v * v;
                }
            for (; i < d; i++) acc[0] += bf16_to_f32(xt[i]) * bf16_to_f32(xt[i]);
        }
        float ss = 0.0f;
        for (int j = 0; j < LANES; j++) ss += acc[j];
        float inv = 1.0f / sqrtf(ss / (float)d + eps);
        uint16_t *ot = out + t * d;
        for (i = 0; i < d; i++) {
            float v = res ? s[i] : bf16_to_f32(xt[i]);
            ot[i] = f32_to_bf16(bf16_to_f32(f32_to_bf16(v * inv)) * bf16_to_f32(w[i]));
        }
    }
}

/* Rotate `heads` heads of d values in each of `rows` rows, in place (rotate-half RoPE):
 * [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin], cos/sin = cos_sin[pos[t], :d/2], [d/2:]. */
int px_rope_bf16(uint16_t *x, int64_t rows, int64_t heads, int64_t d, int64_t row_stride, const float *cos_sin,
                 int64_t num_pos, const int64_t *pos) {
    int64_t half = d / 2;
    for (int64_t t = 0; t < rows; t++)
        if (pos[t] < 0 || pos[t] >= num_pos) return 1; /* checked before anything is rotated */
    for (int64_t t = 0; t < rows; t++) {
        const float *c = cos_sin + pos[t] * d, *s = c + half;
        for (int64_t h = 0; h < heads; h++) {
            uint16_t *xh = x + t * row_stride + h * d;
            for (int64_t i = 0; i < half; i++) {
                float x1 = bf16_to_f32(xh[i]), x2 = bf16_to_f32(xh[i + half]);
                float a = x1 * c[i], b = x2 * s[i];
                float e = x2 * c[i], f = x1 * s[i];
                xh[i] = f32_to_bf16(a - b);
                xh[i + half] = f32_to_bf16(e + f);
            }
        }
    }
    return 0;
}

/* out[t] = bf16(bf16(silu(g)) * u), [g, u] = x[t] split in halves of n; x [rows, 2n], out [rows, n]
 * (silu_and_mul_ref). */
void px_silu_and_mul_bf16(const uint16_t *x, uint16_t *out, int64_t rows, int64_t n) {
    for (int64_t t = 0; t < rows; t++) {
        const uint16_t *g = x + t * 2 * n, *u = g + n;
        uint16_t *o = out + t * n;
        for (int64_t i = 0; i < n; i++) {
            float v = bf16_to_f32(g[i]);
            float silu = v / (1.0f + exp_f32(-v)); /* as torch: v / (1 + exp(-v)) */
            o[i] = f32_to_bf16(bf16_to_f32(f32_to_bf16(silu)) * bf16_to_f32(u[i]));
        }
    }
}

/* Cache rows slots[t] of k_cache and v_cache (rows of `width` values) = k[t] and v[t] (source rows
 * k_stride / v_stride values apart); negative slots are skipped (store_kv_ref). */
int px_store_kv_bf16(const uint16_t *k, int64_t k_stride, const uint16_t *v, int64_t v_stride, uint16_t *k_cache,
                     uint16_t *v_cache, const int64_t *slots, int64_t rows, int64_t width, int64_t num_slots) {
    for (int64_t t = 0; t < rows; t++)
        if (slots[t] >= num_slots) return 1; /* checked before anything is written */
    for (int64_t t = 0; t < rows; t++) {
        if (slots[t] < 0) continue;
        memcpy(k_cache + slots[t] * width, k + t * k_stride, sizeof(uint16_t) * (size_t)width);
        memcpy(v_cache + slots[t] * width, v + t * v_stride, sizeof(uint16_t) * (size_t)width);
    }
    return 0;
}

/* Scores p[r * kl + j] = qf[r] . k_j for nq query rows (fp32, pre-scaled) and the kl keys of one
 * KV head: key j is row j % bs of block table[j / bs]; rows of a block are `row` values apart. */
static void scores_generic(const float *qf, int64_t nq, const uint16_t *k, const int32_t *table, int64_t kl,
                           int64_t bs, int64_t row, int64_t d, float *p) {
    for (int64_t j0 = 0; j0 < kl; j0 += bs) {
        const uint16_t *kb = k + table[j0 / bs] * bs * row;
        for (int64_t j = j0; j < kl && j < j0 + bs; j++, kb += row)
            for (int64_t r = 0; r < nq; r++) {
                float acc[LANES] = {0}, sum = 0.0f;
                int64_t c = 0;
                for (; c + LANES <= d; c += LANES)
                    for (int l = 0; l < LANES; l++) acc[l] += qf[r * d + c + l] * bf16_to_f32(kb[c + l]);
                for (; c < d; c++) sum += qf[r * d + c] * bf16_to_f32(kb[c]);
                for (int l = 0; l < LANES; l++) sum += acc[l];
                p[r * kl + j] = sum;
            }
    }
}

/* acc[r] = sum_j p[r * kl + j] v_j for the nq rows, values laid out as the keys above. */
static void pv_generic(const float *p, int64_t nq, const uint16_t *v, const int32_t *table, int64_t kl, int64_t bs,
                       int64_t row, int64_t d, float *vf, float *acc) {
    memset(acc, 0, sizeof(float) * (size_t)(nq * d));
    for (int64_t j0 = 0; j0 < kl; j0 += bs) {
        const uint16_t *vb = v + table[j0 / bs] * bs * row;
        for (int64_t j = j0; j < kl && j < j0 + bs; j++, vb += row) {
            for (int64_t c = 0; c < d; c++) vf[c] = bf16_to_f32(vb[c]);
            for (int64_t r = 0; r < nq; r++) {
                float pj = p[r * kl + j];
                for (int64_t c = 0; c < d; c++) acc[r * d + c] += pj * vf[c];
            }
        }
    }
}

#if defined(__AVX512F__)
/* The same two loops for d = 16 * dv (dv a constant after inlining: 4 or 8): each key/value row
 * is widened to fp32 once for all query rows, and P . V keeps its accumulators in registers
 * (16 / dv query rows at a time). */
static inline __m512 load_bf16x16(const uint16_t *x) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)x));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

static inline __attribute__((always_inline)) void scores_avx512(const float *qf, int64_t nq, const uint16_t *k,
                                                                const uint16_t *v, const int32_t *table, int64_t kl,
                                                                int64_t bs, int64_t row, float *p, const int dv) {
    for (int64_t j0 = 0; j0 < kl; j0 += bs) {
        const uint16_t *kb = k + table[j0 / bs] * bs * row, *vb = v + table[j0 / bs] * bs * row;
        const uint16_t *kn = j0 + bs < kl ? k + table[j0 / bs + 1] * bs * row : kb;
        for (int64_t j = j0; j < kl && j < j0 + bs; j++, kb += row, vb += row, kn += row) {
            /* after a step's GEMMs the cache rows are cold: ask for this key's value row (used after
             * the softmax) and the next block's key row now (1.5x on SmolLM2's decode batches) */
            for (int c = 0; c < dv; c += 2) _mm_prefetch((const char *)(vb + 16 * c), _MM_HINT_T0);
            for (int c = 0; c < dv; c += 2) _mm_prefetch((const char *)(kn + 16 * c), _MM_HINT_T0);
            __m512 kv[8];
            for (int c = 0; c < dv; c++) kv[c] = load_bf16x16(kb + 16 * c);
            for (int64_t r = 0; r < nq; r++) {
                const float *qr = qf + r * 16 * dv;
                __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qr), kv[0]);
                for (int c = 1; c < dv; c++) a = _mm512_fmadd_ps(_mm512_loadu_ps(qr + 16 * c), kv[c], a);
                p[r * kl + j] = _mm512_reduce_add_ps(a);
            }
        }
    }
}

static inline __attribute__((always_inline)) void pv_avx512(const float *p, int64_t nq, const uint16_t *v,
                                                            const int32_t *table, int64_t kl, int64_t bs,
                                                            int64_t row, float *acc, const int dv) {
    const int rb = 16 / dv;
    for (int64_t r0 = 0; r0 < nq; r0 += rb) {
        __m512 a[4][8];
        for (int i = 0; i < rb; i++)
            for (int c = 0; c < dv; c++) a[i][c] = _mm512_setzero_ps();
        for (int64_t j0 = 0; j0 < kl; j0 += bs) {
            const uint16_t *vb = v + table[j0 / bs] * bs * row;
            for (int64_t j = j0; j < kl && j < j0 + bs; j++, vb += row) {
                __m512 vv[8];
                for (int c = 0; c < dv; c++) vv[c] = load_bf16x16(vb + 16 * c);
                for (int i = 0; i < rb; i++) {
                    if (r0 + i >= nq) break;
                    __m512 pj = _mm512_set1_ps(p[(r0 + i) * kl + j]);
                    for (int c = 0; c < dv; c++) a[i][c] = _mm512_fmadd_ps(pj, vv[c], a[i][c]);
                }
            }
        }
        for (int i = 0; i < rb && r0 + i < nq; i++)
            for (int c = 0; c < dv; c++) _mm512_storeu_ps(acc + (r0 + i) * 16 * dv + 16 * c, a[i][c]);
    }
}
#endif

static void scores(const float *qf, int64_t nq, const uint16_t *k, const uint16_t *v, const int32_t *table, int64_t kl,
                   int64_t bs, int64_t row, int64_t d, float *p) {
#if defined(__AVX512F__)
    if (d == 64) return scores_avx512(qf, nq, k, v, table, kl, bs, row, p, 4);
    if (d == 128) return scores_avx512(qf, nq, k, v, table, kl, bs, row, p, 8);
#else
    (void)v;
#endif
    scores_generic(qf, nq, k, table, kl, bs, row, d, p);
}

static void pv(const float *p, int64_t nq, const uint16_t *v, const int32_t *table, int64_t kl, int64_t bs,
               int64_t row, int64_t d, float *vf, float *acc) {
#if defined(__AVX512F__)
    if (d == 64) return pv_avx512(p, nq, v, table, kl, bs, row, acc, 4);
    if (d == 128) return pv_avx512(p, nq, v, table, kl, bs, row, acc, 8);
#endif
    pv_generic(p, nq, v, table, kl, bs, row, d, vf, acc);
}

/* Attention of short causal stages (decodes, verifies, short prefill chunks) read straight from
 * the paged cache: attention_ref's maths with fp32 scores, softmax and accumulation.
 *   q: bf16 [T, hq, d] with row stride q_stride; out: bf16 [T, hq, d] contiguous; k_cache, v_cache: bf16 [blocks, bs, hkv, d];
 *   stage s of n: query rows q_start[s] .. + q_len[s], KV length kv_len[s] (this step's tokens
 *   included), block ids tables[table_row[s] * table_stride + b] (int32);
 *   row i of a stage sees columns c <= kv_len - q_len + i.
 * One work item per (stage, kv head): each K/V row is read once for the whole GQA group.
 * Returns 0, or -1 when a work buffer could not be allocated. */
int px_paged_attention_bf16(const uint16_t *q, int64_t q_stride, uint16_t *out, const uint16_t *k_cache, const uint16_t *v_cache,
                             const int32_t *tables, int64_t table_stride, const int64_t *table_row,
                             const int64_t *q_start, const int64_t *q_len, const int64_t *kv_len, int64_t n,
                             int64_t hq, int64_t hkv, int64_t d, int64_t bs, float scale) {
    int64_t group = hq / hkv;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(px_nthreads())
    for (int64_t item = 0; item < n * hkv; item++) {
        int64_t s = item / hkv, h = item % hkv, ql = q_len[s], kl = kv_len[s], nq = ql * group;
        const int32_t *table = tables + table_row[s] * table_stride;
        float *buf = malloc(sizeof(float) * (size_t)(nq * (2 * d + kl + 1) + d));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
            continue;
        }
        float *qf = buf, *acc = qf + nq * d, *p = acc + nq * d, *vf = p + nq * kl, *inv = vf + d;
        for (int64_t i = 0; i < ql; i++)
            for (int64_t g = 0; g < group; g++) {
                const uint16_t *src = q + (q_start[s] + i) * q_stride + (h * group + g) * d;
                for (int64_t c = 0; c < d; c++) qf[(i * group + g) * d + c] = bf16_to_f32(src[c]) * scale;
            }
        scores(qf, nq, k_cache + h * d, v_cache + h * d, table, kl, bs, hkv * d, d, p);
        for (int64_t r = 0; r < nq; r++) { /* softmax over the visible columns */
            int64_t vis = kl - ql + r / group + 1;
            float *pr = p + r * kl, mx = -INFINITY, sum = 0.0f, lane_mx[LANES], lane_sum[LANES] = {0};
            int64_t j = 0; /* max and sum in LANES partial lanes, so that the loops vectorise */
            for (int l = 0; l < LANES; l++) lane_mx[l] = -INFINITY;
            for (; j + LANES <= vis; j += LANES)
                for (int l = 0; l < LANES; l++) lane_mx[l] = pr[j + l] > lane_mx[l] ? pr[j + l] : lane_mx[l];
            for (; j < vis; j++) mx = pr[j] > mx ? pr[j] : mx;
            for (int l = 0; l < LANES; l++) mx = lane_mx[l] > mx ? lane_mx[l] : mx;
            for (j = 0; j < vis; j++) pr[j] = exp_f32(pr[j] - mx);
            for (j = 0; j + LANES <= vis; j += LANES)
                for (int l = 0; l < LANES; l++) lane_sum[l] += pr[j + l];
            for (; j < vis; j++) sum += pr[j];
            for (int l = 0; l < LANES; l++) sum += lane_sum[l];
            for (j = vis; j < kl; j++) pr[j] = 0.0f;
            inv[r] = 1.0f / sum;
        }
        pv(p, nq, v_cache + h * d, table, kl, bs, hkv * d, d, vf, acc);
        for (int64_t i = 0; i < ql; i++)
            for (int64_t g = 0; g < group; g++) {
                int64_t r = i * group + g;
                uint16_t *dst = out + ((q_start[s] + i) * hq + h * group + g) * d;
                for (int64_t c = 0; c < d; c++) dst[c] = f32_to_bf16(acc[r * d + c] * inv[r]);
            }
        free(buf);
    }
    return failed ? -1 : 0;
}

/* y[i, j] = bf16(x[i] . w[j] (+ bias[j])) for a few rows x (bf16 [m, k]) against a plain row-major
 * bf16 weight [n, k]: decode GEMVs, which oneDNN runs well below memory bandwidth here. Products
 * are exact in fp32 and summed in fp32, in an order that does not depend on m. Threads split n. */
void px_gemv_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t m, int64_t n,
                  int64_t k) {
#pragma omp parallel for schedule(static) num_threads(px_nthreads())
    for (int64_t j0 = 0; j0 < n; j0 += 8) {
        int64_t nj = n - j0 < 8 ? n - j0 : 8;
        for (int64_t i = 0; i < m; i++) {
            const uint16_t *xi = x + i * k;
            float sums[8];
            int64_t c0 = 0;
#if defined(__AVX512BF16__)
            __m512 acc[8];
            for (int r = 0; r < 8; r++) acc[r] = _mm512_setzero_ps();
            for (; c0 + 32 <= k; c0 += 32) {
                __m512bh xv = (__m512bh)_mm512_loadu_si512(xi + c0);
                for (int r = 0; r < 8; r++)
                    if (r < nj) acc[r] = _mm512_dpbf16_ps(acc[r], xv, (__m512bh)_mm512_loadu_si512(w + (j0 + r) * k + c0));
            }
            for (int r = 0; r < 8; r++) sums[r] = _mm512_reduce_add_ps(acc[r]);
#else
            for (int r = 0; r < 8; r++) sums[r] = 0.0f;
            for (int r = 0; r < nj; r++) {
                const uint16_t *wr = w + (j0 + r) * k;
                float acc[LANES] = {0};
                for (c0 = 0; c0 + LANES <= k; c0 += LANES)
                    for (int l = 0; l < LANES; l++) acc[l] += bf16_to_f32(xi[c0 + l]) * bf16_to_f32(wr[c0 + l]);
                for (int l = 0; l < LANES; l++) sums[r] += acc[l];
            }
            c0 = k - k % LANES;
#endif
            for (int64_t r = 0; r < nj; r++) {
                float s = sums[r];
                for (int64_t c = c0; c < k; c++) s += bf16_to_f32(xi[c]) * bf16_to_f32(w[(j0 + r) * k + c]);
                if (bias) s += bf16_to_f32(bias[j0 + r]);
                y[i * n + j0 + r] = f32_to_bf16(s);
            }
        }
    }
}

/* ---- bf16 GEMM on AMX tiles (Sapphire Rapids and later) -------------------------------------------
 * y[m, n] = bf16(sum_k x[m, k] * w[n, k] (+ bias[n])), fp32 accumulation in the tiles.
 * The weight is packed once (cpu_native.pack_amx) into 16x32 tiles, [ceil(N/16)][ceil(K/32)][16][16][2]:
 * tile (nb, kb), row r holds w[16 nb + j][32 kb + 2r + {0, 1}] for j = 0..15, zero past N and K:
 * the "VNNI" B operand of TDPBF16PS, so each 1 KiB tile is one contiguous load and a column strip
 * of the weight is one sequential stream. Work items are pairs of 16-column blocks (each thread
 * streams its part of the weight once); for each, pairs of 16-row blocks of x accumulate 2x2 tiles
 * over K (2 A + 2 B tiles loaded, 4 products). x is staged into a zero-padded copy only when K is
 * not a multiple of 32 (or M > 16 is not one of 16). Each row's sums run in the same order
 * whatever M is, so a row's result does not depend on the batch. */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define HAVE_AMX 1
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define AMX_PREFETCH 2 /* weight tiles prefetched ahead of the one being multiplied */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

/* one 16x16 fp32 tile (rows r0.. of y, columns c0..c0+15) plus bias, rounded to bf16 */
static void amx_put(const float *c, const uint16_t *bias, uint16_t *y, int64_t r0, int64_t rows, int64_t m,
                    int64_t c0, int64_t n) {
    int64_t nr = m - r0 < rows ? m - r0 : rows;
    if (c0 + 16 <= n) {
        __m512 b = _mm512_setzero_ps();
        if (bias) b = load_bf16x16(bias + c0);
        for (int64_t r = 0; r < nr; r++) {
            __m512 v = _mm512_add_ps(_mm512_loadu_ps(c + r * 16), b);
            _mm256_storeu_si256((__m256i *)(y + (r0 + r) * n + c0), (__m256i)_mm512_cvtneps_pbh(v));
        }
        return;
    }
    for (int64_t r = 0; r < nr; r++)
        for (int64_t j = 0; c0 + j < n; j++) {
            float s = c[r * 16 + j];
            if (bias) s += bf16_to_f32(bias[c0 + j]);
            y[(r0 + r) * n + c0 + j] = f32_to_bf16(s);
        }
}

static inline void amx_prefetch(const uint16_t *tile) {
    for (int l = 0; l < 1024; l += 64) _mm_prefetch((const char *)tile + l, _MM_HINT_T0);
}

/* 1 when this build has the AMX GEMM and the kernel lets the process use the tile registers */
int px_amx_available(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }

/* returns -1 when the staging buffer cannot be allocated */
int px_gemm_amx_bf16(const uint16_t *x, const uint16_t *wp, const uint16_t *bias, uint16_t *y, int64_t m, int64_t n,
                     int64_t k) {
    int64_t kb = (k + 31) / 32, kp = kb * 32, nb = (n + 15) / 16;
    int64_t mr = m < 16 ? m : 16, mp = (m + mr - 1) / mr * mr;
    const uint16_t *a = x;
    uint16_t *stage = NULL;
    if (kp != k || mp != m) {
        stage = calloc((size_t)(mp * kp), 2);
        if (!stage) return -1;
        for (int64_t i = 0; i < m; i++) memcpy(stage + i * kp, x + i * k, (size_t)k * 2);
        a = stage;
    }
    int64_t mblocks = mp / mr, npairs = (nb + 1) / 2;
#pragma omp parallel num_threads(px_nthreads())
    {
        amx_config cfg = {.palette = 1};
        for (int t = 0; t < 8; t++) { /* 0-3: C (fp32), 4-5: A (x rows), 6-7: B (weight tiles) */
            cfg.rows[t] = (uint8_t)(t < 6 ? mr : 16);
            cfg.colsb[t] = 64;
        }
        _tile_loadconfig(&cfg);
        float c[4][256];
#pragma omp for schedule(static)
        for (int64_t p = 0; p < npairs; p++) {
            int64_t n0 = 2 * p;
            int two_n = n0 + 1 < nb;
            const uint16_t *b0 = wp + n0 * kb * 512, *b1 = b0 + kb * 512;
            for (int64_t i = 0; i < mblocks; i += 2) {
                int two_m = i + 1 < mblocks;
                const uint16_t *a0 = a + i * mr * kp, *a1 = a0 + mr * kp;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int64_t q = 0; q < kb; q++) {
                    if (i == 0 && q + AMX_PREFETCH < kb) { /* first pass streams the strip from memory */
                        amx_prefetch(b0 + (q + AMX_PREFETCH) * 512);
                        if (two_n) amx_prefetch(b1 + (q + AMX_PREFETCH) * 512);
                    }
                    _tile_loadd(4, a0 + q * 32, kp * 2);
                    _tile_loadd(6, b0 + q * 512, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    if (two_n) {
                        _tile_loadd(7, b1 + q * 512, 64);
                        _tile_dpbf16ps(1, 4, 7);
                    }
                    if (two_m) {
                        _tile_loadd(5, a1 + q * 32, kp * 2);
                        _tile_dpbf16ps(2, 5, 6);
                        if (two_n) _tile_dpbf16ps(3, 5, 7);
                    }
                }
                _tile_stored(0, c[0], 64);
                amx_put(c[0], bias, y, i * mr, mr, m, n0 * 16, n);
                if (two_n) {
                    _tile_stored(1, c[1], 64);
                    amx_put(c[1], bias, y, i * mr, mr, m, n0 * 16 + 16, n);
                }
                if (two_m) {
                    _tile_stored(2, c[2], 64);
                    amx_put(c[2], bias, y, (i + 1) * mr, mr, m, n0 * 16, n);
                    if (two_n) {
                        _tile_stored(3, c[3], 64);
                        amx_put(c[3], bias, y, (i + 1) * mr, mr, m, n0 * 16 + 16, n);
                    }
                }
            }
        }
        _tile_release();
    }
    free(stage);
    return 0;
}
#else
int px_amx_available(void) { return 0; }
#endif

/* ---- weight-only quantized GEMMs (backends/quant.py) -----------------------------------------------
 * Weights: unsigned quants q (4 bits packed two per byte in GGUF's order, or 8 bits) with fp16
 * scale d and min m per 32 values: w = d q + m. Two ways to multiply them by bf16 activations x:
 *
 *   int8 activations (px_qgemm_q8): each row of x is quantized once per call, as llama.cpp's Q8_1:
 *     per 32 values a = round(x / e) with e = max|x| / 127, and s = e * sum(a). Then
 *     x . w ~= sum_b (d_b e_b) (q_b . a_b) + m_b s_b, the integer dots q_b . a_b exact in int32
 *     (AVX512-VNNI vpdpbusd, AVX2 vpmaddubsw / vpmaddwd, or plain C).
 *   bf16 activations (px_qgemm_f32): x . w = sum_b d_b (q_b . x_b) + m_b sum(x_b) in fp32, the
 *     weight dequantized in registers: no activation rounding.
 *
 * Threads split the weight rows, so each thread streams its rows of the weight once; every row of
 * x is applied to a weight row while it sits in L1 (the multi-row kernel), in chunks of QROWS
 * rows. A row's result is computed in the same order whatever M is. */
#define QROWS 4
#define QPREFETCH 8 /* weight rows prefetched ahead of the pair being multiplied */

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0x1f) u = sign | 0x7f800000u | (man << 13);
    else if (exp) u = sign | ((exp + 112u) << 23) | (man << 13);
    else if (!man) u = sign;
    else { /* subnormal: renormalise */
        exp = 113;
        while (!(man & 0x400u)) { man <<= 1; exp--; }
        u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define QKERNEL "avx512-vnni"
#define Q_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QKERNEL "avx2"
#define Q_AVX2 1
#include <immintrin.h>
#else
#define QKERNEL "plain-c"
#endif

const char *px_quant_kernel(void) { return QKERNEL; }

/* x bf16 [m, k] (k % 32 == 0) -> a int8 [m, k], e and s fp32 [m, k / 32] */
static void quantize_q8(const uint16_t *x, int64_t m, int64_t k, int8_t *a, float *e, float *s) {
    int64_t nb = k / 32;
    for (int64_t i = 0; i < m; i++)
        for (int64_t b = 0; b < nb; b++) {
            const uint16_t *xb = x + i * k + b * 32;
            int8_t *ab = a + i * k + b * 32;
            float v[32], amax = 0.0f;
            for (int j = 0; j < 32; j++) {
                v[j] = bf16_to_f32(xb[j]);
                float t = fabsf(v[j]);
                amax = t > amax ? t : amax;
            }
            float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
            int sum = 0;
            for (int j = 0; j < 32; j++) {
                int q = (int)nearbyintf(v[j] * id);
                q = q > 127 ? 127 : (q < -127 ? -127 : q);
                ab[j] = (int8_t)q;
                sum += q;
            }
            e[i * nb + b] = d;
            s[i * nb + b] = d * (float)sum;
        }
}

/* y[i, n] for rows i0 .. i0 + nr - 1 of x and one weight row (quants qr, scales dr, mins mr) */
#if defined(Q_AVX512)
/* The AVX512-VNNI build takes 4-bit rows in its own order (cpu_native.pack_quant): each group of
 * 4 blocks is 64 bytes whose low nibbles are blocks 0, 1 and high nibbles blocks 2, 3 (byte i:
 * element i of block 0 | element i of block 2 << 4; byte 32 + i: blocks 1 and 3), so one mask and
 * one shift give two 64-value vectors in element order. A row's last 2 or 3 blocks start with a
 * 32-byte pair (low nibbles block 0, high block 1); a last single block keeps GGUF's order. */

/* lane l of a two-block vector takes the scale of block 2p + l / 8 */
static const int32_t pair_index[8][16] = {
#define PX_PAIR(p) {2 * p, 2 * p, 2 * p, 2 * p, 2 * p, 2 * p, 2 * p, 2 * p, \
                    2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1}
    PX_PAIR(0), PX_PAIR(1), PX_PAIR(2), PX_PAIR(3), PX_PAIR(4), PX_PAIR(5), PX_PAIR(6), PX_PAIR(7),
#undef PX_PAIR
};

/* the two-block vectors of blocks [c + 2p, c + 2p + 1] of one weight row; `left` blocks remain in
 * the row from c + 2p on (the pair / single tail when < 4) */
static inline __attribute__((always_inline)) __m512i qload_pair(const uint8_t *qr, int64_t blk, int bits,
                                                                 int64_t left, int hi_half) {
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    if (bits == 8) return left >= 2 ? _mm512_loadu_si512(qr + blk * 32) : _mm512_maskz_loadu_epi8(0xffffffffull, qr + blk * 32);
    if (left >= 4 || hi_half) { /* inside a group of 4: blk is its block 0 (low) or block 2 (high) */
        int64_t g = hi_half ? blk - 2 : blk;
        __m512i raw = _mm512_loadu_si512(qr + g * 16);
        return hi_half ? _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4) : _mm512_and_si512(raw, low4);
    }
    if (left >= 2) { /* a pair: 32 bytes, low nibbles block 0, high nibbles block 1 */
        __m256i raw = _mm256_loadu_si256((const __m256i *)(qr + blk * 16));
        __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1);
        return _mm512_and_si512(z, low4);
    }
    __m128i raw = _mm_loadu_si128((const __m128i *)(qr + blk * 16)); /* a single block, GGUF order */
    __m256i z = _mm256_inserti128_si256(_mm256_castsi128_si256(raw), _mm_srli_epi16(raw, 4), 1);
    return _mm512_and_si512(_mm512_castsi256_si512(z), low4);
}

/* nw weight rows (row stride ws bytes / scales stride nb) against nr rows of x; nw and nr are
 * constants at each call site, so the accumulators stay in registers */
static inline __attribute__((always_inline)) void qdot_avx512(const int8_t *a, const float *e, const float *s,
                                                              int64_t i0, const int nr, const uint8_t *qr,
                                                              const uint16_t *dr, const uint16_t *mr, int bits,
                                                              int64_t k, const int nw, float *out) {
    int64_t nb = k / 32, ws = k * bits / 8;
    __m512 acc[2][QROWS], macc[2][QROWS];
    for (int v = 0; v < nw; v++)
        for (int r = 0; r < nr; r++) acc[v][r] = macc[v][r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < nb; c += 16) { /* 16 blocks: one vector of scales */
        int64_t nc = nb - c < 16 ? nb - c : 16;
        __mmask16 bm = (__mmask16)((1u << nc) - 1u);
        __m512 dd[2][QROWS];
        for (int v = 0; v < nw; v++) {
            __m512 dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(bm, dr + v * nb + c));
            __m512 mw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(bm, mr + v * nb + c));
            for (int r = 0; r < nr; r++) {
                dd[v][r] = _mm512_mul_ps(dw, _mm512_maskz_loadu_ps(bm, e + (i0 + r) * nb + c));
                macc[v][r] = _mm512_fmadd_ps(mw, _mm512_maskz_loadu_ps(bm, s + (i0 + r) * nb + c), macc[v][r]);
            }
        }
        for (int64_t p = 0; 2 * p < nc; p++) { /* two blocks per 64-value vector */
            int64_t blk = c + 2 * p, left = nb - blk;
            int hi_half = bits == 4 && (p & 1) && nb - (blk - 2) >= 4; /* the upper pair of a group of 4 */
            __m512i idx = _mm512_loadu_si512(pair_index[p]);
            __m512i w[2];
            for (int v = 0; v < nw; v++) w[v] = qload_pair(qr + v * ws, blk, bits, left, hi_half);
            __mmask64 am = left >= 2 ? ~0ull : 0xffffffffull;
            for (int r = 0; r < nr; r++) {
                __m512i av = _mm512_maskz_loadu_epi8(am, a + (i0 + r) * k + blk * 32);
                for (int v = 0; v < nw; v++) {
                    __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[v], av);
                    acc[v][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(idx, dd[v][r]), acc[v][r]);
                }
            }
        }
    }
    for (int v = 0; v < nw; v++)
        for (int r = 0; r < nr; r++) out[v * QROWS + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[v][r], macc[v][r]));
}
#endif

/* out[v * QROWS + r]: weight rows j .. j + nw - 1 (nw <= 2) against rows i0 .. i0 + nr - 1 of x */
static void qdot_rows(const int8_t *a, const float *e, const float *s, int64_t i0, int nr, const uint8_t *qr,
                      const uint16_t *dr, const uint16_t *mr, int bits, int64_t k, int nw, float *out) {
#if defined(Q_AVX512)
    if (nw == 2 && nr == 1) qdot_avx512(a, e, s, i0, 1, qr, dr, mr, bits, k, 2, out);
    else if (nw == 2 && nr == 2) qdot_avx512(a, e, s, i0, 2, qr, dr, mr, bits, k, 2, out);
    else if (nw == 2) {
        qdot_rows(a, e, s, i0, nr, qr, dr, mr, bits, k, 1, out);
        qdot_rows(a, e, s, i0, nr, qr + k * bits / 8, dr + k / 32, mr + k / 32, bits, k, 1, out + QROWS);
    } else switch (nr) {
    case 1: qdot_avx512(a, e, s, i0, 1, qr, dr, mr, bits, k, 1, out); break;
    case 2: qdot_avx512(a, e, s, i0, 2, qr, dr, mr, bits, k, 1, out); break;
    case 3: qdot_avx512(a, e, s, i0, 3, qr, dr, mr, bits, k, 1, out); break;
    default: qdot_avx512(a, e, s, i0, 4, qr, dr, mr, bits, k, 1, out); break;
    }
#else
    if (nw == 2) {
        qdot_rows(a, e, s, i0, nr, qr, dr, mr, bits, k, 1, out);
        qdot_rows(a, e, s, i0, nr, qr + k * bits / 8, dr + k / 32, mr + k / 32, bits, k, 1, out + QROWS);
        return;
    }
#endif
#if defined(Q_AVX512)
#elif defined(Q_AVX2)
    int64_t nb = k / 32, bb = bits * 4;
    __m256 acc[QROWS];
    float msum[QROWS];
    for (int r = 0; r < QROWS; r++) {
        acc[r] = _mm256_setzero_ps();
        msum[r] = 0.0f;
    }
    const __m128i low4 = _mm_set1_epi8(0x0f);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < nb; b++) {
        float dw = _cvtsh_ss(dr[b]), mw = _cvtsh_ss(mr[b]);
        const uint8_t *qp = qr + b * bb;
        __m256i wlo, whi; /* 4 bits: one 32-byte vector (wlo); 8 bits: widened to int16 halves */
        if (bits == 4) {
            __m128i raw = _mm_loadu_si128((const __m128i *)qp);
            wlo = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low4), _mm_and_si128(raw, low4));
            whi = wlo;
        } else {
            wlo = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)qp));
            whi = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qp + 16)));
        }
        for (int r = 0; r < nr; r++) {
            const int8_t *ap = a + (i0 + r) * k + b * 32;
            __m256i dot;
            if (bits == 4) {
                dot = _mm256_madd_epi16(_mm256_maddubs_epi16(wlo, _mm256_loadu_si256((const __m256i *)ap)), ones);
            } else {
                __m256i a0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)ap));
                __m256i a1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(ap + 16)));
                dot = _mm256_add_epi32(_mm256_madd_epi16(wlo, a0), _mm256_madd_epi16(whi, a1));
            }
            float sc = dw * e[(i0 + r) * nb + b];
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(sc), acc[r]);
            msum[r] += mw * s[(i0 + r) * nb + b];
        }
    }
    for (int r = 0; r < nr; r++) {
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        out[r] = _mm_cvtss_f32(h) + msum[r];
    }
#else
    int64_t nb = k / 32, bb = bits * 4;
    for (int r = 0; r < nr; r++) {
        const int8_t *ar = a + (i0 + r) * k;
        float sum = 0.0f, msum = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *qp = qr + b * bb;
            const int8_t *ap = ar + b * 32;
            int32_t dot = 0;
            if (bits == 4)
                for (int j = 0; j < 16; j++) dot += (qp[j] & 0x0f) * ap[j] + (qp[j] >> 4) * ap[j + 16];
            else
                for (int j = 0; j < 32; j++) dot += qp[j] * ap[j];
            sum += f16_to_f32(dr[b]) * e[(i0 + r) * nb + b] * (float)dot;
            msum += f16_to_f32(mr[b]) * s[(i0 + r) * nb + b];
        }
        out[r] = sum + msum;
    }
#endif
}

/* Same, bf16 activations kept: xf fp32 [m, k], xs fp32 [m, k / 32] (block sums of xf) */
static void fdot_rows(const float *xf, const float *xs, int64_t i0, int nr, const uint8_t *qr, const uint16_t *dr,
                      const uint16_t *mr, int bits, int64_t k, float *out) {
    int64_t nb = k / 32, bb = bits * 4;
#if defined(Q_AVX512)
    __m512 acc[QROWS];
    float msum[QROWS];
    for (int r = 0; r < QROWS; r++) {
        acc[r] = _mm512_setzero_ps();
        msum[r] = 0.0f;
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *qp = qr + b * bb;
        __m512 w0, w1; /* elements 0-15 and 16-31 of the block */
        if (bits == 4) {
            __m128i raw = _mm_loadu_si128((const __m128i *)qp);
            __m128i lo = _mm_and_si128(raw, _mm_set1_epi8(0x0f));
            __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0f));
            w0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo));
            w1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi));
        } else {
            w0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)qp)));
            w1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qp + 16))));
        }
        __m512 dw = _mm512_set1_ps(f16_to_f32(dr[b]));
        float mw = f16_to_f32(mr[b]);
        for (int r = 0; r < nr; r++) {
            const float *xp = xf + (i0 + r) * k + b * 32;
            __m512 t = _mm512_mul_ps(w0, _mm512_loadu_ps(xp));
            t = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp + 16), t);
            acc[r] = _mm512_fmadd_ps(t, dw, acc[r]);
            msum[r] += mw * xs[(i0 + r) * nb + b];
        }
    }
    for (int r = 0; r < nr; r++) out[r] = _mm512_reduce_add_ps(acc[r]) + msum[r];
#else
    for (int r = 0; r < nr; r++) {
        const float *xr = xf + (i0 + r) * k;
        float sum = 0.0f, msum = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *qp = qr + b * bb;
            const float *xp = xr + b * 32;
            float t[16] = {0};
            if (bits == 4)
                for (int j = 0; j < 16; j++) t[j] = (float)(qp[j] & 0x0f) * xp[j] + (float)(qp[j] >> 4) * xp[j + 16];
            else
                for (int j = 0; j < 16; j++) t[j] = (float)qp[j] * xp[j] + (float)qp[j + 16] * xp[j + 16];
            float tb = 0.0f;
            for (int j = 0; j < 16; j++) tb += t[j];
            sum += f16_to_f32(dr[b]) * tb;
            msum += f16_to_f32(mr[b]) * xs[(i0 + r) * nb + b];
        }
        out[r] = sum + msum;
    }
#endif
}

/* y[i, n] = bf16(x[i] . w[n] (+ bias[n])) for bf16 x [m, k] and a quantized [n, k] weight (qs, d, m
 * of `bits` bits, k % 32 == 0). int8 != 0: int8 activations, else bf16 activations kept.
 * Returns -1 when the activation buffers cannot be allocated. */
int px_qgemm_bf16(const uint16_t *x, const uint8_t *qs, const uint16_t *d, const uint16_t *mins, const uint16_t *bias,
                  uint16_t *y, int64_t m, int64_t n, int64_t k, int64_t bits, int64_t int8) {
    int64_t nb = k / 32, row_bytes = k * bits / 8;
    void *abuf = malloc((size_t)(m * k) * (int8 ? 1 : 4));
    float *eb = malloc((size_t)(m * nb) * sizeof(float) * 2);
    if (!abuf || !eb) {
        free(abuf);
        free(eb);
        return -1;
    }
    float *sb = eb + m * nb;
    if (int8) quantize_q8(x, m, k, abuf, eb, sb);
    else {
        float *xf = abuf;
        for (int64_t i = 0; i < m * nb; i++) {
            float t = 0.0f;
            for (int j = 0; j < 32; j++) {
                xf[i * 32 + j] = bf16_to_f32(x[i * 32 + j]);
                t += xf[i * 32 + j];
            }
            eb[i] = t;
        }
    }
#pragma omp parallel for schedule(static) num_threads(px_nthreads())
    for (int64_t j = 0; j < n; j += 2) { /* two weight rows at a time (the int8 kernel shares x's loads) */
        int nw = n - j < 2 ? 1 : 2;
        const uint8_t *qr = qs + j * row_bytes;
#if defined(Q_AVX512) || defined(Q_AVX2)
        if (j + QPREFETCH + 2 <= n) { /* the weight streams from memory: fetch rows a few pairs ahead */
            const uint8_t *ahead = qs + (j + QPREFETCH) * row_bytes;
            for (int64_t off = 0; off < 2 * row_bytes; off += 64) _mm_prefetch((const char *)ahead + off, _MM_HINT_T0);
            _mm_prefetch((const char *)(d + (j + QPREFETCH) * nb), _MM_HINT_T0);
            _mm_prefetch((const char *)(mins + (j + QPREFETCH) * nb), _MM_HINT_T0);
        }
#endif
        for (int64_t i0 = 0; i0 < m; i0 += QROWS) {
            int nr = m - i0 < QROWS ? (int)(m - i0) : QROWS;
            float out[2 * QROWS];
            if (int8) qdot_rows(abuf, eb, sb, i0, nr, qr, d + j * nb, mins + j * nb, (int)bits, k, nw, out);
            else
                for (int v = 0; v < nw; v++)
                    fdot_rows(abuf, eb, i0, nr, qr + v * row_bytes, d + (j + v) * nb, mins + (j + v) * nb, (int)bits,
                              k, out + v * QROWS);
            for (int v = 0; v < nw; v++) {
                float b = bias ? bf16_to_f32(bias[j + v]) : 0.0f;
                for (int r = 0; r < nr; r++) y[(i0 + r) * n + j + v] = f32_to_bf16(out[v * QROWS + r] + b);
            }
        }
    }
    free(abuf);
    free(eb);
    return 0;
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
/* out[c * 16 + j] = in[j][c]: a 16 x 16 transpose of 32-bit words */
static inline void transpose16(uint32_t in[16][16], uint32_t *out) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        __m512i a = _mm512_loadu_si512(in[2 * i]), b = _mm512_loadu_si512(in[2 * i + 1]);
        t[2 * i] = _mm512_unpacklo_epi32(a, b);
        t[2 * i + 1] = _mm512_unpackhi_epi32(a, b);
    }
    for (int i = 0; i < 4; i++) { /* u[4i + c], 128-bit lane L: rows 4i..4i+3 of column 4L + c */
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int c = 0; c < 4; c++) {
        __m512i x = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), y = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
        __m512i x2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44), y2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
        _mm512_storeu_si512(out + c * 16, _mm512_shuffle_i32x4(x, x2, 0x88));
        _mm512_storeu_si512(out + (4 + c) * 16, _mm512_shuffle_i32x4(x, x2, 0xDD));
        _mm512_storeu_si512(out + (8 + c) * 16, _mm512_shuffle_i32x4(y, y2, 0x88));
        _mm512_storeu_si512(out + (12 + c) * 16, _mm512_shuffle_i32x4(y, y2, 0xDD));
    }
}
#endif

/* A quantized [n, k] weight (backends/quant.py order, k % 32 == 0) dequantized to bf16
 * (bf16(d q + m), as dequantize_ref) straight into cpu_native.pack_amx's tile layout, zero rows
 * past n: steps of many rows then run the AMX bf16 GEMM on it. grouped: 4-bit rows in the int8
 * AVX-512 kernel's order (groups of 4 blocks, then a pair, then a single block). Threads split the
 * 16-row strips. */
void px_dequant_amx_tiles(const uint8_t *qs, const uint16_t *d, const uint16_t *mins, int64_t n, int64_t k,
                          int64_t bits, int64_t grouped, uint16_t *tiles) {
    int64_t kb = k / 32, nb = (n + 15) / 16, row_bytes = k * bits / 8;
#pragma omp parallel for schedule(static) num_threads(px_nthreads())
    for (int64_t s = 0; s < nb; s++) {
        for (int64_t b = 0; b < kb; b++) {
            uint32_t *tile = (uint32_t *)(tiles + (s * kb + b) * 512); /* [16 pairs r][16 rows j] */
            uint32_t rows[16][16]; /* row j: its 32 bf16 values as 16 pairs */
            for (int j = 0; j < 16; j++) {
                int64_t row = s * 16 + j;
                uint16_t *v = (uint16_t *)rows[j];
                if (row >= n) {
                    memset(v, 0, 64);
                    continue;
                }
                const uint8_t *qp = qs + row * row_bytes + b * bits * 4;
                float dd = f16_to_f32(d[row * kb + b]), mm = f16_to_f32(mins[row * kb + b]);
                uint8_t qv[32];
                if (bits == 4 && grouped && kb - b / 4 * 4 >= 2 && (kb - b / 4 * 4 >= 4 || b % 4 < 2)) {
                    /* inside a group of 4 (bytes 64 g..; blocks 0, 1 low nibbles, 2, 3 high) or the pair */
                    int64_t g0 = b / 4 * 4, t = b - g0;
                    int full = kb - g0 >= 4;
                    const uint8_t *base = qs + row * row_bytes + g0 * 16 + (full ? (t & 1) * 32 : 0);
                    int shift = full ? (t >= 2) * 4 : t * 4;
                    for (int e = 0; e < 32; e++) qv[e] = (uint8_t)((base[e] >> shift) & 0x0f);
                    qp = qv;
                }
                int expanded = qp == qv; /* qv: 32 quants, one per byte */
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
                __m128i lo, hi;
                if (bits == 8 || expanded) {
                    lo = _mm_loadu_si128((const __m128i *)qp);
                    hi = _mm_loadu_si128((const __m128i *)(qp + 16));
                } else {
                    __m128i raw = _mm_loadu_si128((const __m128i *)qp);
                    lo = _mm_and_si128(raw, _mm_set1_epi8(0x0f));
                    hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0f));
                }
                __m512 vd = _mm512_set1_ps(dd), vm = _mm512_set1_ps(mm);
                /* d q + m as two roundings (a product, then a sum), as dequantize_ref computes it */
                __m512 w0 = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), vd), vm);
                __m512 w1 = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), vd), vm);
                _mm512_storeu_si512(v, (__m512i)_mm512_cvtne2ps_pbh(w1, w0));
#else
                for (int e = 0; e < 32; e++) {
                    int q = bits == 8 || expanded ? qp[e] : (e < 16 ? qp[e] & 0x0f : qp[e - 16] >> 4);
                    v[e] = f32_to_bf16(dd * (float)q + mm);
                }
#endif
            }
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
            transpose16(rows, tile);
#else
            for (int r = 0; r < 16; r++)
                for (int j = 0; j < 16; j++) tile[r * 16 + j] = rows[j][r];
#endif
        }
    }
}
