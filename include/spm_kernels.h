/*
 * spm_kernels.h -- C API of libspm_kernels: the gated multi-SPM projection of spm_rt, compiled
 * ahead of time (Triton -> cubin) and launched through the CUDA driver.
 *
 * The op (same contract as spm_rt.kernels.gated_spm_linear_triton, forward only), for G groups
 * (projections sharing x, e.g. attention q/k/v with G = 3), K stacked SPMs of rank r (R = K*r):
 *
 *     z_g = x D_g^T                                   [M, R]   shrink
 *     c_g = coefficients(z_g, gates[row / rows_per_sample], scale)   gated
 *     y[:, g*out:(g+1)*out] = x W_g^T + b_g + c_g U_g^T               expand
 *
 *   combine LINEAR:   c[m, k*r+j] = gates[b,k] * scale[k] * z[m, k*r+j]
 *   combine OFFICIAL: w[m, j] = sum_k gates[b,k] z[m, k*r+j];  c[m, k*r+j] = scale[0] gates[b,k] w[m,j]
 *
 * fp32 accumulation; inputs and output in fp16 or bf16; scale and gates in float32.
 *
 * Usage (cuBLASLt-style: plan once per shape, prepare outside any graph capture, execute often):
 *
 *     spm_plan_desc d;
 *     spm_plan_desc_init(&d);                    // struct_size / version, everything else zero
 *     d.dtype = SPM_DTYPE_FLOAT16; d.combine = SPM_COMBINE_LINEAR; d.pattern = SPM_PATTERN_AUTO;
 *     d.m = 8192; d.in_features = 320; d.out_features = 320; d.ldx = 320; d.ldy = 320;
 *     d.rows_per_sample = 4096; d.num_spms = 16; d.rank = 1; d.groups = 1; d.has_bias = 1;
 *     d.alignment = 256;                         // every pointer given to execute is 256-byte aligned
 *     spm_plan *plan;
 *     spm_plan_create(&d, &plan);                // no GPU needed when d.arch is set; no pointers
 *     spm_plan_info info; spm_plan_info_init(&info); spm_plan_get_info(plan, &info);
 *     ... allocate info.workspace_bytes (0 when the fused pattern runs)
 *     spm_plan_prepare(plan, stream);            // loads the kernels into the stream's context
 *     spm_pointers p; spm_pointers_init(&p); p.x = x; p.weight = w; ... p.y = y;
 *     spm_status st = spm_plan_execute(plan, &p, stream);   // no scan, no lock, no allocation
 *     if (st != SPM_OK) fprintf(stderr, "%s: %s\n", spm_status_string(st), spm_last_error());
 *     spm_plan_destroy(plan);
 *
 * The one-call entry spm_gated_linear_forward(stream, &args) remains: it plans, loads (into a
 * per-context cache) and launches in one call, under a lock.
 *
 * No CUDA header is needed to use this one: streams are `struct CUstream_st *`, which is both
 * the driver's CUstream and the runtime's cudaStream_t. The library loads libcuda.so.1 itself
 * (dlopen) on first use; it does not link the driver.
 *
 * Thread safety: every function may be called from any thread; one plan may be executed from
 * several threads at once, but prepare/destroy must not race with execute on the same plan.
 */
#ifndef SPM_KERNELS_H
#define SPM_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* SPM_API: exported from the library, imported by its users (Windows: dllexport while building
 * it, dllimport when using it, nothing for a static build); everything else is hidden. */
#if defined(_WIN32) || defined(__CYGWIN__)
#if defined(SPM_KERNELS_STATIC)
#define SPM_API
#elif defined(SPM_KERNELS_BUILD)
#define SPM_API __declspec(dllexport)
#else
#define SPM_API __declspec(dllimport)
#endif
#elif defined(__GNUC__) || defined(__clang__)
#define SPM_API __attribute__((visibility("default")))
#else
#define SPM_API
#endif

/* Bumped when a struct layout or the meaning of a function changes. */
#define SPM_KERNELS_ABI_VERSION 2
#define SPM_PLAN_DESC_VERSION 1
#define SPM_PLAN_INFO_VERSION 1
#define SPM_POINTERS_VERSION 1

struct CUstream_st;
typedef struct CUstream_st *spm_stream; /* CUstream / cudaStream_t; NULL = legacy default stream */

struct CUctx_st;
typedef struct CUctx_st *spm_context; /* CUcontext */

typedef enum spm_status {
    SPM_OK = 0,
    SPM_ERR_INVALID_ARGUMENT = 1, /* NULL args, NULL required pointer, bad enum value */
    SPM_ERR_SHAPE = 2,            /* sizes or strides that do not fit together */
    SPM_ERR_UNSUPPORTED = 3,      /* valid, but no compiled variant (dtype, rank, K*r too large, ...) */
    SPM_ERR_TOO_LARGE = 4,        /* a size/stride above INT32_MAX or more than 65535 row blocks */
    SPM_ERR_WORKSPACE = 5,        /* split pattern without (enough, 16-byte aligned) workspace */
    SPM_ERR_NO_DRIVER = 6,        /* libcuda.so.1 not found / unusable, or cuInit failed */
    SPM_ERR_NO_DEVICE = 7,        /* driver present but no CUDA device */
    SPM_ERR_NO_CONTEXT = 8,       /* no current CUDA context on this thread */
    SPM_ERR_ARCH = 9,             /* the library holds no cubin for this device's architecture */
    SPM_ERR_CUDA = 10,            /* a driver call failed (see spm_last_error for which and why) */
    SPM_ERR_INTERNAL = 11,
    SPM_ERR_NOT_PREPARED = 12,    /* execute before prepare, or on a stream of another context */
    SPM_ERR_VERSION = 13          /* a struct's struct_size / version this library does not know */
} spm_status;

typedef enum spm_dtype { SPM_DTYPE_FLOAT16 = 0, SPM_DTYPE_BFLOAT16 = 1 } spm_dtype;

typedef enum spm_combine {
    SPM_COMBINE_ANY = -1, /* only in spm_variant_info: a variant that serves both */
    SPM_COMBINE_LINEAR = 0,
    SPM_COMBINE_OFFICIAL = 1
} spm_combine;

typedef enum spm_pattern {
    SPM_PATTERN_AUTO = 0,  /* the tile table's rule (kernels/tiles.py): fused up to its fused_max_rank */
    SPM_PATTERN_FUSED = 1, /* shrink inside the GEMM: one launch, no workspace */
    SPM_PATTERN_SPLIT = 2  /* shrink kernel writes c to the workspace, then GEMM + expand */
} spm_pattern;

typedef enum spm_kernel_kind { SPM_KERNEL_FWD = 0, SPM_KERNEL_SHRINK = 1 } spm_kernel_kind;

/* ---- plan API ------------------------------------------------------------------------------ */

/* What a plan is made from: shapes, dtypes, strides and alignment, no pointers. Initialise with
 * spm_plan_desc_init (sets struct_size and version, zeroes the rest), then fill. Element strides. */
typedef struct spm_plan_desc {
    size_t struct_size;      /* sizeof(spm_plan_desc) */
    int32_t version;         /* SPM_PLAN_DESC_VERSION */
    spm_dtype dtype;
    spm_combine combine;     /* LINEAR or OFFICIAL */
    spm_pattern pattern;
    int64_t m;               /* rows (tokens of all samples) */
    int64_t in_features;
    int64_t out_features;    /* per group */
    int64_t ldx;             /* row stride of x, >= in_features */
    int64_t ldy;             /* row stride of y, >= groups*out_features */
    int64_t rows_per_sample; /* m must be a multiple; sample of row i = i / rows_per_sample */
    int64_t ld_gates;        /* row stride of gates [B, K] (last dim contiguous); 0 = num_spms, unless
                                gates_broadcast: every sample reads row 0 (stride 0, torch expand) */
    int32_t gates_broadcast;
    int32_t num_spms;        /* K */
    int32_t rank;            /* r */
    int32_t groups;          /* G >= 1 */
    int32_t scale_per_group; /* 0: scale is [K]; 1: scale is [G*K] */
    int32_t has_bias;
    uint32_t alignment;      /* bytes every pointer passed to execute is aligned to (a power of two;
                                0 = element size only). >= 16 lets the specialised variants run */
    int32_t arch;            /* compute capability x 10 to plan for; 0 = the current context's device */
    int32_t sm_count;        /* that device's SMs (the N-tiles-per-program rule); 0 = the current
                                device's when arch is 0, else the table's default (132) */
} spm_plan_desc;

typedef struct spm_plan spm_plan; /* opaque */

/* What a plan runs (spm_plan_get_info). Variant indices index spm_kernels_info()->variants. */
typedef struct spm_plan_info {
    size_t struct_size;       /* sizeof(spm_plan_info) */
    int32_t version;          /* SPM_PLAN_INFO_VERSION */
    int32_t arch;             /* planned for */
    int32_t sm_count;
    int32_t fused;            /* 1: one fused launch; 0: shrink + forward */
    int32_t shrink_variant;   /* -1 when fused */
    int32_t forward_variant;
    int32_t n_per_prog;       /* N tiles per forward program */
    uint32_t shrink_grid[3];
    uint32_t forward_grid[3];
    size_t workspace_bytes;   /* needed in spm_pointers.workspace (0 when fused) */
} spm_plan_info;

/* The device pointers of one execute (in the plan's context). */
typedef struct spm_pointers {
    size_t struct_size;  /* sizeof(spm_pointers) */
    int32_t version;     /* SPM_POINTERS_VERSION */
    const void *x, *weight, *bias, *down, *up; /* bias NULL iff the desc has no bias */
    const float *scale, *gates;
    void *y;
    void *workspace;     /* split pattern: >= workspace_bytes, 16-byte aligned */
    size_t workspace_bytes;
} spm_pointers;

SPM_API void spm_plan_desc_init(spm_plan_desc *desc);
SPM_API void spm_plan_info_init(spm_plan_info *info);
SPM_API void spm_pointers_init(spm_pointers *ptrs);

/* Validate the desc and choose the kernels (the Triton launcher's table and rule); no module is
 * loaded. With desc->arch set, no GPU or driver is touched. *plan is NULL on error. */
SPM_API spm_status spm_plan_create(const spm_plan_desc *desc, spm_plan **plan);
SPM_API spm_status spm_plan_get_info(const spm_plan *plan, spm_plan_info *info);
/* Load the plan's kernels into the context of `stream` (NULL: the current context). Call outside
 * any CUDA graph capture; again after a context was recreated. The plan owns the modules. */
SPM_API spm_status spm_plan_prepare(spm_plan *plan, spm_stream stream);
/* Launch on `stream` (asynchronous). Checks the pointers against the desc's alignment, the
 * workspace, and that the stream belongs to the prepared context; no scan, no lock, no
 * allocation, no module load: safe inside a CUDA graph capture. */
SPM_API spm_status spm_plan_execute(const spm_plan *plan, const spm_pointers *ptrs, spm_stream stream);
SPM_API void spm_plan_destroy(spm_plan *plan);

/* The one-call entry's per-context kernel cache: entries are keyed by context ID (cuCtxGetId, CUDA
 * 12+; with older drivers by the CUcontext handle: release a context before destroying it), the
 * least recently used of 16 is evicted. Release one context's entry (unloading its modules: the
 * context must still be alive), or NULL for every entry. Plans are not affected. */
SPM_API spm_status spm_kernels_release_context(spm_context ctx);

/* ---- one-call API (version 1, kept) ---------------------------------------------------------- */

/* Arguments of one forward. Zero-initialise, then fill every field that applies.
 * Pointers are device pointers (or unified/managed memory) in the current context.
 * Element strides; every matrix except x and y must be contiguous (row-major). */
typedef struct spm_gated_linear_args {
    const void *x;       /* [m, in_features], row stride ldx, dtype */
    const void *weight;  /* [groups*out_features, in_features], dtype */
    const void *bias;    /* [groups*out_features], dtype; NULL = no bias */
    const void *down;    /* [groups*num_spms*rank, in_features], dtype */
    const void *up;      /* [groups*out_features, num_spms*rank], dtype */
    const float *scale;  /* [num_spms] shared by the groups, or [groups*num_spms] (scale_per_group) */
    const float *gates;  /* [m / rows_per_sample, num_spms], float32 */
    void *y;             /* [m, groups*out_features], row stride ldy, dtype (written) */
    void *workspace;     /* split pattern: >= spm_gated_linear_workspace_size() bytes, 16-byte aligned */
    size_t workspace_bytes;
    int64_t m;               /* rows (tokens of all samples); 0 = nothing to do */
    int64_t in_features;
    int64_t out_features;    /* per group */
    int64_t ldx;             /* >= in_features */
    int64_t ldy;             /* >= groups*out_features */
    int64_t rows_per_sample; /* m must be a multiple; sample of row i = i / rows_per_sample */
    int32_t num_spms;        /* K */
    int32_t rank;            /* r */
    int32_t groups;          /* G >= 1 */
    int32_t scale_per_group; /* 0: scale is [K]; 1: scale is [G*K] */
    spm_dtype dtype;
    spm_combine combine;     /* LINEAR or OFFICIAL */
    spm_pattern pattern;
} spm_gated_linear_args;

/* One compiled kernel variant (constexprs and launch parameters). */
typedef struct spm_variant_info {
    const char *name;       /* e.g. "fwd_fused_linear_r1_R16_bias_aligned_M128_fp16_sm90" */
    spm_kernel_kind kernel;
    int arch;               /* 80 = sm_80, 90 = sm_90a, ... */
    spm_dtype dtype;
    int fused;              /* forward: shrink fused into the GEMM (1) or c read from workspace (0) */
    spm_combine combine;    /* SPM_COMBINE_ANY for the split forward */
    int rank;               /* 0 = any (split forward) */
    int has_bias;
    int aligned;            /* 0: any shape (masked); 1: needs in%64==0, out%16==0, ldx/ldy%16==0 and
                               16-byte aligned pointers; 2: as 1, and K*rank%16==0 */
    /* block_* are the compiled tile; num_warps / num_stages the launch's (the tile table's) */
    int block_m, block_n, block_k, block_r;
    int num_warps, num_stages;
    int shared_bytes;       /* dynamic shared memory per block */
    size_t cubin_bytes;
} spm_variant_info;

typedef struct spm_library_info {
    const char *version;        /* library version, e.g. "0.1.0" */
    const char *triton_version; /* Triton that compiled the cubins */
    int abi_version;            /* SPM_KERNELS_ABI_VERSION the library was built with */
    int num_archs;
    const int *archs;           /* e.g. {80, 90} */
    int num_ranks;
    const int *ranks;           /* SPM ranks with compiled gating variants, e.g. {1} */
    int max_fused_rank;         /* largest K*r the fused pattern serves */
    int max_split_rank;         /* largest K*r the split pattern serves */
    int num_variants;
    const spm_variant_info *variants;
} spm_library_info;

/* What a forward would launch on a device of `arch` (see spm_gated_linear_plan; the plan API's
 * spm_plan_info says more). */
typedef struct spm_launch_plan {
    int fused;              /* 1: one fused launch; 0: shrink + forward */
    int shrink_variant;     /* index into spm_kernels_info()->variants, -1 when fused */
    int forward_variant;    /* index into spm_kernels_info()->variants */
    unsigned int shrink_grid[3];
    unsigned int forward_grid[3];
    size_t workspace_bytes; /* needed in args->workspace (0 when fused) */
} spm_launch_plan;

/* Run y = x W^T + b + coefficients(x D^T) U^T on `stream` (asynchronous; returns after launch).
 * Validates everything first: a bad argument returns an error code and launches nothing. A thin
 * wrapper: plans from args (alignment from the pointers), loads through the per-context cache on
 * first use (not inside a graph capture: use the plan API there), executes. */
SPM_API spm_status spm_gated_linear_forward(spm_stream stream, const spm_gated_linear_args *args);

/* Workspace the forward needs for these arguments (0 for the fused pattern). Validates args. */
SPM_API spm_status spm_gated_linear_workspace_size(const spm_gated_linear_args *args, size_t *bytes);

/* Validate args and pick variants for compute capability `arch` (e.g. 90, 86) without a GPU
 * (the default SM count, 132). */
SPM_API spm_status spm_gated_linear_plan(const spm_gated_linear_args *args, int arch, spm_launch_plan *plan);

/* Library contents. Never NULL; static storage. */
SPM_API const spm_library_info *spm_kernels_info(void);
/* The same as a JSON object (static storage): for bindings (the Python loader uses it). */
SPM_API const char *spm_kernels_info_json(void);
SPM_API int spm_kernels_abi_version(void);
SPM_API size_t spm_gated_linear_args_size(void); /* sizeof(spm_gated_linear_args), for bindings */

/* The compiled architecture that runs on compute capability `cc` (major*10+minor), or 0 if none:
 * sm_80 cubins run on 8.x with x >= 0; sm_90a (and newer "a") cubins only on exactly 9.0 (...). */
SPM_API int spm_kernels_arch_for_cc(int cc);

/* Load the driver (dlopen libcuda.so.1 + cuInit) and count devices. SPM_OK when at least one
 * device is present; SPM_ERR_NO_DRIVER / SPM_ERR_NO_DEVICE otherwise (with a message). */
SPM_API spm_status spm_kernels_init(void);
/* Compute capability (major*10+minor) of device `ordinal`, through the driver. */
SPM_API spm_status spm_kernels_device_cc(int ordinal, int *cc);

/* Static text of a status code ("SPM_ERR_SHAPE: ..."). Never NULL. */
SPM_API const char *spm_status_string(spm_status status);
/* The message of the last failing call on this thread ("" if none). Never NULL. */
SPM_API const char *spm_last_error(void);

#ifdef __cplusplus
}
#endif
#endif /* SPM_KERNELS_H */
