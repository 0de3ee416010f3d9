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
 *   position t and frequency j).
 *
 * Activations are fp32 or bf16 (code 0 or 1: the `*_bf16` arguments), computed in fp32;
 * bf16 results are rounded to nearest even, as torch rounds. Shapes, types and contiguity
 * are checked by the caller (recsys/models/fused.py), which allocates every buffer.
 *
 * Built as a CPython extension so that setuptools compiles it with the package; it exports
 * no Python functions and is loaded through ctypes. On x86-64 each kernel is compiled for
 * AVX-512, AVX2 and the baseline, and the loader picks the one the CPU runs. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* The calling convention below; recsys/models/fused.py refuses a build that reports another. */
int64_t fused_abi(void) { return 1; }

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* Per-row scratch: rows are at most this wide (the caller falls back beyond). */
#define WIDEST 8192

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0 : (uint16_t)rounded; /* NaN */
}

static inline void load(float *dst, const void *src, int64_t offset, int64_t n, int bf16) {
    if (bf16) {
        const uint16_t *s = (const uint16_t *)src + offset;
        for (int64_t i = 0; i < n; i++)
            dst[i] = from_bf16(s[i]);
    } else {
        memcpy(dst, (const float *)src + offset, (size_t)n * sizeof(float));
    }
}

static inline void store(void *dst, int64_t offset, const float *src, int64_t n, int bf16) {
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
static inline float dot(const float *a, const float *b, int64_t n) {
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

/* exp(x) for x <= 0 to within 2 ulp (x < -87 gives 0): 2^k · p(r) with r = x - k·ln 2,
 * |r| <= ln 2 / 2, p a degree-6 Taylor polynomial. Plain arithmetic, so loops of it
 * vectorize (libm's expf does not without -ffast-math). */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float shifter = 12582912.0f; /* 1.5 · 2^23: adding it rounds to an integer */
    float k = (x * 1.44269504f + shifter) - shifter;
    float r = x - k * 0.693145752f - k * 1.42860677e-6f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.66666672e-1f +
              r * (4.16666679e-2f + r * (8.33333377e-3f + r * 1.38888892e-3f)))));
    uint32_t bits = (uint32_t)((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* sigmoid(g) without overflow: e = exp(-|g|) <= 1. */
static inline float sigmoid(float g) {
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

/* dx = s (w·dy - x̂ · mean(w·dy·x̂)) with x̂ = s·x; dweight += Σ_rows dy·x̂. */
CLONES void rms_norm_backward(const void *dy, int dy_bf16, const float *x, const float *weight,
                              const float *rstd, int64_t rows, int64_t d, float *dx,
                              float *dweight) {
    float g[WIDEST], xhat[WIDEST];
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float s = rstd[r];
        load(g, dy, r * d, d, dy_bf16);
        for (int64_t i = 0; i < d; i++) {
            xhat[i] = xr[i] * s;
            dweight[i] += g[i] * xhat[i];
            g[i] *= weight[i];
        }
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

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused",
                                    "Fused tower kernels (loaded through ctypes).", -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&module); }
