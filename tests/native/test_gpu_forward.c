/* GPU test of libspm_kernels: the native forward against a CPU reference (double precision, on
 * the same fp16/bf16-rounded inputs) at SD1.5 shapes, plus a timing of the SD1.5 self-attention
 * projection. Exit 77 (ctest: skipped) where no driver, device or matching cubin exists.
 *
 * Tolerance: max |y - ref| <= tol * max |ref| with tol 4e-3 (fp16) / 3e-2 (bf16): the kernels
 * round the output and the coefficients c to the 16-bit dtype (2^-11 / 2^-8 relative) and sum in
 * fp32. The reference is computed for a sample of rows spread over every row tile. */
#include "spm_kernels.h"

#include "cuda_driver.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SKIP 77

static const spm_cuda_driver *cu;

static void die_cuda(CUresult rc, const char *what) {
    char buf[512];
    spm_cuda_error_text(cu, rc, what, buf, sizeof buf);
    fprintf(stderr, "FAIL: %s\n", buf);
    exit(1);
}
#define CU(call)                                                                                    \
    do {                                                                                            \
        CUresult rc_ = (call);                                                                      \
        if (rc_ != CUDA_SUCCESS) die_cuda(rc_, #call);                                              \
    } while (0)

/* --- 16-bit floats (round to nearest even) --- */
static uint16_t f2h(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    int32_t exp = (int32_t)((x >> 23) & 0xff) - 127 + 15;
    uint32_t mant = x & 0x7fffffu;
    if (exp <= 0) { /* subnormal / zero */
        if (exp < -10) return (uint16_t)sign;
        mant |= 0x800000u;
        uint32_t shift = (uint32_t)(14 - exp);
        uint32_t h = mant >> shift, rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1))) ++h;
        return (uint16_t)(sign | h);
    }
    if (exp >= 31) return (uint16_t)(sign | 0x7c00u);
    uint32_t h = ((uint32_t)exp << 10) | (mant >> 13), rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) ++h;
    return (uint16_t)(sign | h);
}
static float h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu, x;
    if (exp == 0) {
        float f = ldexpf((float)mant, -24);
        return sign ? -f : f;
    }
    if (exp == 31) x = sign | 0x7f800000u | (mant << 13);
    else x = sign | ((exp - 15 + 127) << 23) | (mant << 13);
    float f;
    memcpy(&f, &x, 4);
    return f;
}
static uint16_t f2bf(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}
static float bf2f(uint16_t b) {
    uint32_t x = (uint32_t)b << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static float urand(void) { /* uniform in [-1, 1) */
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (float)((g_rng >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

typedef struct tensor16 {
    uint16_t *bits;   /* host copy in the dtype */
    float *values;    /* the same values as float (what the GPU sees) */
    size_t n;
    CUdeviceptr dev;
} tensor16;

static tensor16 make16(size_t n, float scale, spm_dtype dt) {
    tensor16 t = {malloc(n * 2), malloc(n * 4), n, 0};
    for (size_t i = 0; i < n; ++i) {
        float v = urand() * scale;
        t.bits[i] = dt == SPM_DTYPE_FLOAT16 ? f2h(v) : f2bf(v);
        t.values[i] = dt == SPM_DTYPE_FLOAT16 ? h2f(t.bits[i]) : bf2f(t.bits[i]);
    }
    CU(cu->memAlloc(&t.dev, n * 2 + 16));
    CU(cu->memcpyHtoD(t.dev, t.bits, n * 2));
    return t;
}
static void free16(tensor16 *t) {
    free(t->bits);
    free(t->values);
    cu->memFree(t->dev);
}

typedef struct test_case {
    const char *name;
    int64_t m, rows_per_sample, in, out, ldx_pad;
    int k, rank, groups, has_bias, scale_per_group;
    spm_dtype dtype;
    spm_combine combine;
    spm_pattern pattern;
} test_case;

/* y rows `r` of the reference in double: the op as in kernels/reference.py, per group */
static void reference_row(const test_case *t, const tensor16 *x, int64_t ldx, const tensor16 *w, const tensor16 *b,
                          const tensor16 *d, const tensor16 *u, const float *scale, const float *gates, int64_t r,
                          double *yrow) {
    int kr = t->k * t->rank;
    const float *g = gates + (r / t->rows_per_sample) * t->k;
    double z[512], c[512];
    for (int grp = 0; grp < t->groups; ++grp) {
        const float *s = scale + (t->scale_per_group ? grp * t->k : 0);
        for (int j = 0; j < kr; ++j) {
            double acc = 0;
            const float *drow = d->values + ((size_t)grp * kr + j) * t->in;
            for (int64_t i = 0; i < t->in; ++i) acc += (double)x->values[r * ldx + i] * drow[i];
            z[j] = acc;
        }
        if (t->combine == SPM_COMBINE_LINEAR) {
            for (int j = 0; j < kr; ++j) c[j] = z[j] * g[j / t->rank] * s[j / t->rank];
        } else {
            for (int jj = 0; jj < t->rank; ++jj) {
                double wsum = 0;
                for (int kk = 0; kk < t->k; ++kk) wsum += g[kk] * z[kk * t->rank + jj];
                for (int kk = 0; kk < t->k; ++kk) c[kk * t->rank + jj] = s[0] * g[kk] * wsum;
            }
        }
        for (int64_t n = 0; n < t->out; ++n) {
            int64_t col = grp * t->out + n;
            double acc = b ? b->values[col] : 0.0;
            const float *wrow = w->values + col * t->in;
            for (int64_t i = 0; i < t->in; ++i) acc += (double)x->values[r * ldx + i] * wrow[i];
            const float *urow = u->values + col * kr;
            for (int j = 0; j < kr; ++j) acc += c[j] * urow[j];
            yrow[col] = acc;
        }
    }
}

static int run_case(const test_case *t, int time_it) {
    const spm_dtype dt = t->dtype;
    const int kr = t->k * t->rank;
    const int64_t n_total = (int64_t)t->groups * t->out, ldx = t->in + t->ldx_pad, ldy = n_total;
    const int64_t batches = t->m / t->rows_per_sample;
    const float inv_in = 1.0f / sqrtf((float)t->in);
    tensor16 x = make16((size_t)(t->m * ldx), 1.0f, dt);
    tensor16 w = make16((size_t)(n_total * t->in), inv_in, dt);
    tensor16 b = make16((size_t)n_total, 0.5f, dt);
    tensor16 d = make16((size_t)t->groups * kr * t->in, inv_in, dt);
    tensor16 u = make16((size_t)(n_total * kr), 1.0f / sqrtf((float)kr), dt);
    int scale_n = t->scale_per_group ? t->groups * t->k : t->k;
    float *scale = malloc(sizeof(float) * (size_t)scale_n), *gates = malloc(sizeof(float) * (size_t)(batches * t->k));
    for (int i = 0; i < scale_n; ++i) scale[i] = 0.5f + 0.5f * fabsf(urand());
    for (int64_t i = 0; i < batches * t->k; ++i) gates[i] = fabsf(urand()); /* gates in [0, 1) */
    CUdeviceptr dscale, dgates, dy, dws = 0;
    CU(cu->memAlloc(&dscale, sizeof(float) * (size_t)scale_n));
    CU(cu->memAlloc(&dgates, sizeof(float) * (size_t)(batches * t->k)));
    CU(cu->memcpyHtoD(dscale, scale, sizeof(float) * (size_t)scale_n));
    CU(cu->memcpyHtoD(dgates, gates, sizeof(float) * (size_t)(batches * t->k)));
    CU(cu->memAlloc(&dy, (size_t)(t->m * ldy) * 2));
    CU(cu->memsetD8(dy, 0xff, (size_t)(t->m * ldy) * 2)); /* NaN pattern: unwritten outputs fail */

    spm_gated_linear_args a;
    memset(&a, 0, sizeof a);
    a.x = (const void *)(uintptr_t)x.dev;
    a.weight = (const void *)(uintptr_t)w.dev;
    a.bias = t->has_bias ? (const void *)(uintptr_t)b.dev : NULL;
    a.down = (const void *)(uintptr_t)d.dev;
    a.up = (const void *)(uintptr_t)u.dev;
    a.scale = (const float *)(uintptr_t)dscale;
    a.gates = (const float *)(uintptr_t)dgates;
    a.y = (void *)(uintptr_t)dy;
    a.m = t->m; a.in_features = t->in; a.out_features = t->out; a.ldx = ldx; a.ldy = ldy;
    a.rows_per_sample = t->rows_per_sample; a.num_spms = t->k; a.rank = t->rank; a.groups = t->groups;
    a.scale_per_group = t->scale_per_group; a.dtype = dt; a.combine = t->combine; a.pattern = t->pattern;
    size_t ws = 0;
    spm_status st = spm_gated_linear_workspace_size(&a, &ws);
    if (st == SPM_OK && ws) {
        CU(cu->memAlloc(&dws, ws));
        a.workspace = (void *)(uintptr_t)dws;
        a.workspace_bytes = ws;
    }
    spm_launch_plan plan;
    int cc = 0;
    spm_kernels_device_cc(0, &cc);
    if (st == SPM_OK) st = spm_gated_linear_plan(&a, spm_kernels_arch_for_cc(cc), &plan);
    if (st == SPM_OK) st = spm_gated_linear_forward(NULL, &a);
    if (st != SPM_OK) {
        fprintf(stderr, "FAIL %s: %s: %s\n", t->name, spm_status_string(st), spm_last_error());
        return 1;
    }
    CU(cu->ctxSynchronize());
    uint16_t *yb = malloc((size_t)(t->m * ldy) * 2);
    CU(cu->memcpyDtoH(yb, dy, (size_t)(t->m * ldy) * 2));

    double *ref = malloc(sizeof(double) * (size_t)n_total), max_err = 0, max_ref = 0;
    int64_t rows_checked = 0, step = t->m > 600 ? 37 : 1; /* 37: co-prime with the tiles; every tile is hit */
    for (int64_t r = 0;; r = r + step < t->m ? r + step : t->m - 1) { /* ends with the last row */
        reference_row(t, &x, ldx, &w, t->has_bias ? &b : NULL, &d, &u, scale, gates, r, ref);
        for (int64_t n = 0; n < n_total; ++n) {
            float got = dt == SPM_DTYPE_FLOAT16 ? h2f(yb[r * ldy + n]) : bf2f(yb[r * ldy + n]);
            double err = isfinite(got) ? fabs(got - ref[n]) : INFINITY;
            if (err > max_err) max_err = err;
            if (fabs(ref[n]) > max_ref) max_ref = fabs(ref[n]);
        }
        ++rows_checked;
        if (r == t->m - 1) break;
    }
    double tol = dt == SPM_DTYPE_FLOAT16 ? 4e-3 : 3e-2, rel = max_err / (max_ref > 0 ? max_ref : 1);
    int ok = rel <= tol;

    /* the plan API (create from the desc alone, prepare, execute) runs the same kernels: bit-identical */
    spm_plan_desc pd;
    spm_plan_desc_init(&pd);
    pd.dtype = dt; pd.combine = t->combine; pd.pattern = t->pattern;
    pd.m = t->m; pd.in_features = t->in; pd.out_features = t->out; pd.ldx = ldx; pd.ldy = ldy;
    pd.rows_per_sample = t->rows_per_sample; pd.num_spms = t->k; pd.rank = t->rank; pd.groups = t->groups;
    pd.scale_per_group = t->scale_per_group; pd.has_bias = t->has_bias;
    pd.alignment = 256; /* cuMemAlloc: 256-byte aligned */
    spm_plan *pl = NULL;
    spm_plan_info pinfo;
    spm_plan_info_init(&pinfo);
    CUdeviceptr dy2;
    CU(cu->memAlloc(&dy2, (size_t)(t->m * ldy) * 2));
    CU(cu->memsetD8(dy2, 0xff, (size_t)(t->m * ldy) * 2));
    spm_status pst = spm_plan_create(&pd, &pl);
    if (pst == SPM_OK) pst = spm_plan_get_info(pl, &pinfo);
    if (pst == SPM_OK) pst = spm_plan_prepare(pl, NULL);
    if (pst == SPM_OK) {
        spm_pointers pp;
        spm_pointers_init(&pp);
        pp.x = a.x; pp.weight = a.weight; pp.bias = a.bias; pp.down = a.down; pp.up = a.up; pp.scale = a.scale;
        pp.gates = a.gates; pp.y = (void *)(uintptr_t)dy2; pp.workspace = a.workspace; pp.workspace_bytes = ws;
        pst = spm_plan_execute(pl, &pp, NULL);
    }
    if (pst != SPM_OK) {
        fprintf(stderr, "FAIL %s (plan API): %s: %s\n", t->name, spm_status_string(pst), spm_last_error());
        ok = 0;
    } else {
        CU(cu->ctxSynchronize());
        uint16_t *yb2 = malloc((size_t)(t->m * ldy) * 2);
        CU(cu->memcpyDtoH(yb2, dy2, (size_t)(t->m * ldy) * 2));
        int same = 1;
        for (int64_t r = 0; r < t->m && same; ++r) same = !memcmp(yb + r * ldy, yb2 + r * ldy, (size_t)n_total * 2);
        if (!same || pinfo.forward_variant != plan.forward_variant) {
            fprintf(stderr, "FAIL %s: the plan API's output (variant %d, n_per_prog %d) differs from the one-call "
                    "API's (variant %d)\n", t->name, pinfo.forward_variant, pinfo.n_per_prog, plan.forward_variant);
            ok = 0;
        }
        free(yb2);
    }
    spm_plan_destroy(pl);
    cu->memFree(dy2);
    const spm_library_info *info = spm_kernels_info();
    printf("%s %-44s %s rel err %.2e (tol %.0e, %lld rows) n_per_prog %d via %s%s%s\n", ok ? "ok  " : "FAIL",
           t->name, dt == SPM_DTYPE_FLOAT16 ? "fp16" : "bf16", rel, tol, (long long)rows_checked, pinfo.n_per_prog,
           plan.fused ? "" : info->variants[plan.shrink_variant].name, plan.fused ? "" : " + ",
           info->variants[plan.forward_variant].name);
    if (ok && time_it) {
        CUevent e0, e1;
        CU(cu->eventCreate(&e0, 0));
        CU(cu->eventCreate(&e1, 0));
        float times[21];
        for (int i = 0; i < 5; ++i) spm_gated_linear_forward(NULL, &a);
        for (int rep = 0; rep < 21; ++rep) {
            CU(cu->eventRecord(e0, NULL));
            for (int i = 0; i < 20; ++i) spm_gated_linear_forward(NULL, &a);
            CU(cu->eventRecord(e1, NULL));
            CU(cu->eventSynchronize(e1));
            CU(cu->eventElapsedTime(&times[rep], e0, e1));
        }
        for (int i = 0; i < 21; ++i) /* insertion sort: median and spread */
            for (int j = i; j > 0 && times[j] < times[j - 1]; --j) {
                float tmp = times[j];
                times[j] = times[j - 1];
                times[j - 1] = tmp;
            }
        printf("time %-44s median %.1f us/launch (min %.1f, max %.1f; 21 x 20 launches)\n", t->name,
               times[10] * 1000 / 20, times[0] * 1000 / 20, times[20] * 1000 / 20);
    }
    free(yb);
    free(ref);
    free(scale);
    free(gates);
    free16(&x); free16(&w); free16(&b); free16(&d); free16(&u);
    cu->memFree(dscale); cu->memFree(dgates); cu->memFree(dy);
    if (dws) cu->memFree(dws);
    return ok ? 0 : 1;
}

int main(void) {
    const char *why = NULL;
    cu = spm_cuda_driver_get(&why);
    if (!cu) {
        printf("SKIPPED: no usable CUDA driver: %s\n", why);
        return SKIP;
    }
    int count = 0;
    if (cu->deviceGetCount(&count) != CUDA_SUCCESS || count == 0) {
        printf("SKIPPED: the CUDA driver reports no device\n");
        return SKIP;
    }
    int cc = 0;
    if (spm_kernels_device_cc(0, &cc) != SPM_OK) {
        printf("FAIL: spm_kernels_device_cc: %s\n", spm_last_error());
        return 1;
    }
    if (!spm_kernels_arch_for_cc(cc)) {
        printf("SKIPPED: device 0 is sm_%d; this build holds no kernels for it (see SPM_CUDA_ARCHS)\n", cc);
        return SKIP;
    }
    CUdevice dev;
    CUcontext ctx;
    CU(cu->deviceGet(&dev, 0));
    CU(cu->devicePrimaryCtxRetain(&ctx, dev));
    CU(cu->ctxSetCurrent(ctx));
    printf("device 0: sm_%d, running the sm_%d kernels\n", cc, spm_kernels_arch_for_cc(cc));

    const spm_dtype H = SPM_DTYPE_FLOAT16, B = SPM_DTYPE_BFLOAT16;
    const spm_combine L = SPM_COMBINE_LINEAR, O = SPM_COMBINE_OFFICIAL;
    const spm_pattern A = SPM_PATTERN_AUTO, S = SPM_PATTERN_SPLIT;
    test_case cases[] = {
        /* name                                 m  rows/s   in   out pad   K r G bias spg dtype comb pattern */
        {"self-attn 8192x320->320 K=16 bias", 8192, 4096, 320, 320, 0, 16, 1, 1, 1, 0, H, L, A},
        {"self-attn 8192x320->320 K=16 official", 8192, 4096, 320, 320, 0, 16, 1, 1, 0, 0, H, O, A},
        {"self-attn 8192x320->320 K=16 bf16 official", 8192, 4096, 320, 320, 0, 16, 1, 1, 1, 0, B, O, A},
        {"q/k/v groups=3 8192x320->3x320 K=8", 8192, 4096, 320, 320, 0, 8, 1, 3, 0, 1, H, L, A},
        {"q/k/v groups=3 bf16 official K=16", 8192, 4096, 320, 320, 0, 16, 1, 3, 0, 1, B, O, A},
        {"ff 2048x1280->1280 K=32 bias", 2048, 1024, 1280, 1280, 0, 32, 1, 1, 1, 0, H, L, A},
        {"ff GEGLU in 2048x640->5120 K=16 (N loop)", 2048, 1024, 640, 5120, 0, 16, 1, 1, 1, 0, H, L, A},
        {"ff GEGLU in bf16 official 8192x320->2560 K=48", 8192, 4096, 320, 2560, 0, 48, 1, 1, 1, 0, B, O, A},
        {"split K=64 4096x640->640 official bias", 4096, 2048, 640, 640, 0, 64, 1, 1, 1, 0, H, O, A},
        {"split K=100 bf16 2048x320->320", 2048, 1024, 320, 320, 0, 100, 1, 1, 1, 0, B, L, A},
        {"split forced K=16 groups=3", 2048, 1024, 320, 320, 0, 16, 1, 3, 1, 1, H, O, S},
        {"cross-attn k/v 154x768->320 K=4", 154, 77, 768, 320, 0, 4, 1, 1, 0, 0, H, L, A},
        {"generic 1000x300->200 ldx+4 K=5 bias", 1000, 500, 300, 200, 4, 5, 1, 1, 1, 0, H, O, A},
        {"generic bf16 999x72->100 K=3", 999, 333, 72, 100, 1, 3, 1, 1, 1, 0, B, L, A},
    };
    int failures = 0;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i) failures += run_case(&cases[i], i == 0);
    printf("%d cases, %d failed\n", (int)(sizeof cases / sizeof cases[0]), failures);
    return failures ? 1 : 0;
}
