/* Fused CPU kernels for the Transformer tower (recsys.models.fused).
 *
 * At the tower's small widths (64 to 256) and batch shapes the matrix products are fast and
 * most of a CPU training step is elementwise passes over activations: RMSNorm is about six
 * kernels forward and ten backward, SwiGLU three and five, the rotary embedding with its
 * head layout a dozen. Each pass reads and writes the whole activation from memory. Here each
 * of them is one pass forward and one backward, row by row while the row is in cache:
 *
 * - rms_norm_forward / rms_norm_backward: y = x / rms(x) * w over rows of x (fp32);
 * - swiglu_forward / swiglu_backward: h = silu(g) * u for rows [g | u];
 * - rotary_forward / rotary_backward: [B, T, S, H, D] projections (S slots: queries, keys,
 *   values) into S fp32 [B, T, H, D] tensors (the layout of torch's CPU attention kernels),
 *   the first R slots rotated by position (pairs (2j, 2j + 1) turned by the angle of
 *   position t and frequency j);
 * - attention_forward / attention_backward: softmax(scale · q kᵀ) v over sequences short
 *   enough for one (row, head)'s keys and values to stay in cache, causal or masked (torch's
 *   CPU flash kernel, built for long sequences, spends most of its time outside arithmetic
 *   at ~50 positions and head size 16).
 *
 * Activations are fp32 or bf16 (code 0 or 1: the `*_bf16` arguments), computed in fp32;
 * bf16 results are rounded to nearest even, as torch rounds. Shapes, types and contiguity
 * are checked by the caller (recsys/models/fused.py), which allocates every buffer.
 *
 * Built as a CPython extension so that setuptools compiles it with the package; it exports
 * no Python functions and is loaded through ctypes. On x86-64 each kernel is compiled for
 * AVX-512, AVX2 and the baseline, and the loader picks the one the CPU runs. */
#define PY_SSIZE_T_CLEAN
/* Vectors are only ever passed between inlined helpers: no ABI to keep. */
#pragma GCC diagnostic ignored "-Wpsabi"
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The calling convention below; recsys/models/fused.py refuses a build that reports another. */
int64_t fused_abi(void) { return 2; }

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* Helpers are inlined into each kernel so that they compile for the kernel's instruction set
 * (a helper left out of line would be built for the baseline only). */
#define INLINE static inline __attribute__((always_inline))

/* Per-row scratch on the stack: rows are at most this wide (the caller falls back beyond). */
#define WIDEST 4096

INLINE float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

INLINE uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0 : (uint16_t)rounded; /* NaN */
}

INLINE void load(float *dst, const void *src, int64_t offset, int64_t n, int bf16) {
    if (bf16) {
        const uint16_t *s = (const uint16_t *)src + offset;
        for (int64_t i = 0; i < n; i++)
            dst[i] = from_bf16(s[i]);
    } else {
        memcpy(dst, (const float *)src + offset, (size_t)n * sizeof(float));
    }
}

INLINE void store(void *dst, int64_t offset, const float *src, int64_t n, int bf16) {
    if (bf16) {
        uint16_t *d = (uint16_t *)dst + offset;
        for (int64_t i = 0; i < n; i++)
            d[i] = to_bf16(src[i]);
    } else {
        memcpy((float *)dst + offset, src, (size_t)n * sizeof(float));
    }
}

/* Sum of a[i] * b[i] in 16 running partial sums, so that it vectorizes without reordering
 * licences from the compiler. */
INLINE float dot(const float *a, const float *b, int64_t n) {
    float partial[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++)
            partial[j] += a[i + j] * b[i + j];
    float total = 0.0f;
    for (; i < n; i++)
        total += a[i] * b[i];
    for (int j = 0; j < 16; j++)
        total += partial[j];
    return total;
}

/* exp(x) for x <= 0 to within 2 ulp (x < -87, -inf included, gives 0): 2^k · p(r) with
 * r = x - k·ln 2, |r| <= ln 2 / 2, p a degree-6 Taylor polynomial. Plain arithmetic, so loops of it
 * vectorize (libm's expf does not without -ffast-math). */
INLINE float exp_nonpositive(float x) {
    int underflow = x < -87.0f;
    x = underflow ? -87.0f : x;
    const float shifter = 12582912.0f; /* 1.5 · 2^23: adding it rounds to an integer */
    float k = (x * 1.44269504f + shifter) - shifter;
    float r = x - k * 0.693145752f - k * 1.42860677e-6f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.66666672e-1f +
              r * (4.16666679e-2f + r * (8.33333377e-3f + r * 1.38888892e-3f)))));
    uint32_t bits = (uint32_t)((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return underflow ? 0.0f : p * scale;
}

/* sigmoid(g) without overflow: e = exp(-|g|) <= 1. */
INLINE float sigmoid(float g) {
    float e = exp_nonpositive(g < 0 ? g : -g);
    float s = 1.0f / (1.0f + e);
    return g < 0 ? e * s : s;
}

CLONES void rms_norm_forward(const float *x, const float *weight, int64_t rows, int64_t d,
                             float eps, void *y, int y_bf16, float *rstd) {
    float row[WIDEST];
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float s = 1.0f / sqrtf(dot(xr, xr, d) / (float)d + eps);
        rstd[r] = s;
        for (int64_t i = 0; i < d; i++)
            row[i] = xr[i] * s * weight[i];
        store(y, r * d, row, d, y_bf16);
    }
}

/* dx = s (w·dy - x̂ · mean(w·dy·x̂)) with x̂ = s·x; dweight += Σ_rows dy·x̂, summed over
 * blocks of rows first (a single running sum over ~10^5 rows loses digits). */
#define SUM_BLOCK 64

CLONES void rms_norm_backward(const void *dy, int dy_bf16, const float *x, const float *weight,
                              const float *rstd, int64_t rows, int64_t d, float *dx,
                              float *dweight) {
    float g[WIDEST], xhat[WIDEST], block[WIDEST];
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float s = rstd[r];
        load(g, dy, r * d, d, dy_bf16);
        if (r % SUM_BLOCK == 0)
            for (int64_t i = 0; i < d; i++)
                block[i] = 0.0f;
        for (int64_t i = 0; i < d; i++) {
            xhat[i] = xr[i] * s;
            block[i] += g[i] * xhat[i];
            g[i] *= weight[i];
        }
        if (r % SUM_BLOCK == SUM_BLOCK - 1 || r == rows - 1)
            for (int64_t i = 0; i < d; i++)
                dweight[i] += block[i];
        float mean = dot(g, xhat, d) / (float)d;
        float *dxr = dx + r * d;
        for (int64_t i = 0; i < d; i++)
            dxr[i] = s * (g[i] - xhat[i] * mean);
    }
}

/* Rows of gu are [g | u], f each; h = silu(g) · u. */
CLONES void swiglu_forward(const void *gu, int64_t rows, int64_t f, void *h, int bf16) {
    float g[WIDEST], u[WIDEST];
    for (int64_t r = 0; r < rows; r++) {
        load(g, gu, r * 2 * f, f, bf16);
        load(u, gu, r * 2 * f + f, f, bf16);
        for (int64_t i = 0; i < f; i++)
            g[i] = g[i] * sigmoid(g[i]) * u[i];
        store(h, r * f, g, f, bf16);
    }
}

/* dg = dh · u · σ(g)(1 + g(1 - σ(g))), du = dh · silu(g). */
CLONES void swiglu_backward(const void *dh, const void *gu, int64_t rows, int64_t f, void *dgu,
                            int bf16) {
    float g[WIDEST], u[WIDEST], d[WIDEST];
    for (int64_t r = 0; r < rows; r++) {
        load(g, gu, r * 2 * f, f, bf16);
        load(u, gu, r * 2 * f + f, f, bf16);
        load(d, dh, r * f, f, bf16);
        for (int64_t i = 0; i < f; i++) {
            float s = sigmoid(g[i]);
            float silu = g[i] * s;
            float dg = d[i] * u[i] * (s + silu * (1.0f - s));
            u[i] = d[i] * silu;
            g[i] = dg;
        }
        store(dgu, r * 2 * f, g, f, bf16);
        store(dgu, r * 2 * f + f, u, f, bf16);
    }
}

/* src [B, T, S, H, D] (src_bf16) → out[s] [B, T, H, D] fp32 for each slot s < S; slots
 * s < R rotated: (e, o) at pair j of position t → (e c - o s, e s + o c), c and s the rows
 * cos[b · table_stride + t] and sin[...] (D / 2 each; table_stride 0: one table for every
 * row of the batch, T: one per row). */
CLONES void rotary_forward(const void *src, int src_bf16, int64_t b_size, int64_t t_size,
                           int64_t slots, int64_t heads, int64_t d, int64_t rotated,
                           const float *cos, const float *sin, int64_t table_stride,
                           float **out) {
    float row[WIDEST];
    int64_t half = d / 2;
    for (int64_t b = 0; b < b_size; b++)
        for (int64_t t = 0; t < t_size; t++) {
            const float *c = cos + (b * table_stride + t) * half;
            const float *s = sin + (b * table_stride + t) * half;
            for (int64_t slot = 0; slot < slots; slot++) {
                int64_t base = ((b * t_size + t) * slots + slot) * heads * d;
                load(row, src, base, heads * d, src_bf16);
                for (int64_t h = 0; h < heads; h++) {
                    const float *x = row + h * d;
                    float *y = out[slot] + ((b * t_size + t) * heads + h) * d;
                    if (slot < rotated) {
                        for (int64_t j = 0; j < half; j++) {
                            float e = x[2 * j], o = x[2 * j + 1];
                            y[2 * j] = e * c[j] - o * s[j];
                            y[2 * j + 1] = e * s[j] + o * c[j];
                        }
                    } else {
                        memcpy(y, x, (size_t)d * sizeof(float));
                    }
                }
            }
        }
}

/* The transpose of rotary_forward: grad[s] [B, T, H, D] fp32 (NULL: zero) → dsrc
 * [B, T, S, H, D] (dsrc_bf16), slots s < R turned back by the same angles. */
CLONES void rotary_backward(float *const *grad, int64_t b_size, int64_t t_size, int64_t slots,
                            int64_t heads, int64_t d, int64_t rotated, const float *cos,
                            const float *sin, int64_t table_stride, void *dsrc,
                            int dsrc_bf16) {
    float row[WIDEST];
    int64_t half = d / 2;
    for (int64_t b = 0; b < b_size; b++)
        for (int64_t t = 0; t < t_size; t++) {
            const float *c = cos + (b * table_stride + t) * half;
            const float *s = sin + (b * table_stride + t) * half;
            for (int64_t slot = 0; slot < slots; slot++) {
                for (int64_t h = 0; h < heads; h++) {
                    float *y = row + h * d;
                    if (grad[slot] == NULL) {
                        memset(y, 0, (size_t)d * sizeof(float));
                        continue;
                    }
                    const float *g = grad[slot] + ((b * t_size + t) * heads + h) * d;
                    if (slot < rotated) {
                        for (int64_t j = 0; j < half; j++) {
                            float e = g[2 * j], o = g[2 * j + 1];
                            y[2 * j] = e * c[j] + o * s[j];
                            y[2 * j + 1] = o * c[j] - e * s[j];
                        }
                    } else {
                        memcpy(y, g, (size_t)d * sizeof(float));
                    }
                }
                store(dsrc, ((b * t_size + t) * slots + slot) * heads * d, row, heads * d,
                      dsrc_bf16);
            }
        }
}

/* Attention over short sequences, one (row, head) at a time with its keys and values in
 * cache: softmax(scale · q kᵀ) v, fp32. q [B, Tq, H, D], k and v [B, Tk, H, D], out
 * [B, Tq, H, D] (the layout of the projections, heads side by side) and lse [B, H, Tq], the
 * log-sum-exp of each query's scores that the backward pass recomputes probabilities from.
 * Query i sees key j where causal is 0 or j <= i, and where mask is NULL or
 * mask[b · mask_b + i · mask_q + j] is non-zero (a bool tensor's bytes). A query that sees
 * no key gets zeros (and lse -inf). Returns 0, or -1 when scratch memory is refused.
 *
 * A query's scores are computed against the keys transposed ([D, Tk]: each component of q
 * scales one contiguous row), in blocks of LANES keys: rows are padded with zeros to whole
 * blocks and scores past the keys a query sees are -inf, so every loop over keys is made of
 * whole vectors. */
#define LANES 16

/* LANES floats as one vector (GCC's vector extension; aligned(4): loads need not be
 * aligned). Loops written over vectors compile to whole vector operations in each clone. */
typedef float vec __attribute__((vector_size(LANES * sizeof(float)), aligned(4)));
#define WIDEST_HEAD 256 /* head sizes beyond this (or not multiples of LANES) loop by floats */

INLINE int64_t padded(int64_t n) { return (n + LANES - 1) / LANES * LANES; }

/* The keys a query looks at: the first n, n = i + 1 when causal. */
INLINE int64_t keys_seen(int64_t i, int64_t tk, int causal) {
    return causal && i + 1 < tk ? i + 1 : tk;
}

/* s[j] = scale · q · row j of rows_t ([D, stride], transposed) for j < padded(n), -inf for
 * j >= n and where allowed[j] is 0. */
INLINE void scores(const float *q, const float *rows_t, int64_t stride, int64_t d,
                          int64_t n, float scale, const uint8_t *allowed, float *s) {
    int64_t blocks = padded(n) / LANES;
    vec *sv = (vec *)s;
    for (int64_t j = 0; j < blocks; j++) { /* one accumulator per block: no trips to memory */
        vec a = {0};
        for (int64_t c = 0; c < d; c++)
            a += q[c] * *(const vec *)(rows_t + c * stride + j * LANES);
        sv[j] = a * scale;
    }
    if (allowed)
        for (int64_t j = 0; j < n; j++)
            s[j] = allowed[j] ? s[j] : -INFINITY;
    for (int64_t j = n; j < blocks * LANES; j++)
        s[j] = -INFINITY;
}

typedef int32_t lanes __attribute__((vector_size(LANES * sizeof(int32_t))));

/* Elementwise max of two vectors (C has no vector ?:). */
INLINE vec vmax(vec a, vec b) {
    lanes greater = a > b;
    return (vec)(((lanes)a & greater) | ((lanes)b & ~greater));
}

#if defined(__clang__)
#define SHUFFLE(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define SHUFFLE(v, ...) __builtin_shuffle(v, (lanes){__VA_ARGS__})
#endif

/* The largest and the sum of one vector's lanes: halves folded onto each other. */
INLINE float lanes_max(vec v) {
    v = vmax(v, SHUFFLE(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
    v = vmax(v, SHUFFLE(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
    v = vmax(v, SHUFFLE(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
    v = vmax(v, SHUFFLE(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
    return v[0];
}

INLINE float lanes_sum(vec v) {
    v += SHUFFLE(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += SHUFFLE(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v += SHUFFLE(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v += SHUFFLE(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return v[0];
}

/* The largest of the first padded(n) scores. */
INLINE float largest(const float *s, int64_t n) {
    const vec *sv = (const vec *)s;
    vec m = sv[0];
    for (int64_t j = 1; j < padded(n) / LANES; j++)
        m = vmax(m, sv[j]);
    return lanes_max(m);
}

/* s[j] = exp(s[j] - shift) over whole blocks (0 where s[j] is -inf); returns their sum. */
INLINE float exponentiate(float *s, int64_t n, float shift) {
    int64_t blocks = padded(n) / LANES;
    for (int64_t j = 0; j < blocks * LANES; j++)
        s[j] = exp_nonpositive(s[j] - shift);
    const vec *sv = (const vec *)s;
    vec total = {0};
    for (int64_t j = 0; j < blocks; j++)
        total += sv[j];
    return lanes_sum(total);
}

/* (row b, head h)'s keys and values transposed, [D, padded(Tk)] with zeros past Tk, and its
 * keys and values by rows, [Tk, D] (either may be NULL). */
INLINE void gather(const float *x, int64_t b, int64_t h, int64_t tk, int64_t heads,
                   int64_t d, float *transposed, float *rows) {
    int64_t stride = padded(tk);
    const float *first = x + (b * tk * heads + h) * d; /* key 0's; key j's is heads · d on */
    if (transposed)
        for (int64_t c = 0; c < d; c++) {
            float *row = transposed + c * stride;
            for (int64_t j = 0; j < tk; j++)
                row[j] = first[j * heads * d + c];
            for (int64_t j = tk; j < stride; j++)
                row[j] = 0.0f;
        }
    if (rows)
        for (int64_t j = 0; j < tk; j++)
            memcpy(rows + j * d, first + j * heads * d, (size_t)d * sizeof(float));
}

/* acc = Σ_{j<n} w[j] · rows[j] over rows [n, d]. */
INLINE void weigh(const float *w, const float *rows, int64_t n, int64_t d, float *acc) {
    if (d % LANES == 0 && d <= WIDEST_HEAD) {
        vec sum[WIDEST_HEAD / LANES];
        int64_t m = d / LANES;
        for (int64_t u = 0; u < m; u++)
            sum[u] = (vec){0};
        for (int64_t j = 0; j < n; j++) {
            const vec *row = (const vec *)(rows + j * d);
            for (int64_t u = 0; u < m; u++)
                sum[u] += w[j] * row[u];
        }
        memcpy(acc, sum, (size_t)d * sizeof(float));
        return;
    }
    for (int64_t c = 0; c < d; c++)
        acc[c] = 0.0f;
    for (int64_t j = 0; j < n; j++)
        for (int64_t c = 0; c < d; c++)
            acc[c] += w[j] * rows[j * d + c];
}

/* The backward pass of one query over its n keys: dq = Σ_j ds[j] k_j, and for each key
 * dk_j += ds[j] q, dv_j += p[j] g (keys, dkeys, dvalues by rows [n, d]). */
INLINE void spread(const float *ds, const float *p, const float *keys, const float *q,
                   const float *g, int64_t n, int64_t d, float *dq, float *dkeys,
                   float *dvalues) {
    if (d % LANES == 0 && d <= WIDEST_HEAD) {
        vec sum[WIDEST_HEAD / LANES], qv[WIDEST_HEAD / LANES], gv[WIDEST_HEAD / LANES];
        int64_t m = d / LANES;
        memcpy(qv, q, (size_t)d * sizeof(float));
        memcpy(gv, g, (size_t)d * sizeof(float));
        for (int64_t u = 0; u < m; u++)
            sum[u] = (vec){0};
        for (int64_t j = 0; j < n; j++) {
            const vec *kj = (const vec *)(keys + j * d);
            vec *dkj = (vec *)(dkeys + j * d), *dvj = (vec *)(dvalues + j * d);
            for (int64_t u = 0; u < m; u++) {
                sum[u] += ds[j] * kj[u];
                dkj[u] += ds[j] * qv[u];
                dvj[u] += p[j] * gv[u];
            }
        }
        memcpy(dq, sum, (size_t)d * sizeof(float));
        return;
    }
    for (int64_t c = 0; c < d; c++)
        dq[c] = 0.0f;
    for (int64_t j = 0; j < n; j++)
        for (int64_t c = 0; c < d; c++) {
            dq[c] += ds[j] * keys[j * d + c];
            dkeys[j * d + c] += ds[j] * q[c];
            dvalues[j * d + c] += p[j] * g[c];
        }
}

INLINE int64_t forward_rows(const float *q, const float *k, const float *v, int64_t b_size,
                            int64_t heads, int64_t tq, int64_t tk, int64_t d,
                            const uint8_t *mask, int64_t mask_b, int64_t mask_q, int causal,
                            float scale, float *out, float *lse) {
    int64_t stride = padded(tk);
    float *keys_t = malloc((size_t)(stride * d) * sizeof(float));
    float *values = malloc((size_t)(tk * d) * sizeof(float));
    float *s = malloc((size_t)stride * sizeof(float));
    float *acc = malloc((size_t)d * sizeof(float));
    int64_t status = keys_t && values && s && acc ? 0 : -1;
    for (int64_t b = 0; b < b_size && status == 0; b++)
        for (int64_t h = 0; h < heads; h++) {
            gather(k, b, h, tk, heads, d, keys_t, NULL);
            gather(v, b, h, tk, heads, d, NULL, values);
            for (int64_t i = 0; i < tq; i++) {
                const float *qi = q + ((b * tq + i) * heads + h) * d;
                int64_t n = keys_seen(i, tk, causal);
                const uint8_t *allowed = mask ? mask + b * mask_b + i * mask_q : NULL;
                scores(qi, keys_t, stride, d, n, scale, allowed, s);
                float m = largest(s, n);
                float *o = out + ((b * tq + i) * heads + h) * d;
                if (m == -INFINITY) {
                    memset(o, 0, (size_t)d * sizeof(float));
                    lse[(b * heads + h) * tq + i] = -INFINITY;
                    continue;
                }
                float total = exponentiate(s, n, m);
                weigh(s, values, n, d, acc);
                for (int64_t c = 0; c < d; c++)
                    o[c] = acc[c] / total;
                lse[(b * heads + h) * tq + i] = m + logf(total);
            }
        }
    free(keys_t);
    free(values);
    free(s);
    free(acc);
    return status;
}

/* Gradients of attention_forward from dout [B, Tq, H, D]: dq, dk, dv in the layouts of q, k,
 * v. With p the probabilities (recomputed from lse) and Δ_i = dout_i · out_i:
 * ds_ij = p_ij (dout_i · v_j - Δ_i), dq_i = scale Σ_j ds_ij k_j, dk_j = scale Σ_i ds_ij q_i,
 * dv_j = Σ_i p_ij dout_i. */
INLINE int64_t backward_rows(const float *q, const float *k, const float *v, const float *out,
                             const float *lse, const float *dout, int64_t b_size,
                             int64_t heads, int64_t tq, int64_t tk, int64_t d,
                             const uint8_t *mask, int64_t mask_b, int64_t mask_q, int causal,
                             float scale, float *dq, float *dk, float *dv) {
    int64_t stride = padded(tk);
    size_t block = (size_t)(stride * d) * sizeof(float);
    float *keys_t = malloc(block), *values_t = malloc(block), *keys = malloc(block);
    float *dkeys = malloc(block), *dvalues = malloc(block);
    float *p = malloc((size_t)stride * sizeof(float));
    float *ds = malloc((size_t)stride * sizeof(float));
    int64_t status = keys_t && values_t && keys && dkeys && dvalues && p && ds ? 0 : -1;
    for (int64_t b = 0; b < b_size && status == 0; b++)
        for (int64_t h = 0; h < heads; h++) {
            gather(k, b, h, tk, heads, d, keys_t, keys);
            gather(v, b, h, tk, heads, d, values_t, NULL);
            memset(dkeys, 0, (size_t)(tk * d) * sizeof(float));
            memset(dvalues, 0, (size_t)(tk * d) * sizeof(float));
            for (int64_t i = 0; i < tq; i++) {
                int64_t at = ((b * tq + i) * heads + h) * d;
                const float *qi = q + at, *oi = out + at, *gi = dout + at;
                float *dqi = dq + at;
                float l = lse[(b * heads + h) * tq + i];
                if (l == -INFINITY) {
                    memset(dqi, 0, (size_t)d * sizeof(float));
                    continue;
                }
                int64_t n = keys_seen(i, tk, causal);
                const uint8_t *allowed = mask ? mask + b * mask_b + i * mask_q : NULL;
                scores(qi, keys_t, stride, d, n, scale, allowed, p);
                exponentiate(p, n, l);
                scores(gi, values_t, stride, d, n, 1.0f, NULL, ds); /* dout_i · v_j */
                float delta = dot(gi, oi, d);
                for (int64_t j = 0; j < padded(n); j += LANES)
                    for (int w = 0; w < LANES; w++)
                        ds[j + w] = p[j + w] * (ds[j + w] - delta) * scale;
                spread(ds, p, keys, qi, gi, n, d, dqi, dkeys, dvalues);
            }
            for (int64_t j = 0; j < tk; j++) {
                int64_t at = ((b * tk + j) * heads + h) * d;
                memcpy(dk + at, dkeys + j * d, (size_t)d * sizeof(float));
                memcpy(dv + at, dvalues + j * d, (size_t)d * sizeof(float));
            }
        }
    free(keys_t);
    free(values_t);
    free(keys);
    free(dkeys);
    free(dvalues);
    free(p);
    free(ds);
    return status;
}

/* The two entry points, with the common head sizes as constants: their loops over a head's
 * components then compile to whole vector operations. */
#define HEAD_SIZES(call) \
    switch (d) {         \
    case 8:              \
        return call(8);  \
    case 16:             \
        return call(16); \
    case 32:             \
        return call(32); \
    case 64:             \
        return call(64); \
    default:             \
        return call(d);  \
    }

CLONES int64_t attention_forward(const float *q, const float *k, const float *v,
                                 int64_t b_size, int64_t heads, int64_t tq, int64_t tk,
                                 int64_t d, const uint8_t *mask, int64_t mask_b,
                                 int64_t mask_q, int causal, float scale, float *out,
                                 float *lse) {
#define FORWARD(size) \
    forward_rows(q, k, v, b_size, heads, tq, tk, size, mask, mask_b, mask_q, causal, scale, out, lse)
    HEAD_SIZES(FORWARD)
}

CLONES int64_t attention_backward(const float *q, const float *k, const float *v,
                                  const float *out, const float *lse, const float *dout,
                                  int64_t b_size, int64_t heads, int64_t tq, int64_t tk,
                                  int64_t d, const uint8_t *mask, int64_t mask_b,
                                  int64_t mask_q, int causal, float scale, float *dq,
                                  float *dk, float *dv) {
#define BACKWARD(size)                                                                      \
    backward_rows(q, k, v, out, lse, dout, b_size, heads, tq, tk, size, mask, mask_b, mask_q, \
                  causal, scale, dq, dk, dv)
    HEAD_SIZES(BACKWARD)
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused",
                                    "Fused tower kernels (loaded through ctypes).", -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&module); }
