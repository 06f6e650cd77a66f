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
 * Usage:
 *
 *     spm_gated_linear_args a = {0};
 *     a.dtype = SPM_DTYPE_FLOAT16; a.combine = SPM_COMBINE_LINEAR; a.pattern = SPM_PATTERN_AUTO;
 *     a.x = x; a.weight = w; a.bias = NULL; a.down = d; a.up = u; a.scale = s; a.gates = g; a.y = y;
 *     a.m = 8192; a.in_features = 320; a.out_features = 320; a.ldx = 320; a.ldy = 320;
 *     a.num_spms = 16; a.rank = 1; a.groups = 1; a.rows_per_sample = 4096;
 *     size_t ws; spm_gated_linear_workspace_size(&a, &ws);   // 0 when the fused pattern runs
 *     ... a.workspace = <device buffer of ws bytes>; a.workspace_bytes = ws;
 *     spm_status st = spm_gated_linear_forward(stream, &a);
 *     if (st != SPM_OK) fprintf(stderr, "%s: %s\n", spm_status_string(st), spm_last_error());
 *
 * No CUDA header is needed to use this one: streams are `struct CUstream_st *`, which is both
 * the driver's CUstream and the runtime's cudaStream_t. The library loads libcuda.so.1 itself
 * (dlopen) on first use; it does not link the driver.
 *
 * Thread safety: every function may be called from any thread. Kernels are loaded into the
 * calling thread's current CUDA context on first use in that context.
 */
#ifndef SPM_KERNELS_H
#define SPM_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define SPM_API __declspec(dllexport)
#else
#define SPM_API __attribute__((visibility("default")))
#endif

/* Bumped when spm_gated_linear_args or the meaning of a function changes. */
#define SPM_KERNELS_ABI_VERSION 1

struct CUstream_st;
typedef struct CUstream_st *spm_stream; /* CUstream / cudaStream_t; NULL = legacy default stream */

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
    SPM_ERR_INTERNAL = 11
} spm_status;

typedef enum spm_dtype { SPM_DTYPE_FLOAT16 = 0, SPM_DTYPE_BFLOAT16 = 1 } spm_dtype;

typedef enum spm_combine {
    SPM_COMBINE_ANY = -1, /* only in spm_variant_info: a variant that serves both */
    SPM_COMBINE_LINEAR = 0,
    SPM_COMBINE_OFFICIAL = 1
} spm_combine;

typedef enum spm_pattern {
    SPM_PATTERN_AUTO = 0,  /* fused when pad16(K*r) <= 32, else split (the Triton launcher's rule) */
    SPM_PATTERN_FUSED = 1, /* shrink inside the GEMM: one launch, no workspace; K*r <= 32 */
    SPM_PATTERN_SPLIT = 2  /* shrink kernel writes c to the workspace, then GEMM + expand */
} spm_pattern;

typedef enum spm_kernel_kind { SPM_KERNEL_FWD = 0, SPM_KERNEL_SHRINK = 1 } spm_kernel_kind;

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

/* What a forward would launch on a device of `arch` (see spm_gated_linear_plan). */
typedef struct spm_launch_plan {
    int fused;              /* 1: one fused launch; 0: shrink + forward */
    int shrink_variant;     /* index into spm_kernels_info()->variants, -1 when fused */
    int forward_variant;    /* index into spm_kernels_info()->variants */
    unsigned int shrink_grid[3];
    unsigned int forward_grid[3];
    size_t workspace_bytes; /* needed in args->workspace (0 when fused) */
} spm_launch_plan;

/* Run y = x W^T + b + coefficients(x D^T) U^T on `stream` (asynchronous; returns after launch).
 * Validates everything first: a bad argument returns an error code and launches nothing. */
SPM_API spm_status spm_gated_linear_forward(spm_stream stream, const spm_gated_linear_args *args);

/* Workspace the forward needs for these arguments (0 for the fused pattern). Validates args. */
SPM_API spm_status spm_gated_linear_workspace_size(const spm_gated_linear_args *args, size_t *bytes);

/* Validate args and pick variants for compute capability `arch` (e.g. 90, 86) without a GPU. */
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
