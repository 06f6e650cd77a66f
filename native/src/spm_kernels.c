/* libspm_kernels runtime: argument checks, variant choice, module cache, launches (see spm_kernels.h).
 *
 * The variant picker mirrors the Triton launcher in kernels/gated_linear.py (_pick_pattern,
 * _fwd_tiles, _launch_forward, _launch_shrink) with the tuning constants aot.py copied into
 * spm_kernel_args.h, restricted to the tiles that were compiled (aot.py's variant set). */
#define _GNU_SOURCE
#include "spm_internal.h"

#include "cuda_driver.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef SPM_KERNELS_VERSION
#define SPM_KERNELS_VERSION "0.0.0"
#endif
#define SPM_MAX_CONTEXTS 16

/* ------------------------------------------------------------------------------------------- */
/* Errors */

static __thread char t_last_error[1024];

static spm_status fail(spm_status st, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t_last_error, sizeof t_last_error, fmt, ap);
    va_end(ap);
    return st;
}

const char *spm_last_error(void) { return t_last_error; }

const char *spm_status_string(spm_status status) {
    switch (status) {
    case SPM_OK: return "SPM_OK: success";
    case SPM_ERR_INVALID_ARGUMENT: return "SPM_ERR_INVALID_ARGUMENT: a NULL or out-of-range argument";
    case SPM_ERR_SHAPE: return "SPM_ERR_SHAPE: sizes or strides do not fit together";
    case SPM_ERR_UNSUPPORTED: return "SPM_ERR_UNSUPPORTED: no compiled variant for these arguments";
    case SPM_ERR_TOO_LARGE: return "SPM_ERR_TOO_LARGE: a size above the kernels' 32-bit or grid limits";
    case SPM_ERR_WORKSPACE: return "SPM_ERR_WORKSPACE: the split pattern needs a (larger) workspace";
    case SPM_ERR_NO_DRIVER: return "SPM_ERR_NO_DRIVER: the CUDA driver (libcuda.so.1) is not usable";
    case SPM_ERR_NO_DEVICE: return "SPM_ERR_NO_DEVICE: no CUDA device";
    case SPM_ERR_NO_CONTEXT: return "SPM_ERR_NO_CONTEXT: no current CUDA context on this thread";
    case SPM_ERR_ARCH: return "SPM_ERR_ARCH: no kernels compiled for this GPU architecture";
    case SPM_ERR_CUDA: return "SPM_ERR_CUDA: a CUDA driver call failed";
    case SPM_ERR_INTERNAL: return "SPM_ERR_INTERNAL: internal error";
    }
    return "SPM_ERR_?: unknown status code";
}

/* ------------------------------------------------------------------------------------------- */
/* The variant list and library info */

static pthread_once_t g_info_once = PTHREAD_ONCE_INIT;
static const spm_kernel_variant **g_variants;
static spm_variant_info *g_infos;
static int g_num_variants;
static spm_library_info g_info;
static char *g_info_json;

static int pad16(int n) {
    int p = 16;
    while (p < n) p *= 2;
    return p;
}

static void json_append(char **buf, size_t *len, size_t *cap, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(*buf ? *buf + *len : NULL, *buf ? *cap - *len : 0, fmt, ap);
        va_end(ap);
        if (n < 0) return;
        if (*buf && *len + (size_t)n < *cap) {
            *len += (size_t)n;
            return;
        }
        size_t want = (*cap ? *cap * 2 : 4096) + (size_t)n;
        char *grown = realloc(*buf, want);
        if (!grown) return;
        *buf = grown;
        *cap = want;
    }
}

static const char *combine_name(spm_combine c) {
    return c == SPM_COMBINE_LINEAR ? "linear" : c == SPM_COMBINE_OFFICIAL ? "official" : "any";
}

static void build_info(void) {
    int total = 0;
    for (int t = 0; t < spm_num_variant_tables; ++t) total += *spm_variant_tables[t].count;
    g_variants = calloc((size_t)(total ? total : 1), sizeof *g_variants);
    g_infos = calloc((size_t)(total ? total : 1), sizeof *g_infos);
    if (g_variants && g_infos) {
        for (int t = 0; t < spm_num_variant_tables; ++t)
            for (int i = 0; i < *spm_variant_tables[t].count; ++i) {
                g_variants[g_num_variants] = &spm_variant_tables[t].rows[i];
                g_infos[g_num_variants] = spm_variant_tables[t].rows[i].info;
                ++g_num_variants;
            }
    }
    int max_fused = 0, max_split = 0;
    for (int i = 0; i < g_num_variants; ++i) {
        const spm_variant_info *v = &g_infos[i];
        if (v->kernel == SPM_KERNEL_FWD && v->fused && v->block_r > max_fused) max_fused = v->block_r;
        if (v->kernel == SPM_KERNEL_SHRINK && v->block_r > max_split) max_split = v->block_r;
    }
    g_info.version = SPM_KERNELS_VERSION;
    g_info.triton_version = SPM_TRITON_VERSION;
    g_info.abi_version = SPM_KERNELS_ABI_VERSION;
    g_info.num_archs = spm_num_built_archs;
    g_info.archs = spm_built_archs;
    g_info.num_ranks = spm_num_built_ranks;
    g_info.ranks = spm_built_ranks;
    g_info.max_fused_rank = max_fused;
    g_info.max_split_rank = max_split;
    g_info.num_variants = g_num_variants;
    g_info.variants = g_infos;

    char *b = NULL;
    size_t len = 0, cap = 0;
    json_append(&b, &len, &cap, "{\"version\": \"%s\", \"triton_version\": \"%s\", \"abi_version\": %d, \"archs\": [",
                g_info.version, g_info.triton_version, g_info.abi_version);
    for (int i = 0; i < g_info.num_archs; ++i) json_append(&b, &len, &cap, "%s%d", i ? ", " : "", g_info.archs[i]);
    json_append(&b, &len, &cap, "], \"ranks\": [");
    for (int i = 0; i < g_info.num_ranks; ++i) json_append(&b, &len, &cap, "%s%d", i ? ", " : "", g_info.ranks[i]);
    json_append(&b, &len, &cap, "], \"dtypes\": [\"float16\", \"bfloat16\"], \"max_fused_rank\": %d, "
                "\"max_split_rank\": %d, \"variants\": [", max_fused, max_split);
    for (int i = 0; i < g_num_variants; ++i) {
        const spm_variant_info *v = &g_infos[i];
        json_append(&b, &len, &cap,
                    "%s\n  {\"name\": \"%s\", \"kernel\": \"%s\", \"arch\": %d, \"dtype\": \"%s\", \"fused\": %s, "
                    "\"combine\": \"%s\", \"rank\": %d, \"has_bias\": %s, \"aligned\": %s, \"block_m\": %d, "
                    "\"block_n\": %d, \"block_k\": %d, \"block_r\": %d, \"num_warps\": %d, \"num_stages\": %d, "
                    "\"shared_bytes\": %d, \"cubin_bytes\": %zu}",
                    i ? "," : "", v->name, v->kernel == SPM_KERNEL_FWD ? "forward" : "shrink", v->arch,
                    v->dtype == SPM_DTYPE_FLOAT16 ? "float16" : "bfloat16", v->fused ? "true" : "false",
                    combine_name(v->combine), v->rank, v->has_bias ? "true" : "false",
                    v->aligned ? "true" : "false", v->block_m, v->block_n, v->block_k, v->block_r, v->num_warps,
                    v->num_stages, v->shared_bytes, v->cubin_bytes);
    }
    json_append(&b, &len, &cap, "]}");
    g_info_json = b;
}

const spm_library_info *spm_kernels_info(void) {
    pthread_once(&g_info_once, build_info);
    return &g_info;
}

const char *spm_kernels_info_json(void) {
    pthread_once(&g_info_once, build_info);
    return g_info_json ? g_info_json : "{}";
}

int spm_kernels_abi_version(void) { return SPM_KERNELS_ABI_VERSION; }
size_t spm_gated_linear_args_size(void) { return sizeof(spm_gated_linear_args); }

const spm_kernel_variant *spm__variant(int index) {
    pthread_once(&g_info_once, build_info);
    return index >= 0 && index < g_num_variants ? g_variants[index] : NULL;
}

int spm_kernels_arch_for_cc(int cc) {
    /* Triton compiles capability >= 90 as the arch-specific sm_XXa, which runs only on that exact
     * capability; sm_80/sm_86/sm_89 cubins run on the same major with an equal or higher minor. */
    int best = 0;
    for (int i = 0; i < spm_num_built_archs; ++i) {
        int a = spm_built_archs[i];
        int ok = a >= 90 ? a == cc : (a / 10 == cc / 10 && a <= cc);
        if (ok && a > best) best = a;
    }
    return best;
}

static void built_archs_text(char *buf, size_t len) {
    size_t used = 0;
    buf[0] = 0;
    for (int i = 0; i < spm_num_built_archs && used < len; ++i)
        used += (size_t)snprintf(buf + used, len - used, "%ssm_%d", i ? ", " : "", spm_built_archs[i]);
}

/* ------------------------------------------------------------------------------------------- */
/* Validation and the plan */

typedef struct derived {
    int kr, fused, aligned, block_m_wanted;
    int64_t ldc;
} derived;

#define I32_MAX 2147483647LL

static int misaligned(const void *p, size_t bytes) { return p && ((uintptr_t)p % bytes) != 0; }

static spm_status validate(const spm_gated_linear_args *a, derived *d) {
    if (!a) return fail(SPM_ERR_INVALID_ARGUMENT, "args is NULL");
    if (a->dtype != SPM_DTYPE_FLOAT16 && a->dtype != SPM_DTYPE_BFLOAT16)
        return fail(SPM_ERR_INVALID_ARGUMENT, "dtype %d is not SPM_DTYPE_FLOAT16 (0) or SPM_DTYPE_BFLOAT16 (1)",
                    (int)a->dtype);
    if (a->combine != SPM_COMBINE_LINEAR && a->combine != SPM_COMBINE_OFFICIAL)
        return fail(SPM_ERR_INVALID_ARGUMENT, "combine %d is not SPM_COMBINE_LINEAR (0) or SPM_COMBINE_OFFICIAL (1)",
                    (int)a->combine);
    if (a->pattern != SPM_PATTERN_AUTO && a->pattern != SPM_PATTERN_FUSED && a->pattern != SPM_PATTERN_SPLIT)
        return fail(SPM_ERR_INVALID_ARGUMENT, "pattern %d is not AUTO (0), FUSED (1) or SPLIT (2)", (int)a->pattern);
    if (a->scale_per_group != 0 && a->scale_per_group != 1)
        return fail(SPM_ERR_INVALID_ARGUMENT, "scale_per_group must be 0 or 1, got %d", (int)a->scale_per_group);
    struct { const char *name; int64_t v; int64_t lo; } sizes[] = {
        {"m", a->m, 0}, {"in_features", a->in_features, 1}, {"out_features", a->out_features, 1},
        {"ldx", a->ldx, 1}, {"ldy", a->ldy, 1}, {"rows_per_sample", a->rows_per_sample, 1},
        {"num_spms", a->num_spms, 1}, {"rank", a->rank, 1}, {"groups", a->groups, 1},
    };
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; ++i) {
        if (sizes[i].v < sizes[i].lo)
            return fail(SPM_ERR_SHAPE, "%s must be >= %lld, got %lld", sizes[i].name, (long long)sizes[i].lo,
                        (long long)sizes[i].v);
        if (sizes[i].v > I32_MAX)
            return fail(SPM_ERR_TOO_LARGE, "%s = %lld exceeds the kernels' int32 arguments", sizes[i].name,
                        (long long)sizes[i].v);
    }
    /* every product below is of two values <= INT32_MAX: no int64 overflow */
    int64_t kr = (int64_t)a->num_spms * a->rank;
    int64_t n_total = (int64_t)a->groups * a->out_features;
    int64_t gkr = (int64_t)a->groups * kr;
    if (kr > I32_MAX || n_total > I32_MAX || gkr > I32_MAX || kr * a->in_features > I32_MAX)
        return fail(SPM_ERR_TOO_LARGE, "groups*out (%lld), K*rank (%lld) or K*rank*in (%lld) exceed int32",
                    (long long)n_total, (long long)kr, (long long)(kr * a->in_features));
    if (a->groups > 65535) return fail(SPM_ERR_TOO_LARGE, "groups = %d exceeds 65535 (a grid dimension)", a->groups);
    if (a->ldx < a->in_features)
        return fail(SPM_ERR_SHAPE, "ldx (%lld) < in_features (%lld)", (long long)a->ldx, (long long)a->in_features);
    if (a->ldy < n_total)
        return fail(SPM_ERR_SHAPE, "ldy (%lld) < groups*out_features (%lld)", (long long)a->ldy, (long long)n_total);
    if (a->m % a->rows_per_sample)
        return fail(SPM_ERR_SHAPE, "%lld rows do not split into samples of %lld rows", (long long)a->m,
                    (long long)a->rows_per_sample);
    int rank_ok = 0;
    for (int i = 0; i < spm_num_built_ranks; ++i) rank_ok |= spm_built_ranks[i] == a->rank;
    if (!rank_ok)
        return fail(SPM_ERR_UNSUPPORTED, "rank %d has no compiled variants (rebuild with -DSPM_RANKS=\"1;%d\")",
                    a->rank, a->rank);

    d->kr = (int)kr;
    if (a->pattern == SPM_PATTERN_AUTO) d->fused = pad16(d->kr) <= SPM_FUSED_MAX_RANK;
    else d->fused = a->pattern == SPM_PATTERN_FUSED;
    d->ldc = (gkr + 15) / 16 * 16; /* workspace row stride: a multiple of 16 elements */
    /* row offsets are int64 in the kernels; only the workspace row stride must fit int32 */
    if (d->ldc > I32_MAX) return fail(SPM_ERR_TOO_LARGE, "workspace row stride exceeds int32");
    d->block_m_wanted = a->m >= SPM_FWD_SMALL_M_BELOW ? SPM_FWD_BLOCK_M : SPM_FWD_BLOCK_M_SMALL;

    if (a->m > 0) {
        struct { const char *name; const void *p; size_t elem; } ptrs[] = {
            {"x", a->x, 2}, {"weight", a->weight, 2}, {"down", a->down, 2}, {"up", a->up, 2},
            {"scale", a->scale, 4}, {"gates", a->gates, 4}, {"y", a->y, 2},
        };
        for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; ++i) {
            if (!ptrs[i].p) return fail(SPM_ERR_INVALID_ARGUMENT, "%s is NULL", ptrs[i].name);
            if (misaligned(ptrs[i].p, ptrs[i].elem))
                return fail(SPM_ERR_INVALID_ARGUMENT, "%s (%p) is not aligned to its %zu-byte elements",
                            ptrs[i].name, ptrs[i].p, ptrs[i].elem);
        }
        if (misaligned(a->bias, 2)) return fail(SPM_ERR_INVALID_ARGUMENT, "bias is not 2-byte aligned");
    }
    /* the "aligned" variants' assumptions (Triton divisibility-16 specialisation); EVEN_K is
     * checked per variant (in % block_k) */
    d->aligned = a->out_features % 16 == 0 && a->ldx % 16 == 0 && a->ldy % 16 == 0 && a->in_features % 16 == 0 &&
                 !misaligned(a->x, 16) && !misaligned(a->weight, 16) && !misaligned(a->bias, 16) &&
                 !misaligned(a->down, 16) && !misaligned(a->up, 16) && !misaligned(a->scale, 16) &&
                 !misaligned(a->gates, 16) && !misaligned(a->y, 16);
    return SPM_OK;
}

/* Best variant: hard constraints, then the smallest BLOCK_R >= K*r (gating kernels), then aligned
 * over generic, then the wanted BLOCK_M. Returns the index or -1. */
static int pick(spm_kernel_kind kernel, int arch, const spm_gated_linear_args *a, const derived *d, int fused) {
    int best = -1;
    long best_key = 0;
    for (int i = 0; i < g_num_variants; ++i) {
        const spm_variant_info *v = &g_infos[i];
        if (v->kernel != kernel || v->arch != arch || v->dtype != a->dtype) continue;
        int gating = kernel == SPM_KERNEL_SHRINK || fused;
        if (kernel == SPM_KERNEL_FWD && (v->fused != fused || v->has_bias != (a->bias != NULL))) continue;
        if (gating && (v->combine != a->combine || v->rank != a->rank || v->block_r < d->kr)) continue;
        if (v->aligned && !(d->aligned && a->in_features % v->block_k == 0 && (v->aligned < 2 || d->kr % 16 == 0)))
            continue;
        long key = (gating ? (long)v->block_r * 4 : 0) + (v->aligned ? 0 : 2) + (v->block_m == d->block_m_wanted ? 0 : 1);
        if (best < 0 || key < best_key) best = i, best_key = key;
    }
    return best;
}

static unsigned int cdiv(int64_t a, int64_t b) { return (unsigned int)((a + b - 1) / b); }

static spm_status make_plan(const spm_gated_linear_args *a, int arch, spm_launch_plan *plan, derived *d) {
    pthread_once(&g_info_once, build_info);
    spm_status st = validate(a, d);
    if (st != SPM_OK) return st;
    memset(plan, 0, sizeof *plan);
    plan->fused = d->fused;
    plan->shrink_variant = -1;
    int known = 0;
    for (int i = 0; i < spm_num_built_archs; ++i) known |= spm_built_archs[i] == arch;
    if (!known) {
        char archs[128];
        built_archs_text(archs, sizeof archs);
        return fail(SPM_ERR_ARCH, "no kernels for sm_%d in this build (built: %s); rebuild with "
                    "-DSPM_CUDA_ARCHS=\"...;%d\"", arch, archs, arch);
    }
    if (d->fused) {
        plan->forward_variant = pick(SPM_KERNEL_FWD, arch, a, d, 1);
        if (plan->forward_variant < 0)
            return fail(SPM_ERR_UNSUPPORTED, "no fused variant for K*rank = %d (the fused pattern serves K*rank <= %d;"
                        " use SPM_PATTERN_AUTO or SPLIT)", d->kr, g_info.max_fused_rank);
    } else {
        plan->shrink_variant = pick(SPM_KERNEL_SHRINK, arch, a, d, 0);
        if (plan->shrink_variant < 0)
            return fail(SPM_ERR_UNSUPPORTED, "no shrink variant for K*rank = %d (compiled up to %d)", d->kr,
                        g_info.max_split_rank);
        plan->forward_variant = pick(SPM_KERNEL_FWD, arch, a, d, 0);
        if (plan->forward_variant < 0) return fail(SPM_ERR_INTERNAL, "no split forward variant in this build");
        const spm_variant_info *s = &g_infos[plan->shrink_variant];
        plan->shrink_grid[0] = cdiv(a->m, s->block_m);
        plan->shrink_grid[1] = (unsigned int)a->groups;
        plan->shrink_grid[2] = 1;
        plan->workspace_bytes = (size_t)a->m * (size_t)d->ldc * 2u;
    }
    const spm_variant_info *f = &g_infos[plan->forward_variant];
    int64_t m_tiles = (a->m + f->block_m - 1) / f->block_m;
    if (m_tiles > 65535)  /* CUDA's limit on grid dimension 1 (row blocks on axis 1, as the Triton launcher) */
        return fail(SPM_ERR_TOO_LARGE, "%lld rows need %lld row blocks of %d; at most 65535 per launch: split x",
                    (long long)a->m, (long long)m_tiles, f->block_m);
    plan->forward_grid[0] = (unsigned int)a->groups * cdiv(a->out_features, f->block_n);
    plan->forward_grid[1] = (unsigned int)m_tiles;
    plan->forward_grid[2] = 1;
    return SPM_OK;
}

spm_status spm_gated_linear_plan(const spm_gated_linear_args *args, int arch, spm_launch_plan *plan) {
    if (!plan) return fail(SPM_ERR_INVALID_ARGUMENT, "plan is NULL");
    derived d;
    return make_plan(args, arch, plan, &d);
}

spm_status spm_gated_linear_workspace_size(const spm_gated_linear_args *args, size_t *bytes) {
    if (!bytes) return fail(SPM_ERR_INVALID_ARGUMENT, "bytes is NULL");
    derived d;
    spm_status st = validate(args, &d);
    if (st != SPM_OK) return st;
    *bytes = d.fused ? 0 : (size_t)args->m * (size_t)d.ldc * 2u;
    return SPM_OK;
}

/* ------------------------------------------------------------------------------------------- */
/* Driver, contexts and modules */

typedef struct ctx_entry {
    CUcontext ctx;
    int cc, arch, shared_optin;
    CUfunction *functions; /* per variant, loaded on first use */
} ctx_entry;

static pthread_mutex_t g_ctx_lock = PTHREAD_MUTEX_INITIALIZER;
static ctx_entry g_ctx[SPM_MAX_CONTEXTS];

static spm_status driver(const spm_cuda_driver **out) {
    const char *why = NULL;
    const spm_cuda_driver *cu = spm_cuda_driver_get(&why);
    if (!cu) {
        int rc = spm_cuda_driver_init_result();
        if (rc == CUDA_ERROR_NO_DEVICE) return fail(SPM_ERR_NO_DEVICE, "%s", why);
        return fail(SPM_ERR_NO_DRIVER, "%s", why);
    }
    *out = cu;
    return SPM_OK;
}

spm_status spm_kernels_init(void) {
    const spm_cuda_driver *cu;
    spm_status st = driver(&cu);
    if (st != SPM_OK) return st;
    int n = 0;
    CUresult rc = cu->deviceGetCount(&n);
    if (rc != CUDA_SUCCESS) {
        spm_cuda_error_text(cu, rc, "cuDeviceGetCount", t_last_error, sizeof t_last_error);
        return SPM_ERR_CUDA;
    }
    if (n == 0) return fail(SPM_ERR_NO_DEVICE, "the CUDA driver reports no device");
    return SPM_OK;
}

spm_status spm_kernels_device_cc(int ordinal, int *cc) {
    if (!cc) return fail(SPM_ERR_INVALID_ARGUMENT, "cc is NULL");
    const spm_cuda_driver *cu;
    spm_status st = driver(&cu);
    if (st != SPM_OK) return st;
    CUdevice dev;
    int major = 0, minor = 0;
    CUresult rc = cu->deviceGet(&dev, ordinal);
    if (rc == CUDA_SUCCESS) rc = cu->deviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev);
    if (rc == CUDA_SUCCESS) rc = cu->deviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev);
    if (rc != CUDA_SUCCESS) {
        spm_cuda_error_text(cu, rc, "cuDeviceGet/cuDeviceGetAttribute", t_last_error, sizeof t_last_error);
        return rc == CUDA_ERROR_INVALID_DEVICE ? SPM_ERR_NO_DEVICE : SPM_ERR_CUDA;
    }
    *cc = major * 10 + minor;
    return SPM_OK;
}

static spm_status cuda_fail(const spm_cuda_driver *cu, CUresult rc, const char *call) {
    spm_cuda_error_text(cu, rc, call, t_last_error, sizeof t_last_error);
    return SPM_ERR_CUDA;
}

/* The entry of the current context (created on first use); called with g_ctx_lock held. */
static spm_status current_entry(const spm_cuda_driver *cu, ctx_entry **out) {
    CUcontext ctx = NULL;
    CUresult rc = cu->ctxGetCurrent(&ctx);
    if (rc != CUDA_SUCCESS) return cuda_fail(cu, rc, "cuCtxGetCurrent");
    if (!ctx)
        return fail(SPM_ERR_NO_CONTEXT, "no current CUDA context on this thread (make one current: "
                    "cudaSetDevice()+cudaFree(0), or cuCtxSetCurrent())");
    for (int i = 0; i < SPM_MAX_CONTEXTS; ++i)
        if (g_ctx[i].ctx == ctx) {
            *out = &g_ctx[i];
            return SPM_OK;
        }
    int slot = -1;
    for (int i = 0; i < SPM_MAX_CONTEXTS && slot < 0; ++i)
        if (!g_ctx[i].ctx) slot = i;
    if (slot < 0) return fail(SPM_ERR_INTERNAL, "more than %d CUDA contexts used", SPM_MAX_CONTEXTS);
    CUdevice dev;
    int major = 0, minor = 0, optin = 0;
    if ((rc = cu->ctxGetDevice(&dev)) != CUDA_SUCCESS) return cuda_fail(cu, rc, "cuCtxGetDevice");
    if ((rc = cu->deviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)) != CUDA_SUCCESS ||
        (rc = cu->deviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)) != CUDA_SUCCESS ||
        (rc = cu->deviceGetAttribute(&optin, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev)) !=
            CUDA_SUCCESS)
        return cuda_fail(cu, rc, "cuDeviceGetAttribute");
    CUfunction *fns = calloc((size_t)(g_num_variants ? g_num_variants : 1), sizeof *fns);
    if (!fns) return fail(SPM_ERR_INTERNAL, "out of host memory");
    g_ctx[slot].ctx = ctx;
    g_ctx[slot].cc = major * 10 + minor;
    g_ctx[slot].arch = spm_kernels_arch_for_cc(major * 10 + minor);
    g_ctx[slot].shared_optin = optin;
    g_ctx[slot].functions = fns;
    *out = &g_ctx[slot];
    return SPM_OK;
}

/* Load variant `i` into the entry's context (once); called with g_ctx_lock held. */
static spm_status function_of(const spm_cuda_driver *cu, ctx_entry *e, int i, CUfunction *out) {
    if (e->functions[i]) {
        *out = e->functions[i];
        return SPM_OK;
    }
    const spm_kernel_variant *v = g_variants[i];
    CUmodule mod;
    CUfunction fn;
    CUresult rc = cu->moduleLoadData(&mod, v->image);
    if (rc != CUDA_SUCCESS) {
        spm_status st = cuda_fail(cu, rc, "cuModuleLoadData");
        size_t n = strlen(t_last_error);
        snprintf(t_last_error + n, sizeof t_last_error - n, " [variant %s on sm_%d]", v->info.name, e->cc);
        return st;
    }
    if ((rc = cu->moduleGetFunction(&fn, mod, v->function)) != CUDA_SUCCESS)
        return cuda_fail(cu, rc, "cuModuleGetFunction");
    int shared = v->info.shared_bytes;
    if (shared > e->shared_optin)
        return fail(SPM_ERR_UNSUPPORTED, "variant %s needs %d bytes of shared memory; the device allows %d",
                    v->info.name, shared, e->shared_optin);
    if (shared > 49152) { /* as Triton's launcher: opt in to more than 48 KiB of dynamic shared memory */
        int shared_static = 0;
        if ((rc = cu->funcSetCacheConfig(fn, CU_FUNC_CACHE_PREFER_SHARED)) != CUDA_SUCCESS)
            return cuda_fail(cu, rc, "cuFuncSetCacheConfig");
        if ((rc = cu->funcGetAttribute(&shared_static, CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, fn)) != CUDA_SUCCESS)
            return cuda_fail(cu, rc, "cuFuncGetAttribute");
        if ((rc = cu->funcSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                       e->shared_optin - shared_static)) != CUDA_SUCCESS)
            return cuda_fail(cu, rc, "cuFuncSetAttribute");
    }
    e->functions[i] = fn;
    *out = fn;
    return SPM_OK;
}

/* ------------------------------------------------------------------------------------------- */
/* Launch */

typedef union arg_value {
    CUdeviceptr ptr;
    int32_t i32;
} arg_value;

static CUdeviceptr dp(const void *p) { return (CUdeviceptr)(uintptr_t)p; }

static spm_status launch(const spm_cuda_driver *cu, CUfunction fn, const spm_kernel_variant *v,
                         const unsigned int grid[3], arg_value *values, CUstream stream) {
    void *params[96];
    CUdeviceptr scratch[2] = {0, 0}; /* Triton's global / profile scratch: unused by these kernels */
    if (v->num_params + 2 > (int)(sizeof params / sizeof params[0])) return fail(SPM_ERR_INTERNAL, "too many params");
    for (int i = 0; i < v->num_params; ++i) params[i] = &values[v->params[i]];
    params[v->num_params] = &scratch[0];
    params[v->num_params + 1] = &scratch[1];
    CUresult rc = cu->launchKernel(fn, grid[0], grid[1], grid[2], 32u * (unsigned)v->info.num_warps, 1, 1,
                                   (unsigned)v->info.shared_bytes, stream, params, NULL);
    if (rc != CUDA_SUCCESS) {
        spm_status st = cuda_fail(cu, rc, "cuLaunchKernel");
        size_t n = strlen(t_last_error);
        snprintf(t_last_error + n, sizeof t_last_error - n, " [variant %s]", v->info.name);
        return st;
    }
    return SPM_OK;
}

spm_status spm_gated_linear_forward(spm_stream stream, const spm_gated_linear_args *a) {
    pthread_once(&g_info_once, build_info);
    derived d;
    spm_launch_plan plan;
    /* shapes first (no driver needed), against any built arch, so argument errors come first */
    spm_status st = validate(a, &d);
    if (st != SPM_OK) return st;
    if (a->m == 0) return SPM_OK;
    const spm_cuda_driver *cu;
    if ((st = driver(&cu)) != SPM_OK) return st;

    pthread_mutex_lock(&g_ctx_lock);
    ctx_entry *e = NULL;
    CUfunction f_shrink = NULL, f_fwd = NULL;
    st = current_entry(cu, &e);
    if (st == SPM_OK && e->arch == 0) {
        char archs[128];
        built_archs_text(archs, sizeof archs);
        st = fail(SPM_ERR_ARCH, "the current device is sm_%d; this library holds kernels for %s only "
                  "(rebuild with -DSPM_CUDA_ARCHS=\"...;%d\")", e->cc, archs, e->cc);
    }
    if (st == SPM_OK) st = make_plan(a, e->arch, &plan, &d);
    if (st == SPM_OK && !plan.fused) {
        if (!a->workspace || a->workspace_bytes < plan.workspace_bytes)
            st = fail(SPM_ERR_WORKSPACE, "the split pattern needs a workspace of %zu bytes (got %zu at %p)",
                      plan.workspace_bytes, a->workspace ? a->workspace_bytes : (size_t)0, a->workspace);
        else if (misaligned(a->workspace, 16))
            st = fail(SPM_ERR_WORKSPACE, "workspace %p is not 16-byte aligned", a->workspace);
        else
            st = function_of(cu, e, plan.shrink_variant, &f_shrink);
    }
    if (st == SPM_OK) st = function_of(cu, e, plan.forward_variant, &f_fwd);
    pthread_mutex_unlock(&g_ctx_lock);
    if (st != SPM_OK) return st;

    const int32_t K = a->num_spms, IN = (int32_t)a->in_features, N = (int32_t)a->out_features;
    const int32_t stride_sg = a->scale_per_group ? K : 0; /* 0: one scale vector shared by the groups */
    const CUdeviceptr bias = a->bias ? dp(a->bias) : dp(a->x); /* unused when HAS_BIAS is off */
    if (!plan.fused) {
        const spm_kernel_variant *v = g_variants[plan.shrink_variant];
        arg_value s[SPM_SHRINK_NUM_ARGS];
        memset(s, 0, sizeof s);
        s[SPM_SHRINK_ARG_a_ptr].ptr = dp(a->x);           /* [M, in], shared by the groups */
        s[SPM_SHRINK_ARG_b_ptr].ptr = dp(a->down);        /* [G*KR, in] */
        s[SPM_SHRINK_ARG_scale_ptr].ptr = dp(a->scale);   /* [K] or [G*K] */
        s[SPM_SHRINK_ARG_gates_ptr].ptr = dp(a->gates);   /* [B, K] */
        s[SPM_SHRINK_ARG_c_ptr].ptr = dp(a->workspace);   /* [M, G*KR], row stride ldc */
        s[SPM_SHRINK_ARG_M].i32 = (int32_t)a->m;
        s[SPM_SHRINK_ARG_KRED].i32 = IN;
        s[SPM_SHRINK_ARG_KR].i32 = d.kr;
        s[SPM_SHRINK_ARG_rows_per_sample].i32 = (int32_t)a->rows_per_sample;
        s[SPM_SHRINK_ARG_tiles_per_sample].i32 = (int32_t)cdiv(a->rows_per_sample, v->info.block_m);
        s[SPM_SHRINK_ARG_stride_ab].i32 = 0;
        s[SPM_SHRINK_ARG_stride_am].i32 = (int32_t)a->ldx;
        s[SPM_SHRINK_ARG_stride_ak].i32 = 1;
        s[SPM_SHRINK_ARG_stride_ag].i32 = 0;
        s[SPM_SHRINK_ARG_stride_br].i32 = IN;
        s[SPM_SHRINK_ARG_stride_bk].i32 = 1;
        s[SPM_SHRINK_ARG_stride_bg].i32 = d.kr * IN;
        s[SPM_SHRINK_ARG_stride_sg].i32 = stride_sg;
        s[SPM_SHRINK_ARG_stride_gb].i32 = K;
        s[SPM_SHRINK_ARG_stride_gk].i32 = 1;
        s[SPM_SHRINK_ARG_stride_cm].i32 = (int32_t)d.ldc;
        s[SPM_SHRINK_ARG_stride_cr].i32 = 1;
        if ((st = launch(cu, f_shrink, v, plan.shrink_grid, s, (CUstream)stream)) != SPM_OK) return st;
    }
    const spm_kernel_variant *v = g_variants[plan.forward_variant];
    arg_value f[SPM_FWD_NUM_ARGS];
    memset(f, 0, sizeof f);
    f[SPM_FWD_ARG_x_ptr].ptr = dp(a->x);          /* [M, in], row stride ldx */
    f[SPM_FWD_ARG_w_ptr].ptr = dp(a->weight);     /* [G*N, in] */
    f[SPM_FWD_ARG_bias_ptr].ptr = bias;           /* [G*N] */
    f[SPM_FWD_ARG_down_ptr].ptr = dp(a->down);    /* [G*KR, in] */
    f[SPM_FWD_ARG_up_ptr].ptr = dp(a->up);        /* [G*N, KR] */
    f[SPM_FWD_ARG_scale_ptr].ptr = dp(a->scale);
    f[SPM_FWD_ARG_gates_ptr].ptr = dp(a->gates);
    f[SPM_FWD_ARG_c_ptr].ptr = plan.fused ? dp(a->y) : dp(a->workspace); /* c is not stored when fused */
    f[SPM_FWD_ARG_y_ptr].ptr = dp(a->y);          /* [M, G*N], row stride ldy */
    f[SPM_FWD_ARG_M].i32 = (int32_t)a->m;
    f[SPM_FWD_ARG_N].i32 = N;
    f[SPM_FWD_ARG_IN].i32 = IN;
    f[SPM_FWD_ARG_KR].i32 = d.kr;
    f[SPM_FWD_ARG_rows_per_sample].i32 = (int32_t)a->rows_per_sample;
    f[SPM_FWD_ARG_tiles_per_sample].i32 = (int32_t)cdiv(a->rows_per_sample, v->info.block_m);
    f[SPM_FWD_ARG_stride_xb].i32 = 0;
    f[SPM_FWD_ARG_stride_xm].i32 = (int32_t)a->ldx;
    f[SPM_FWD_ARG_stride_xk].i32 = 1;
    f[SPM_FWD_ARG_stride_wn].i32 = IN;
    f[SPM_FWD_ARG_stride_wk].i32 = 1;
    f[SPM_FWD_ARG_stride_dr].i32 = IN;
    f[SPM_FWD_ARG_stride_dk].i32 = 1;
    f[SPM_FWD_ARG_stride_un].i32 = d.kr;
    f[SPM_FWD_ARG_stride_ur].i32 = 1;
    f[SPM_FWD_ARG_stride_sg].i32 = stride_sg;
    f[SPM_FWD_ARG_stride_gb].i32 = K;
    f[SPM_FWD_ARG_stride_gk].i32 = 1;
    f[SPM_FWD_ARG_stride_cm].i32 = plan.fused ? 0 : (int32_t)d.ldc;
    f[SPM_FWD_ARG_stride_cr].i32 = 1;
    f[SPM_FWD_ARG_stride_yb].i32 = 0;
    f[SPM_FWD_ARG_stride_ym].i32 = (int32_t)a->ldy;
    f[SPM_FWD_ARG_stride_yn].i32 = 1;
    return launch(cu, f_fwd, v, plan.forward_grid, f, (CUstream)stream);
}
