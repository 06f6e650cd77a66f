/* libspm_kernels runtime: plans (validation, variant choice), module loading, launches (see
 * spm_kernels.h).
 *
 * The picker applies kernels/tiles.py's rule (plan_forward) to the table native/aot.py generated
 * from it (spm_tile_table.h): the same tile row, pattern, BLOCK_R, N tiles per program and grid as
 * the Triton launcher, looked up among the compiled variants by exact match. Shapes the aligned
 * (specialised) variants cannot take run the masked "generic" split variants instead. */
#define _GNU_SOURCE
#include "spm_internal.h"
#include "spm_tile_table.h"

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
#define I32_MAX 2147483647LL

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
    case SPM_ERR_NOT_PREPARED: return "SPM_ERR_NOT_PREPARED: the plan is not prepared for this stream's context";
    case SPM_ERR_VERSION: return "SPM_ERR_VERSION: unknown struct_size or version";
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
/* Plans: validation and the variant choice (no driver) */

typedef union arg_value {
    CUdeviceptr ptr;
    int32_t i32;
} arg_value;

typedef struct plan_core {
    spm_plan_desc d;       /* normalised copy */
    int kr, fused, n_per_prog, arch, sm_count;
    int64_t ldc;           /* workspace row stride (elements) */
    int32_t stride_gb;     /* gates row stride (0: broadcast) */
    size_t min_align;      /* pointer alignment execute checks (>= element size) */
    int shrink_variant, forward_variant;
    unsigned int shrink_grid[3], forward_grid[3];
    size_t workspace_bytes;
    arg_value shrink_args[SPM_SHRINK_NUM_ARGS]; /* every argument but the pointers */
    arg_value fwd_args[SPM_FWD_NUM_ARGS];
} plan_core;

struct spm_plan {
    plan_core core;
    /* prepare: the context the modules live in (handle and, where the driver has cuCtxGetId, ID) */
    CUcontext ctx;
    unsigned long long ctx_id;
    int prepared;
    CUmodule modules[2];
    CUfunction f_shrink, f_fwd;
};

static int pow2(uint32_t v) { return v && !(v & (v - 1)); }

/* Checks of the desc that need no variant table. */
static spm_status validate_desc(const spm_plan_desc *d) {
    if (!d) return fail(SPM_ERR_INVALID_ARGUMENT, "desc is NULL");
    if (d->struct_size != sizeof(spm_plan_desc) || d->version != SPM_PLAN_DESC_VERSION)
        return fail(SPM_ERR_VERSION, "spm_plan_desc has struct_size %zu / version %d; this library knows %zu / %d "
                    "(initialise it with spm_plan_desc_init)", d->struct_size, (int)d->version,
                    sizeof(spm_plan_desc), SPM_PLAN_DESC_VERSION);
    if (d->dtype != SPM_DTYPE_FLOAT16 && d->dtype != SPM_DTYPE_BFLOAT16)
        return fail(SPM_ERR_INVALID_ARGUMENT, "dtype %d is not SPM_DTYPE_FLOAT16 (0) or SPM_DTYPE_BFLOAT16 (1)",
                    (int)d->dtype);
    if (d->combine != SPM_COMBINE_LINEAR && d->combine != SPM_COMBINE_OFFICIAL)
        return fail(SPM_ERR_INVALID_ARGUMENT, "combine %d is not SPM_COMBINE_LINEAR (0) or SPM_COMBINE_OFFICIAL (1)",
                    (int)d->combine);
    if (d->pattern != SPM_PATTERN_AUTO && d->pattern != SPM_PATTERN_FUSED && d->pattern != SPM_PATTERN_SPLIT)
        return fail(SPM_ERR_INVALID_ARGUMENT, "pattern %d is not AUTO (0), FUSED (1) or SPLIT (2)", (int)d->pattern);
    if (d->scale_per_group != 0 && d->scale_per_group != 1)
        return fail(SPM_ERR_INVALID_ARGUMENT, "scale_per_group must be 0 or 1, got %d", (int)d->scale_per_group);
    if ((d->has_bias != 0 && d->has_bias != 1) || (d->gates_broadcast != 0 && d->gates_broadcast != 1))
        return fail(SPM_ERR_INVALID_ARGUMENT, "has_bias and gates_broadcast must be 0 or 1");
    if (d->alignment && !pow2(d->alignment))
        return fail(SPM_ERR_INVALID_ARGUMENT, "alignment %u is not a power of two", d->alignment);
    if (d->arch < 0 || d->sm_count < 0)
        return fail(SPM_ERR_INVALID_ARGUMENT, "arch and sm_count must be >= 0 (0: the current device)");
    struct { const char *name; int64_t v; int64_t lo; } sizes[] = {
        {"m", d->m, 0}, {"in_features", d->in_features, 1}, {"out_features", d->out_features, 1},
        {"ldx", d->ldx, 1}, {"ldy", d->ldy, 1}, {"rows_per_sample", d->rows_per_sample, 1},
        {"ld_gates", d->ld_gates, 0}, {"num_spms", d->num_spms, 1}, {"rank", d->rank, 1}, {"groups", d->groups, 1},
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
    int64_t kr = (int64_t)d->num_spms * d->rank;
    int64_t n_total = (int64_t)d->groups * d->out_features;
    int64_t gkr = (int64_t)d->groups * kr;
    if (kr > I32_MAX || n_total > I32_MAX || gkr > I32_MAX || kr * d->in_features > I32_MAX)
        return fail(SPM_ERR_TOO_LARGE, "groups*out (%lld), K*rank (%lld) or K*rank*in (%lld) exceed int32",
                    (long long)n_total, (long long)kr, (long long)(kr * d->in_features));
    if (d->groups > 65535) return fail(SPM_ERR_TOO_LARGE, "groups = %d exceeds 65535 (a grid dimension)", d->groups);
    if (d->ldx < d->in_features)
        return fail(SPM_ERR_SHAPE, "ldx (%lld) < in_features (%lld)", (long long)d->ldx, (long long)d->in_features);
    if (d->ldy < n_total)
        return fail(SPM_ERR_SHAPE, "ldy (%lld) < groups*out_features (%lld)", (long long)d->ldy, (long long)n_total);
    if (!d->gates_broadcast && d->ld_gates && d->ld_gates < d->num_spms)
        return fail(SPM_ERR_SHAPE, "ld_gates (%lld) < num_spms (%d)", (long long)d->ld_gates, d->num_spms);
    if (d->m % d->rows_per_sample)
        return fail(SPM_ERR_SHAPE, "%lld rows do not split into samples of %lld rows", (long long)d->m,
                    (long long)d->rows_per_sample);
    int rank_ok = 0;
    for (int i = 0; i < spm_num_built_ranks; ++i) rank_ok |= spm_built_ranks[i] == d->rank;
    if (!rank_ok)
        return fail(SPM_ERR_UNSUPPORTED, "rank %d has no compiled variants (rebuild with -DSPM_RANKS=\"1;%d\")",
                    d->rank, d->rank);
    return SPM_OK;
}

/* The arch's table row for (rows, out per group): tiles.fwd_config / tiles.table_for */
static const spm_tile_rule *table_rule(int arch, int64_t rows, int64_t out) {
    const spm_tile_rule *t = arch >= 90 ? spm_fwd_table_sm90 : spm_fwd_table_sm80;
    int n = arch >= 90 ? SPM_FWD_TABLE_SM90_ROWS : SPM_FWD_TABLE_SM80_ROWS;
    for (int i = 0; i < n; ++i)
        if (rows >= t[i].min_rows && out <= t[i].max_out) return &t[i];
    return &t[n - 1];
}

/* tiles.n_per_prog: the largest divisor of tiles_n keeping >= sm_count * PROGRAMS_PER_SM programs */
static int n_per_prog_rule(int64_t tiles_n, int64_t other_programs, int sm_count) {
    int64_t min_programs = (int64_t)sm_count * SPM_PROGRAMS_PER_SM;
    if (min_programs < 1) min_programs = 1;
    int best = 1;
    for (int64_t dd = 1; dd <= tiles_n; ++dd)
        if (tiles_n % dd == 0 && other_programs * (tiles_n / dd) >= min_programs) best = (int)dd;
    return best;
}

/* The compiled variant with exactly these properties, or -1. */
static int find_variant(spm_kernel_kind kernel, int arch, spm_dtype dtype, int fused, spm_combine combine, int rank,
                        int has_bias, int aligned, const spm_tile_rule *t, int block_r) {
    for (int i = 0; i < g_num_variants; ++i) {
        const spm_variant_info *v = &g_infos[i];
        if (v->kernel != kernel || v->arch != arch || v->dtype != dtype || v->block_r != block_r) continue;
        if ((v->aligned != 0) != (aligned != 0) || v->num_warps != t->num_warps || v->num_stages != t->num_stages)
            continue;
        if (v->block_m != t->block_m || v->block_k != t->block_k) continue;
        if (kernel == SPM_KERNEL_FWD && (v->fused != fused || v->has_bias != has_bias || v->block_n != t->block_n))
            continue;
        if ((kernel == SPM_KERNEL_SHRINK || fused) && (v->combine != combine || v->rank != rank)) continue;
        return i;
    }
    return -1;
}

static unsigned int cdiv(int64_t a, int64_t b) { return (unsigned int)((a + b - 1) / b); }

static spm_status plan_core_make(const spm_plan_desc *desc, int arch, int sm_count, plan_core *pc) {
    pthread_once(&g_info_once, build_info);
    spm_status st = validate_desc(desc);
    if (st != SPM_OK) return st;
    memset(pc, 0, sizeof *pc);
    pc->d = *desc;
    const spm_plan_desc *d = &pc->d;
    int known = 0;
    for (int i = 0; i < spm_num_built_archs; ++i) known |= spm_built_archs[i] == arch;
    if (!known) {
        char archs[128];
        built_archs_text(archs, sizeof archs);
        return fail(SPM_ERR_ARCH, "no kernels for sm_%d in this library (it holds %s; rebuild with "
                    "-DSPM_CUDA_ARCHS=\"...;%d\")", arch, archs, arch);
    }
    pc->arch = arch;
    pc->sm_count = sm_count > 0 ? sm_count : SPM_DEFAULT_SM_COUNT;
    pc->kr = d->num_spms * d->rank;
    const int kr = pc->kr;
    pc->ldc = ((int64_t)d->groups * kr + 15) / 16 * 16; /* workspace row stride: a multiple of 16 elements */
    if (pc->ldc > I32_MAX) return fail(SPM_ERR_TOO_LARGE, "workspace row stride exceeds int32");
    pc->stride_gb = d->gates_broadcast ? 0 : (int32_t)(d->ld_gates ? d->ld_gates : d->num_spms);
    pc->min_align = d->alignment > 2 ? d->alignment : 2; /* 16-bit elements; scale / gates at >= 4 */

    /* tiles.plan_forward */
    const spm_tile_rule *cfg = table_rule(arch, d->m, d->out_features);
    int fused = d->pattern == SPM_PATTERN_AUTO ? pad16(kr) <= cfg->fused_max_rank : d->pattern == SPM_PATTERN_FUSED;
    /* what the aligned (divisibility-16 specialised) variants assume */
    int shapes16 = d->alignment >= 16 && d->out_features % 16 == 0 && d->ldx % 16 == 0 && d->ldy % 16 == 0 &&
                   d->in_features % 16 == 0;
    int aligned_fwd = shapes16 && d->in_features % cfg->block_k == 0;
    if (fused && !aligned_fwd) {
        if (d->pattern == SPM_PATTERN_FUSED)
            return fail(SPM_ERR_UNSUPPORTED, "the fused variants need in %% %d == 0, out, ldx, ldy %% 16 == 0 and "
                        "16-byte alignment (in %lld, out %lld, ldx %lld, ldy %lld, alignment %u): use AUTO or SPLIT",
                        cfg->block_k, (long long)d->in_features, (long long)d->out_features, (long long)d->ldx,
                        (long long)d->ldy, d->alignment);
        fused = 0; /* the masked generic variants are split-pattern only */
    }
    pc->fused = fused;
    pc->shrink_variant = -1;
    if (fused) {
        int block_r = pad16(kr);
        pc->forward_variant = find_variant(SPM_KERNEL_FWD, arch, d->dtype, 1, d->combine, d->rank, d->has_bias, 1, cfg,
                                           block_r);
        if (pc->forward_variant < 0)
            return fail(SPM_ERR_UNSUPPORTED, "no fused variant for K*rank = %d under the %dx%d tile (fused up to %d;"
                        " use SPM_PATTERN_AUTO or SPLIT)", kr, cfg->block_m, cfg->block_n, cfg->fused_max_rank);
    } else {
        int block_r = pad16(kr) < 64 ? 64 : pad16(kr); /* the compiled shrink widths: 64, 128 */
        if (block_r > SPM_MAX_SPLIT_BLOCK_R)
            return fail(SPM_ERR_UNSUPPORTED, "no shrink variant for K*rank = %d (compiled up to %d)", kr,
                        SPM_MAX_SPLIT_BLOCK_R);
        int aligned_split = shapes16 && kr % 16 == 0;
        spm_tile_rule shrink_tile = {0, 0, block_r <= SPM_SHRINK_ACC_ELEMS / SPM_SHRINK_BLOCK_M ? SPM_SHRINK_BLOCK_M
                                                                                      : SPM_SHRINK_ACC_ELEMS / block_r,
                                     0, SPM_SHRINK_BLOCK_K, SPM_SHRINK_NUM_WARPS, SPM_SHRINK_NUM_STAGES, 0, 0};
        if (shrink_tile.block_m < 16) shrink_tile.block_m = 16;
        int aligned_shrink = aligned_split && d->in_features % SPM_SHRINK_BLOCK_K == 0;
        if (!aligned_shrink) shrink_tile.num_warps = spm_generic_tile.num_warps;
        pc->shrink_variant = find_variant(SPM_KERNEL_SHRINK, arch, d->dtype, 0, d->combine, d->rank, 0, aligned_shrink,
                                          &shrink_tile, block_r);
        int aligned_fwd_split = aligned_split && aligned_fwd;
        pc->forward_variant = find_variant(SPM_KERNEL_FWD, arch, d->dtype, 0, SPM_COMBINE_ANY, 0, d->has_bias,
                                           aligned_fwd_split, aligned_fwd_split ? cfg : &spm_generic_tile,
                                           SPM_LOAD_BLOCK_R);
        if (pc->shrink_variant < 0 || pc->forward_variant < 0)
            return fail(SPM_ERR_INTERNAL, "no split variant (K*rank %d, aligned %d) in this build", kr, aligned_split);
        const spm_variant_info *s = &g_infos[pc->shrink_variant];
        pc->shrink_grid[0] = cdiv(d->m, s->block_m);
        pc->shrink_grid[1] = (unsigned int)d->groups;
        pc->shrink_grid[2] = 1;
        pc->workspace_bytes = (size_t)d->m * (size_t)pc->ldc * 2u;
    }
    const spm_variant_info *f = &g_infos[pc->forward_variant];
    int64_t m_tiles = (d->m + f->block_m - 1) / f->block_m;
    if (m_tiles > SPM_MAX_ROW_BLOCKS) /* CUDA's limit on grid dimension 1 (row blocks on axis 1, as the Triton launcher) */
        return fail(SPM_ERR_TOO_LARGE, "%lld rows need %lld row blocks of %d; at most %d per launch: split x",
                    (long long)d->m, (long long)m_tiles, f->block_m, SPM_MAX_ROW_BLOCKS);
    int64_t tiles_n = cdiv(d->out_features, f->block_n);
    pc->n_per_prog = fused && cfg->n_loop ? n_per_prog_rule(tiles_n, (int64_t)d->groups * m_tiles, pc->sm_count) : 1;
    pc->forward_grid[0] = (unsigned int)((int64_t)d->groups * tiles_n / pc->n_per_prog);
    pc->forward_grid[1] = (unsigned int)(m_tiles ? m_tiles : 1);
    pc->forward_grid[2] = 1;

    /* every kernel argument but the pointers */
    const int32_t K = d->num_spms, IN = (int32_t)d->in_features, N = (int32_t)d->out_features;
    const int32_t stride_sg = d->scale_per_group ? K : 0; /* 0: one scale vector shared by the groups */
    if (!fused) {
        arg_value *s = pc->shrink_args;
        s[SPM_SHRINK_ARG_M].i32 = (int32_t)d->m;
        s[SPM_SHRINK_ARG_KRED].i32 = IN;
        s[SPM_SHRINK_ARG_KR].i32 = kr;
        s[SPM_SHRINK_ARG_rows_per_sample].i32 = (int32_t)d->rows_per_sample;
        s[SPM_SHRINK_ARG_tiles_per_sample].i32 = (int32_t)cdiv(d->rows_per_sample, g_infos[pc->shrink_variant].block_m);
        s[SPM_SHRINK_ARG_stride_ab].i32 = 0;
        s[SPM_SHRINK_ARG_stride_am].i32 = (int32_t)d->ldx;
        s[SPM_SHRINK_ARG_stride_ak].i32 = 1;
        s[SPM_SHRINK_ARG_stride_ag].i32 = 0;
        s[SPM_SHRINK_ARG_stride_br].i32 = IN;
        s[SPM_SHRINK_ARG_stride_bk].i32 = 1;
        s[SPM_SHRINK_ARG_stride_bg].i32 = kr * IN;
        s[SPM_SHRINK_ARG_stride_sg].i32 = stride_sg;
        s[SPM_SHRINK_ARG_stride_gb].i32 = pc->stride_gb;
        s[SPM_SHRINK_ARG_stride_gk].i32 = 1;
        s[SPM_SHRINK_ARG_stride_cm].i32 = (int32_t)pc->ldc;
        s[SPM_SHRINK_ARG_stride_cr].i32 = 1;
    }
    arg_value *a = pc->fwd_args;
    a[SPM_FWD_ARG_M].i32 = (int32_t)d->m;
    a[SPM_FWD_ARG_N].i32 = N;
    a[SPM_FWD_ARG_IN].i32 = IN;
    a[SPM_FWD_ARG_KR].i32 = kr;
    a[SPM_FWD_ARG_rows_per_sample].i32 = (int32_t)d->rows_per_sample;
    a[SPM_FWD_ARG_tiles_per_sample].i32 = (int32_t)cdiv(d->rows_per_sample, f->block_m);
    a[SPM_FWD_ARG_N_PER_PROG].i32 = pc->n_per_prog;
    a[SPM_FWD_ARG_stride_xb].i32 = 0;
    a[SPM_FWD_ARG_stride_xm].i32 = (int32_t)d->ldx;
    a[SPM_FWD_ARG_stride_xk].i32 = 1;
    a[SPM_FWD_ARG_stride_wn].i32 = IN;
    a[SPM_FWD_ARG_stride_wk].i32 = 1;
    a[SPM_FWD_ARG_stride_dr].i32 = IN;
    a[SPM_FWD_ARG_stride_dk].i32 = 1;
    a[SPM_FWD_ARG_stride_un].i32 = kr;
    a[SPM_FWD_ARG_stride_ur].i32 = 1;
    a[SPM_FWD_ARG_stride_sg].i32 = stride_sg;
    a[SPM_FWD_ARG_stride_gb].i32 = pc->stride_gb;
    a[SPM_FWD_ARG_stride_gk].i32 = 1;
    a[SPM_FWD_ARG_stride_cm].i32 = fused ? 0 : (int32_t)pc->ldc;
    a[SPM_FWD_ARG_stride_cr].i32 = 1;
    a[SPM_FWD_ARG_stride_yb].i32 = 0;
    a[SPM_FWD_ARG_stride_ym].i32 = (int32_t)d->ldy;
    a[SPM_FWD_ARG_stride_yn].i32 = 1;
    return SPM_OK;
}

void spm_plan_desc_init(spm_plan_desc *desc) {
    if (!desc) return;
    memset(desc, 0, sizeof *desc);
    desc->struct_size = sizeof *desc;
    desc->version = SPM_PLAN_DESC_VERSION;
}

void spm_plan_info_init(spm_plan_info *info) {
    if (!info) return;
    memset(info, 0, sizeof *info);
    info->struct_size = sizeof *info;
    info->version = SPM_PLAN_INFO_VERSION;
}

void spm_pointers_init(spm_pointers *ptrs) {
    if (!ptrs) return;
    memset(ptrs, 0, sizeof *ptrs);
    ptrs->struct_size = sizeof *ptrs;
    ptrs->version = SPM_POINTERS_VERSION;
}

/* ------------------------------------------------------------------------------------------- */
/* Driver and devices */

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

/* Facts of the current context's device. */
typedef struct device_facts {
    int cc, arch, sm_count, shared_optin;
} device_facts;

static spm_status current_device(const spm_cuda_driver *cu, device_facts *f) {
    CUdevice dev;
    CUresult rc;
    int major = 0, minor = 0;
    if ((rc = cu->ctxGetDevice(&dev)) != CUDA_SUCCESS) {
        if (rc == CUDA_ERROR_INVALID_CONTEXT)
            return fail(SPM_ERR_NO_CONTEXT, "no current CUDA context on this thread (make one current: "
                        "cudaSetDevice()+cudaFree(0), or cuCtxSetCurrent())");
        return cuda_fail(cu, rc, "cuCtxGetDevice");
    }
    if ((rc = cu->deviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)) != CUDA_SUCCESS ||
        (rc = cu->deviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)) != CUDA_SUCCESS ||
        (rc = cu->deviceGetAttribute(&f->sm_count, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev)) != CUDA_SUCCESS ||
        (rc = cu->deviceGetAttribute(&f->shared_optin, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev)) !=
            CUDA_SUCCESS)
        return cuda_fail(cu, rc, "cuDeviceGetAttribute");
    f->cc = major * 10 + minor;
    f->arch = spm_kernels_arch_for_cc(f->cc);
    if (!f->arch) {
        char archs[128];
        built_archs_text(archs, sizeof archs);
        return fail(SPM_ERR_ARCH, "the current device is sm_%d; this library holds kernels for %s only "
                    "(rebuild with -DSPM_CUDA_ARCHS=\"...;%d\")", f->cc, archs, f->cc);
    }
    return SPM_OK;
}

/* A context's identity: cuCtxGetId where the driver has it (unique for the process' lifetime,
 * so a context recreated at the same address is told apart), else the handle itself. */
static unsigned long long context_id(const spm_cuda_driver *cu, CUcontext ctx) {
    unsigned long long id = 0;
    if (cu->ctxGetId && cu->ctxGetId(ctx, &id) == CUDA_SUCCESS) return id;
    return (unsigned long long)(uintptr_t)ctx;
}

/* The context `stream` belongs to (NULL stream: the current context). */
static spm_status stream_context(const spm_cuda_driver *cu, spm_stream stream, CUcontext *ctx) {
    CUresult rc = stream ? cu->streamGetCtx((CUstream)stream, ctx) : cu->ctxGetCurrent(ctx);
    if (rc != CUDA_SUCCESS) return cuda_fail(cu, rc, stream ? "cuStreamGetCtx" : "cuCtxGetCurrent");
    if (!*ctx)
        return fail(SPM_ERR_NO_CONTEXT, "no current CUDA context on this thread (make one current: "
                    "cudaSetDevice()+cudaFree(0), or cuCtxSetCurrent())");
    return SPM_OK;
}

/* Load variant `i` into the current context. */
static spm_status load_variant(const spm_cuda_driver *cu, int i, int shared_optin, int cc, CUmodule *mod_out,
                               CUfunction *out) {
    const spm_kernel_variant *v = g_variants[i];
    int shared = v->info.shared_bytes;
    if (shared > shared_optin)
        return fail(SPM_ERR_UNSUPPORTED, "variant %s needs %d bytes of shared memory; the device allows %d",
                    v->info.name, shared, shared_optin);
    CUmodule mod;
    CUfunction fn;
    CUresult rc = cu->moduleLoadData(&mod, v->image);
    if (rc != CUDA_SUCCESS) {
        spm_status st = cuda_fail(cu, rc, "cuModuleLoadData");
        size_t n = strlen(t_last_error);
        snprintf(t_last_error + n, sizeof t_last_error - n, " [variant %s on sm_%d]", v->info.name, cc);
        return st;
    }
    if ((rc = cu->moduleGetFunction(&fn, mod, v->function)) != CUDA_SUCCESS) {
        cu->moduleUnload(mod);
        return cuda_fail(cu, rc, "cuModuleGetFunction");
    }
    if (shared > 49152) { /* as Triton's launcher: opt in to more than 48 KiB of dynamic shared memory */
        int shared_static = 0;
        if ((rc = cu->funcSetCacheConfig(fn, CU_FUNC_CACHE_PREFER_SHARED)) != CUDA_SUCCESS ||
            (rc = cu->funcGetAttribute(&shared_static, CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, fn)) != CUDA_SUCCESS ||
            (rc = cu->funcSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                       shared_optin - shared_static)) != CUDA_SUCCESS) {
            cu->moduleUnload(mod);
            return cuda_fail(cu, rc, "cuFuncSetCacheConfig/cuFuncGetAttribute/cuFuncSetAttribute");
        }
    }
    *mod_out = mod;
    *out = fn;
    return SPM_OK;
}

/* ------------------------------------------------------------------------------------------- */
/* Launch */

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

static int misaligned(const void *p, size_t bytes) { return p && ((uintptr_t)p % bytes) != 0; }

/* Pointer checks of one execute (cheap: no scan) and the launches. */
static spm_status execute_core(const spm_cuda_driver *cu, const plan_core *pc, CUfunction f_shrink, CUfunction f_fwd,
                               const spm_pointers *p, CUstream stream) {
    const spm_plan_desc *d = &pc->d;
    if (d->m == 0) return SPM_OK;
    struct { const char *name; const void *ptr; size_t align; } ptrs[] = {
        {"x", p->x, pc->min_align}, {"weight", p->weight, pc->min_align}, {"down", p->down, pc->min_align},
        {"up", p->up, pc->min_align}, {"scale", p->scale, pc->min_align < 4 ? 4 : pc->min_align},
        {"gates", p->gates, pc->min_align < 4 ? 4 : pc->min_align}, {"y", p->y, pc->min_align},
    };
    for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; ++i) {
        if (!ptrs[i].ptr) return fail(SPM_ERR_INVALID_ARGUMENT, "%s is NULL", ptrs[i].name);
        if (misaligned(ptrs[i].ptr, ptrs[i].align))
            return fail(SPM_ERR_INVALID_ARGUMENT, "%s (%p) is not %zu-byte aligned (the plan's alignment)",
                        ptrs[i].name, ptrs[i].ptr, ptrs[i].align);
    }
    if (d->has_bias != (p->bias != NULL))
        return fail(SPM_ERR_INVALID_ARGUMENT, "bias is %s but the plan was made %s a bias", p->bias ? "set" : "NULL",
                    d->has_bias ? "with" : "without");
    if (misaligned(p->bias, pc->min_align)) return fail(SPM_ERR_INVALID_ARGUMENT, "bias is not aligned as planned");
    if (!pc->fused) {
        if (!p->workspace || p->workspace_bytes < pc->workspace_bytes)
            return fail(SPM_ERR_WORKSPACE, "the split pattern needs a workspace of %zu bytes (got %zu at %p)",
                        pc->workspace_bytes, p->workspace ? p->workspace_bytes : (size_t)0, p->workspace);
        if (misaligned(p->workspace, 16)) return fail(SPM_ERR_WORKSPACE, "workspace %p is not 16-byte aligned",
                                                      p->workspace);
        arg_value s[SPM_SHRINK_NUM_ARGS];
        memcpy(s, pc->shrink_args, sizeof s);
        s[SPM_SHRINK_ARG_a_ptr].ptr = dp(p->x);         /* [M, in], shared by the groups */
        s[SPM_SHRINK_ARG_b_ptr].ptr = dp(p->down);      /* [G*KR, in] */
        s[SPM_SHRINK_ARG_scale_ptr].ptr = dp(p->scale); /* [K] or [G*K] */
        s[SPM_SHRINK_ARG_gates_ptr].ptr = dp(p->gates); /* [B, K], row stride stride_gb */
        s[SPM_SHRINK_ARG_c_ptr].ptr = dp(p->workspace); /* [M, G*KR], row stride ldc */
        spm_status st = launch(cu, f_shrink, g_variants[pc->shrink_variant], pc->shrink_grid, s, stream);
        if (st != SPM_OK) return st;
    }
    arg_value f[SPM_FWD_NUM_ARGS];
    memcpy(f, pc->fwd_args, sizeof f);
    f[SPM_FWD_ARG_x_ptr].ptr = dp(p->x);      /* [M, in], row stride ldx */
    f[SPM_FWD_ARG_w_ptr].ptr = dp(p->weight); /* [G*N, in] */
    f[SPM_FWD_ARG_bias_ptr].ptr = p->bias ? dp(p->bias) : dp(p->x); /* unused when HAS_BIAS is off */
    f[SPM_FWD_ARG_down_ptr].ptr = dp(p->down); /* [G*KR, in] */
    f[SPM_FWD_ARG_up_ptr].ptr = dp(p->up);     /* [G*N, KR] */
    f[SPM_FWD_ARG_scale_ptr].ptr = dp(p->scale);
    f[SPM_FWD_ARG_gates_ptr].ptr = dp(p->gates);
    f[SPM_FWD_ARG_c_ptr].ptr = pc->fused ? dp(p->y) : dp(p->workspace); /* c is not stored when fused */
    f[SPM_FWD_ARG_y_ptr].ptr = dp(p->y);       /* [M, G*N], row stride ldy */
    return launch(cu, f_fwd, g_variants[pc->forward_variant], pc->forward_grid, f, stream);
}

/* ------------------------------------------------------------------------------------------- */
/* Plan API */

spm_status spm_plan_create(const spm_plan_desc *desc, spm_plan **plan) {
    if (!plan) return fail(SPM_ERR_INVALID_ARGUMENT, "plan is NULL");
    *plan = NULL;
    spm_status st = validate_desc(desc);
    if (st != SPM_OK) return st;
    int arch = desc->arch, sm_count = desc->sm_count;
    if (arch == 0) { /* the current context's device */
        const spm_cuda_driver *cu;
        device_facts f;
        if ((st = driver(&cu)) != SPM_OK || (st = current_device(cu, &f)) != SPM_OK) return st;
        arch = f.arch;
        if (sm_count == 0) sm_count = f.sm_count;
    }
    spm_plan *p = calloc(1, sizeof *p);
    if (!p) return fail(SPM_ERR_INTERNAL, "out of host memory");
    st = plan_core_make(desc, arch, sm_count, &p->core);
    if (st != SPM_OK) {
        free(p);
        return st;
    }
    *plan = p;
    return SPM_OK;
}

spm_status spm_plan_get_info(const spm_plan *plan, spm_plan_info *info) {
    if (!plan || !info) return fail(SPM_ERR_INVALID_ARGUMENT, "plan or info is NULL");
    if (info->struct_size != sizeof(spm_plan_info) || info->version != SPM_PLAN_INFO_VERSION)
        return fail(SPM_ERR_VERSION, "spm_plan_info has struct_size %zu / version %d (use spm_plan_info_init)",
                    info->struct_size, (int)info->version);
    const plan_core *pc = &plan->core;
    info->arch = pc->arch;
    info->sm_count = pc->sm_count;
    info->fused = pc->fused;
    info->shrink_variant = pc->shrink_variant;
    info->forward_variant = pc->forward_variant;
    info->n_per_prog = pc->n_per_prog;
    memcpy(info->shrink_grid, pc->shrink_grid, sizeof info->shrink_grid);
    memcpy(info->forward_grid, pc->forward_grid, sizeof info->forward_grid);
    info->workspace_bytes = pc->workspace_bytes;
    return SPM_OK;
}

static void plan_unload(const spm_cuda_driver *cu, spm_plan *plan) {
    /* the modules die with their context; unloading from a destroyed one just fails (ignored) */
    for (int i = 0; i < 2; ++i)
        if (plan->modules[i] && cu) cu->moduleUnload(plan->modules[i]);
    plan->modules[0] = plan->modules[1] = NULL;
    plan->f_shrink = plan->f_fwd = NULL;
    plan->prepared = 0;
}

spm_status spm_plan_prepare(spm_plan *plan, spm_stream stream) {
    if (!plan) return fail(SPM_ERR_INVALID_ARGUMENT, "plan is NULL");
    const spm_cuda_driver *cu;
    spm_status st = driver(&cu);
    if (st != SPM_OK) return st;
    CUcontext ctx;
    if ((st = stream_context(cu, stream, &ctx)) != SPM_OK) return st;
    CUresult rc = cu->ctxPushCurrent(ctx);
    if (rc != CUDA_SUCCESS) return cuda_fail(cu, rc, "cuCtxPushCurrent");
    device_facts f;
    st = current_device(cu, &f);
    if (st == SPM_OK && f.arch != plan->core.arch)
        st = fail(SPM_ERR_ARCH, "the plan was made for sm_%d; this stream's device runs the sm_%d kernels",
                  plan->core.arch, f.arch);
    if (st == SPM_OK) {
        plan_unload(cu, plan);
        if (!plan->core.fused)
            st = load_variant(cu, plan->core.shrink_variant, f.shared_optin, f.cc, &plan->modules[0], &plan->f_shrink);
        if (st == SPM_OK)
            st = load_variant(cu, plan->core.forward_variant, f.shared_optin, f.cc, &plan->modules[1], &plan->f_fwd);
        if (st == SPM_OK) {
            plan->ctx = ctx;
            plan->ctx_id = context_id(cu, ctx);
            plan->prepared = 1;
        } else {
            plan_unload(cu, plan);
        }
    }
    CUcontext popped;
    cu->ctxPopCurrent(&popped);
    return st;
}

spm_status spm_plan_execute(const spm_plan *plan, const spm_pointers *ptrs, spm_stream stream) {
    if (!plan || !ptrs) return fail(SPM_ERR_INVALID_ARGUMENT, "plan or ptrs is NULL");
    if (ptrs->struct_size != sizeof(spm_pointers) || ptrs->version != SPM_POINTERS_VERSION)
        return fail(SPM_ERR_VERSION, "spm_pointers has struct_size %zu / version %d (use spm_pointers_init)",
                    ptrs->struct_size, (int)ptrs->version);
    if (plan->core.d.m == 0) return SPM_OK;
    if (!plan->prepared) return fail(SPM_ERR_NOT_PREPARED, "call spm_plan_prepare first (outside any graph capture)");
    const spm_cuda_driver *cu;
    spm_status st = driver(&cu);
    if (st != SPM_OK) return st;
    CUcontext ctx;
    if ((st = stream_context(cu, stream, &ctx)) != SPM_OK) return st;
    if (ctx != plan->ctx || (cu->ctxGetId && context_id(cu, ctx) != plan->ctx_id))
        return fail(SPM_ERR_NOT_PREPARED, "the stream belongs to another CUDA context than the plan was prepared "
                    "in (or that context was recreated): call spm_plan_prepare for it");
    CUcontext cur = NULL;
    cu->ctxGetCurrent(&cur);
    int pushed = 0;
    if (cur != ctx) { /* launch in the stream's context */
        CUresult rc = cu->ctxPushCurrent(ctx);
        if (rc != CUDA_SUCCESS) return cuda_fail(cu, rc, "cuCtxPushCurrent");
        pushed = 1;
    }
    st = execute_core(cu, &plan->core, plan->f_shrink, plan->f_fwd, ptrs, (CUstream)stream);
    if (pushed) {
        CUcontext popped;
        cu->ctxPopCurrent(&popped);
    }
    return st;
}

void spm_plan_destroy(spm_plan *plan) {
    if (!plan) return;
    const spm_cuda_driver *cu = plan->prepared ? spm_cuda_driver_get(NULL) : NULL;
    plan_unload(cu, plan);
    free(plan);
}

/* ------------------------------------------------------------------------------------------- */
/* The one-call API: a per-context cache of loaded variants, and thin wrappers over the plan core */

typedef struct ctx_entry {
    CUcontext ctx;
    unsigned long long id;
    unsigned long long last_use;
    device_facts dev;
    CUmodule *modules;     /* per variant, loaded on first use */
    CUfunction *functions;
} ctx_entry;

static pthread_mutex_t g_ctx_lock = PTHREAD_MUTEX_INITIALIZER;
static ctx_entry g_ctx[SPM_MAX_CONTEXTS];
static unsigned long long g_ctx_clock;

static void entry_clear(const spm_cuda_driver *cu, ctx_entry *e, int unload) {
    if (e->modules && unload && cu)
        for (int i = 0; i < g_num_variants; ++i)
            if (e->modules[i]) cu->moduleUnload(e->modules[i]);
    free(e->modules);
    free(e->functions);
    memset(e, 0, sizeof *e);
}

/* The entry of the current context (created on first use; a recreated context gets a fresh one,
 * the least recently used entry makes room); called with g_ctx_lock held. */
static spm_status current_entry(const spm_cuda_driver *cu, ctx_entry **out) {
    CUcontext ctx = NULL;
    spm_status st = stream_context(cu, NULL, &ctx);
    if (st != SPM_OK) return st;
    unsigned long long id = context_id(cu, ctx);
    int slot = -1;
    for (int i = 0; i < SPM_MAX_CONTEXTS; ++i)
        if (g_ctx[i].ctx == ctx) {
            if (g_ctx[i].id == id) {
                g_ctx[i].last_use = ++g_ctx_clock;
                *out = &g_ctx[i];
                return SPM_OK;
            }
            entry_clear(cu, &g_ctx[i], 0); /* same handle, another context: the old one is gone */
        }
    for (int i = 0; i < SPM_MAX_CONTEXTS && slot < 0; ++i)
        if (!g_ctx[i].ctx) slot = i;
    if (slot < 0) { /* evict the least recently used (its modules stay until its context is destroyed) */
        slot = 0;
        for (int i = 1; i < SPM_MAX_CONTEXTS; ++i)
            if (g_ctx[i].last_use < g_ctx[slot].last_use) slot = i;
        entry_clear(cu, &g_ctx[slot], 0);
    }
    ctx_entry *e = &g_ctx[slot];
    if ((st = current_device(cu, &e->dev)) != SPM_OK) return st;
    e->modules = calloc((size_t)(g_num_variants ? g_num_variants : 1), sizeof *e->modules);
    e->functions = calloc((size_t)(g_num_variants ? g_num_variants : 1), sizeof *e->functions);
    if (!e->modules || !e->functions) {
        entry_clear(cu, e, 0);
        return fail(SPM_ERR_INTERNAL, "out of host memory");
    }
    e->ctx = ctx;
    e->id = id;
    e->last_use = ++g_ctx_clock;
    *out = e;
    return SPM_OK;
}

static spm_status entry_function(const spm_cuda_driver *cu, ctx_entry *e, int i, CUfunction *out) {
    if (!e->functions[i]) {
        spm_status st = load_variant(cu, i, e->dev.shared_optin, e->dev.cc, &e->modules[i], &e->functions[i]);
        if (st != SPM_OK) return st;
    }
    *out = e->functions[i];
    return SPM_OK;
}

spm_status spm_kernels_release_context(spm_context ctx) {
    const spm_cuda_driver *cu = spm_cuda_driver_get(NULL);
    pthread_mutex_lock(&g_ctx_lock);
    for (int i = 0; i < SPM_MAX_CONTEXTS; ++i)
        if (g_ctx[i].ctx && (!ctx || g_ctx[i].ctx == (CUcontext)ctx)) entry_clear(cu, &g_ctx[i], 1);
    pthread_mutex_unlock(&g_ctx_lock);
    return SPM_OK;
}

/* The one-call args as a plan desc (the pointers' common alignment, capped at 256 bytes). */
static spm_status desc_from_args(const spm_gated_linear_args *a, spm_plan_desc *d) {
    if (!a) return fail(SPM_ERR_INVALID_ARGUMENT, "args is NULL");
    spm_plan_desc_init(d);
    d->dtype = a->dtype;
    d->combine = a->combine;
    d->pattern = a->pattern;
    d->m = a->m;
    d->in_features = a->in_features;
    d->out_features = a->out_features;
    d->ldx = a->ldx;
    d->ldy = a->ldy;
    d->rows_per_sample = a->rows_per_sample;
    d->num_spms = a->num_spms;
    d->rank = a->rank;
    d->groups = a->groups;
    d->scale_per_group = a->scale_per_group;
    d->has_bias = a->bias != NULL;
    uintptr_t bits = 256;
    const void *all[] = {a->x, a->weight, a->bias, a->down, a->up, a->scale, a->gates, a->y};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; ++i) bits |= (uintptr_t)all[i];
    d->alignment = (uint32_t)(bits & (~bits + 1)); /* lowest set bit */
    spm_status st = validate_desc(d);
    if (st != SPM_OK) return st;
    if (a->m > 0) { /* the one-call API checks its pointers up front, as version 1 did */
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
    return SPM_OK;
}

static void pointers_from_args(const spm_gated_linear_args *a, spm_pointers *p) {
    spm_pointers_init(p);
    p->x = a->x;
    p->weight = a->weight;
    p->bias = a->bias;
    p->down = a->down;
    p->up = a->up;
    p->scale = a->scale;
    p->gates = a->gates;
    p->y = a->y;
    p->workspace = a->workspace;
    p->workspace_bytes = a->workspace_bytes;
}

spm_status spm_gated_linear_plan(const spm_gated_linear_args *args, int arch, spm_launch_plan *plan) {
    if (!plan) return fail(SPM_ERR_INVALID_ARGUMENT, "plan is NULL");
    spm_plan_desc d;
    plan_core pc;
    spm_status st = desc_from_args(args, &d);
    if (st == SPM_OK) st = plan_core_make(&d, arch, 0, &pc);
    if (st != SPM_OK) return st;
    memset(plan, 0, sizeof *plan);
    plan->fused = pc.fused;
    plan->shrink_variant = pc.shrink_variant;
    plan->forward_variant = pc.forward_variant;
    memcpy(plan->shrink_grid, pc.shrink_grid, sizeof plan->shrink_grid);
    memcpy(plan->forward_grid, pc.forward_grid, sizeof plan->forward_grid);
    plan->workspace_bytes = pc.workspace_bytes;
    return SPM_OK;
}

spm_status spm_gated_linear_workspace_size(const spm_gated_linear_args *args, size_t *bytes) {
    if (!bytes) return fail(SPM_ERR_INVALID_ARGUMENT, "bytes is NULL");
    spm_plan_desc d;
    plan_core pc;
    spm_status st = desc_from_args(args, &d);
    /* the pattern and so the workspace do not depend on the architecture: plan for any built one */
    if (st == SPM_OK) st = plan_core_make(&d, spm_num_built_archs ? spm_built_archs[0] : 0, 0, &pc);
    if (st != SPM_OK) return st;
    *bytes = pc.workspace_bytes;
    return SPM_OK;
}

spm_status spm_gated_linear_forward(spm_stream stream, const spm_gated_linear_args *a) {
    pthread_once(&g_info_once, build_info);
    spm_plan_desc d;
    plan_core pc;
    spm_pointers p;
    /* shapes first (no driver needed), against any built arch, so argument errors come first */
    spm_status st = desc_from_args(a, &d);
    if (st == SPM_OK) st = plan_core_make(&d, spm_num_built_archs ? spm_built_archs[0] : 0, 0, &pc);
    if (st != SPM_OK) return st;
    if (a->m == 0) return SPM_OK;
    const spm_cuda_driver *cu;
    if ((st = driver(&cu)) != SPM_OK) return st;

    pthread_mutex_lock(&g_ctx_lock);
    ctx_entry *e = NULL;
    CUfunction f_shrink = NULL, f_fwd = NULL;
    st = current_entry(cu, &e);
    if (st == SPM_OK) st = plan_core_make(&d, e->dev.arch, e->dev.sm_count, &pc);
    if (st == SPM_OK && !pc.fused) st = entry_function(cu, e, pc.shrink_variant, &f_shrink);
    if (st == SPM_OK) st = entry_function(cu, e, pc.forward_variant, &f_fwd);
    pthread_mutex_unlock(&g_ctx_lock);
    if (st != SPM_OK) return st;
    pointers_from_args(a, &p);
    return execute_core(cu, &pc, f_shrink, f_fwd, &p, (CUstream)stream);
}
