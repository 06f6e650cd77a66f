/* CPU tests of libspm_kernels: the library loads, spm_kernels_info() lists the expected variants,
 * argument validation returns the right codes with messages, the variant picker chooses what the
 * Triton launcher would, and a machine without a driver gets SPM_ERR_NO_DRIVER/NO_DEVICE.
 *
 * usage: spm_test_api --archs 80,90 --ranks 1 [--expect-no-driver] */
#include "spm_kernels.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int g_failures, g_checks;

#define CHECK(cond, ...)                                                                            \
    do {                                                                                            \
        ++g_checks;                                                                                 \
        if (!(cond)) {                                                                              \
            ++g_failures;                                                                           \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                        \
            fprintf(stderr, __VA_ARGS__);                                                           \
            fprintf(stderr, "\n");                                                                  \
        }                                                                                           \
    } while (0)

static int parse_list(const char *s, int *out, int cap) {
    int n = 0;
    while (s && *s && n < cap) {
        out[n++] = atoi(s);
        s = strchr(s, ',');
        if (s) ++s;
    }
    return n;
}

/* A valid SD1.5 self-attention projection with fake, 256-byte aligned device pointers (the plan
 * and the validation never dereference them). */
static spm_gated_linear_args sd15(void) {
    spm_gated_linear_args a;
    memset(&a, 0, sizeof a);
    a.x = (void *)0x100000;
    a.weight = (void *)0x200000;
    a.bias = (void *)0x300000;
    a.down = (void *)0x400000;
    a.up = (void *)0x500000;
    a.scale = (const float *)0x600000;
    a.gates = (const float *)0x700000;
    a.y = (void *)0x800000;
    a.m = 8192;
    a.in_features = 320;
    a.out_features = 320;
    a.ldx = 320;
    a.ldy = 320;
    a.rows_per_sample = 4096;
    a.num_spms = 16;
    a.rank = 1;
    a.groups = 1;
    a.dtype = SPM_DTYPE_FLOAT16;
    a.combine = SPM_COMBINE_LINEAR;
    a.pattern = SPM_PATTERN_AUTO;
    return a;
}

static const char *vname(int i) {
    const spm_library_info *info = spm_kernels_info();
    return i >= 0 && i < info->num_variants ? info->variants[i].name : "(none)";
}

static void expect_status(spm_status got, spm_status want, const char *what) {
    CHECK(got == want, "%s: got %s, want %s (last error: %s)", what, spm_status_string(got), spm_status_string(want),
          spm_last_error());
    if (got != SPM_OK) CHECK(spm_last_error()[0] != 0, "%s: no error message", what);
}

/* plan on `arch`, expect OK and the named forward (and shrink) variants */
static void expect_plan(const spm_gated_linear_args *a, int arch, const char *fwd, const char *shrink,
                        unsigned gx, unsigned gy, size_t ws, const char *what) {
    spm_launch_plan p;
    spm_status st = spm_gated_linear_plan(a, arch, &p);
    expect_status(st, SPM_OK, what);
    if (st != SPM_OK) return;
    CHECK(strcmp(vname(p.forward_variant), fwd) == 0, "%s: forward variant %s, want %s", what,
          vname(p.forward_variant), fwd);
    if (shrink) {
        CHECK(!p.fused && strcmp(vname(p.shrink_variant), shrink) == 0, "%s: shrink variant %s, want %s", what,
              vname(p.shrink_variant), shrink);
    } else {
        CHECK(p.fused && p.shrink_variant == -1, "%s: expected the fused pattern", what);
    }
    CHECK(p.forward_grid[0] == gx && p.forward_grid[1] == gy && p.forward_grid[2] == 1,
          "%s: forward grid (%u, %u, %u), want (%u, %u, 1)", what, p.forward_grid[0], p.forward_grid[1],
          p.forward_grid[2], gx, gy);
    CHECK(p.workspace_bytes == ws, "%s: workspace %zu, want %zu", what, p.workspace_bytes, ws);
    size_t ws2 = 1;
    expect_status(spm_gated_linear_workspace_size(a, &ws2), SPM_OK, what);
    CHECK(ws2 == ws, "%s: workspace_size %zu, want %zu", what, ws2, ws);
}

static int has_variant(const char *name) {
    const spm_library_info *info = spm_kernels_info();
    for (int i = 0; i < info->num_variants; ++i)
        if (strcmp(info->variants[i].name, name) == 0) return 1;
    return 0;
}

static void test_info(const int *archs, int num_archs, const int *ranks, int num_ranks) {
    const spm_library_info *info = spm_kernels_info();
    CHECK(info != NULL, "spm_kernels_info() is NULL");
    CHECK(info->abi_version == SPM_KERNELS_ABI_VERSION && spm_kernels_abi_version() == SPM_KERNELS_ABI_VERSION,
          "abi %d / %d", info->abi_version, spm_kernels_abi_version());
    CHECK(spm_gated_linear_args_size() == sizeof(spm_gated_linear_args), "args size");
    CHECK(info->num_archs == num_archs, "num_archs %d, want %d", info->num_archs, num_archs);
    for (int i = 0; i < num_archs && i < info->num_archs; ++i)
        CHECK(info->archs[i] == archs[i], "arch %d is %d, want %d", i, info->archs[i], archs[i]);
    CHECK(info->num_ranks == num_ranks, "num_ranks %d, want %d", info->num_ranks, num_ranks);
    CHECK(info->max_fused_rank == 32 && info->max_split_rank == 128, "max ranks %d %d", info->max_fused_rank,
          info->max_split_rank);
    /* per arch and dtype: fused (combine x rank x R16/R32 x bias x 3 layouts), split forward
     * (bias x 3 layouts), shrink (combine x rank x R64/R128 x 2 layouts) */
    int per = 2 * num_ranks * 2 * 2 * 3 + 2 * 3 + 2 * num_ranks * 2 * 2;
    CHECK(info->num_variants == num_archs * 2 * per, "%d variants, want %d", info->num_variants,
          num_archs * 2 * per);
    const char *dt[] = {"fp16", "bf16"}, *comb[] = {"linear", "official"}, *bias[] = {"nobias", "bias"};
    const char *layouts[] = {"aligned_M128", "aligned_M64", "generic_M64"};
    char name[160];
    for (int a = 0; a < num_archs; ++a)
        for (int d = 0; d < 2; ++d) {
            for (int b = 0; b < 2; ++b)
                for (int l = 0; l < 3; ++l) {
                    for (int c = 0; c < 2; ++c)
                        for (int r = 0; r < num_ranks; ++r)
                            for (int br = 16; br <= 32; br *= 2) {
                                snprintf(name, sizeof name, "fwd_fused_%s_r%d_R%d_%s_%s_%s_sm%d", comb[c], ranks[r],
                                         br, bias[b], layouts[l], dt[d], archs[a]);
                                CHECK(has_variant(name), "missing variant %s", name);
                            }
                    snprintf(name, sizeof name, "fwd_split_R64_%s_%s_%s_sm%d", bias[b], layouts[l], dt[d], archs[a]);
                    CHECK(has_variant(name), "missing variant %s", name);
                }
            for (int c = 0; c < 2; ++c)
                for (int r = 0; r < num_ranks; ++r)
                    for (int br = 64; br <= 128; br *= 2)
                        for (int al = 0; al < 2; ++al) {
                            snprintf(name, sizeof name, "shrink_%s_r%d_R%d_%s_M64_%s_sm%d", comb[c], ranks[r], br,
                                     al ? "generic" : "aligned", dt[d], archs[a]);
                            CHECK(has_variant(name), "missing variant %s", name);
                        }
        }
    for (int i = 0; i < info->num_variants; ++i) {
        const spm_variant_info *v = &info->variants[i];
        CHECK(v->cubin_bytes > 1000 && v->num_warps == (v->aligned ? 4 : 8) && v->block_m > 0 &&
                  v->shared_bytes >= 0 && v->aligned == (v->aligned ? (v->fused ? 1 : 2) : 0),
              "variant %s: implausible launch parameters", v->name);
    }
    const char *json = spm_kernels_info_json();
    CHECK(json && json[0] == '{' && strstr(json, "\"variants\": [") && strstr(json, "\"archs\": ["), "json: %.80s",
          json ? json : "(null)");
    printf("info: %d variants, archs", info->num_variants);
    for (int i = 0; i < info->num_archs; ++i) printf(" sm_%d", info->archs[i]);
    printf(", triton %s\n", info->triton_version);
}

static void test_arch_rule(const int *archs, int num_archs) {
    int has80 = 0, has90 = 0;
    for (int i = 0; i < num_archs; ++i) has80 |= archs[i] == 80, has90 |= archs[i] == 90;
    if (has80) {
        CHECK(spm_kernels_arch_for_cc(80) == 80, "cc 80");
        CHECK(spm_kernels_arch_for_cc(86) == 80, "cc 86 runs sm_80 cubins");
        CHECK(spm_kernels_arch_for_cc(89) == 80, "cc 89 runs sm_80 cubins");
    }
    if (has90) CHECK(spm_kernels_arch_for_cc(90) == 90, "cc 90");
    CHECK(spm_kernels_arch_for_cc(75) == 0, "cc 75 has no kernels");
    CHECK(spm_kernels_arch_for_cc(100) == 0, "sm_90a cubins do not run on cc 100");
    CHECK(spm_kernels_arch_for_cc(120) == 0, "cc 120");
}

static void test_validation(int arch) {
    spm_launch_plan p;
    spm_gated_linear_args a;
    size_t ws;
    expect_status(spm_gated_linear_plan(NULL, arch, &p), SPM_ERR_INVALID_ARGUMENT, "NULL args");
    expect_status(spm_gated_linear_forward(NULL, NULL), SPM_ERR_INVALID_ARGUMENT, "forward NULL args");
    a = sd15();
    expect_status(spm_gated_linear_plan(&a, arch, NULL), SPM_ERR_INVALID_ARGUMENT, "NULL plan");
    expect_status(spm_gated_linear_workspace_size(&a, NULL), SPM_ERR_INVALID_ARGUMENT, "NULL bytes");
    a = sd15(); a.dtype = (spm_dtype)7;
    expect_status(spm_gated_linear_plan(&a, arch, &p), SPM_ERR_INVALID_ARGUMENT, "bad dtype");
    a = sd15(); a.combine = (spm_combine)5;
    expect_status(spm_gated_linear_plan(&a, arch, &p), SPM_ERR_INVALID_ARGUMENT, "bad combine");
    a = sd15(); a.combine = SPM_COMBINE_ANY;
    expect_status(spm_gated_linear_plan(&a, arch, &p), SPM_ERR_INVALID_ARGUMENT, "combine ANY is not an op");
    a = sd15(); a.pattern = (spm_pattern)9;
    expect_status(spm_gated_linear_plan(&a, arch, &p), SPM_ERR_INVALID_ARGUMENT, "bad pattern");
    a = sd15(); a.scale_per_group = 2;
    expect_status(spm_gated_linear_plan(&a, arch, &p), SPM_ERR_INVALID_ARGUMENT, "bad scale_per_group");
    a = sd15(); a.x = NULL;
    expect_status(spm_gated_linear_forward(NULL, &a), SPM_ERR_INVALID_ARGUMENT, "NULL x");
    a = sd15(); a.gates = NULL;
    expect_status(spm_gated_linear_plan(&a, arch, &p), SPM_ERR_INVALID_ARGUMENT, "NULL gates");
    a = sd15(); a.x = (void *)0x100001;
    expect_status(spm_gated_linear_plan(&a, arch, &p), SPM_ERR_INVALID_ARGUMENT, "x not element-aligned");
    a = sd15(); a.scale = (const float *)0x600002;
    expect_status(spm_gated_linear_plan(&a, arch, &p), SPM_ERR_INVALID_ARGUMENT, "scale not float-aligned");
    a = sd15(); a.m = 8191;
    expect_status(spm_gated_linear_forward(NULL, &a), SPM_ERR_SHAPE, "rows not a multiple of rows_per_sample");
    a = sd15(); a.m = -4;
    expect_status(spm_gated_linear_plan(&a, arch, &p), SPM_ERR_SHAPE, "negative m");
    a = sd15(); a.in_features = 0;
    expect_status(spm_gated_linear_plan(&a, arch, &p), SPM_ERR_SHAPE, "in_features 0");
    a = sd15(); a.num_spms = 0;
    expect_status(spm_gated_linear_plan(&a, arch, &p), SPM_ERR_SHAPE, "K 0");
    a = sd15(); a.groups = 0;
    expect_status(spm_gated_linear_plan(&a, arch, &p), SPM_ERR_SHAPE, "groups 0");
    a = sd15(); a.rows_per_sample = 0;
    expect_status(spm_gated_linear_plan(&a, arch, &p), SPM_ERR_SHAPE, "rows_per_sample 0");
    a = sd15(); a.ldx = 300;
    expect_status(spm_gated_linear_plan(&a, arch, &p), SPM_ERR_SHAPE, "ldx < in");
    a = sd15(); a.groups = 3;
    expect_status(spm_gated_linear_plan(&a, arch, &p), SPM_ERR_SHAPE, "ldy < G*out");
    a = sd15(); a.rank = 7;
    expect_status(spm_gated_linear_plan(&a, arch, &p), SPM_ERR_UNSUPPORTED, "rank without variants");
    a = sd15(); a.num_spms = 64; a.pattern = SPM_PATTERN_FUSED;
    expect_status(spm_gated_linear_plan(&a, arch, &p), SPM_ERR_UNSUPPORTED, "fused with K*r = 64");
    a = sd15(); a.num_spms = 129;
    expect_status(spm_gated_linear_plan(&a, arch, &p), SPM_ERR_UNSUPPORTED, "split with K*r = 129");
    a = sd15(); a.in_features = 1LL << 31; a.ldx = a.in_features;
    expect_status(spm_gated_linear_plan(&a, arch, &p), SPM_ERR_TOO_LARGE, "in_features 2^31");
    a = sd15(); a.m = 65536LL * 128; a.rows_per_sample = a.m;
    expect_status(spm_gated_linear_plan(&a, arch, &p), SPM_ERR_TOO_LARGE, "65536 row blocks");
    a = sd15(); a.groups = 70000; a.ldy = 320LL * 70000;
    expect_status(spm_gated_linear_plan(&a, arch, &p), SPM_ERR_TOO_LARGE, "groups above a grid dimension");
    a = sd15(); a.num_spms = 1 << 23; a.rank = 1;
    expect_status(spm_gated_linear_plan(&a, arch, &p), SPM_ERR_TOO_LARGE, "K*r*in above int32");
    a = sd15();
    expect_status(spm_gated_linear_plan(&a, 75, &p), SPM_ERR_ARCH, "plan for an arch that was not built");
    CHECK(strstr(spm_last_error(), "SPM_CUDA_ARCHS") != NULL, "arch message names the cache variable: %s",
          spm_last_error());
    a = sd15(); a.m = 0; a.x = NULL; a.y = NULL;
    expect_status(spm_gated_linear_forward(NULL, &a), SPM_OK, "m = 0 is a no-op (no driver needed)");
    a = sd15(); a.num_spms = 64;
    expect_status(spm_gated_linear_workspace_size(&a, &ws), SPM_OK, "workspace size");
    CHECK(ws == 8192u * 64u * 2u, "workspace %zu", ws);
    for (int s = -1; s <= 12; ++s) CHECK(spm_status_string((spm_status)s) != NULL, "status string %d", s);
}

static void test_plans(int arch, const int *ranks, int num_ranks) {
    char f[160], s[160];
    const char *dt = "fp16";
    spm_gated_linear_args a = sd15();
    /* SD1.5 self-attention projection, K = 16: fused, 128-row tiles, 5 x 64 tiles */
    snprintf(f, sizeof f, "fwd_fused_linear_r1_R16_bias_aligned_M128_%s_sm%d", dt, arch);
    expect_plan(&a, arch, f, NULL, 5, 64, 0, "sd15 K=16");
    a.bias = NULL; a.combine = SPM_COMBINE_OFFICIAL; a.dtype = SPM_DTYPE_BFLOAT16;
    snprintf(f, sizeof f, "fwd_fused_official_r1_R16_nobias_aligned_M128_bf16_sm%d", arch);
    expect_plan(&a, arch, f, NULL, 5, 64, 0, "sd15 official bf16 no bias");
    a = sd15(); a.num_spms = 32;
    snprintf(f, sizeof f, "fwd_fused_linear_r1_R32_bias_aligned_M128_%s_sm%d", dt, arch);
    expect_plan(&a, arch, f, NULL, 5, 64, 0, "K=32 fused R32");
    a = sd15(); a.num_spms = 5;
    snprintf(f, sizeof f, "fwd_fused_linear_r1_R16_bias_aligned_M128_%s_sm%d", dt, arch);
    expect_plan(&a, arch, f, NULL, 5, 64, 0, "K=5 pads to R16");
    /* grouped q/k/v: one launch over 3 groups, scale per group */
    a = sd15(); a.groups = 3; a.ldy = 960; a.bias = NULL; a.scale_per_group = 1;
    snprintf(f, sizeof f, "fwd_fused_linear_r1_R16_nobias_aligned_M128_%s_sm%d", dt, arch);
    expect_plan(&a, arch, f, NULL, 15, 64, 0, "q/k/v groups=3");
    /* K = 64: split, shrink R64 + forward with c from the workspace */
    a = sd15(); a.num_spms = 64;
    snprintf(f, sizeof f, "fwd_split_R64_bias_aligned_M128_%s_sm%d", dt, arch);
    snprintf(s, sizeof s, "shrink_linear_r1_R64_aligned_M64_%s_sm%d", dt, arch);
    expect_plan(&a, arch, f, s, 5, 64, 8192u * 64u * 2u, "K=64 split");
    a.num_spms = 96; a.combine = SPM_COMBINE_OFFICIAL;
    snprintf(s, sizeof s, "shrink_official_r1_R128_aligned_M64_%s_sm%d", dt, arch);
    expect_plan(&a, arch, f, s, 5, 64, 8192u * 96u * 2u, "K=96 split, R128 shrink");
    /* K*r % 16 != 0: the split kernels' aligned variants assume it, so the generic ones run */
    a.num_spms = 100; a.groups = 3; a.ldy = 960;
    snprintf(f, sizeof f, "fwd_split_R64_bias_generic_M64_%s_sm%d", dt, arch);
    snprintf(s, sizeof s, "shrink_official_r1_R128_generic_M64_%s_sm%d", dt, arch);
    expect_plan(&a, arch, f, s, 15, 128, 8192u * 304u * 2u, "K=100 x 3 groups split, ldc = 304");
    snprintf(f, sizeof f, "fwd_split_R64_bias_aligned_M128_%s_sm%d", dt, arch);
    a = sd15(); a.pattern = SPM_PATTERN_SPLIT;
    snprintf(s, sizeof s, "shrink_linear_r1_R64_aligned_M64_%s_sm%d", dt, arch);
    expect_plan(&a, arch, f, s, 5, 64, 8192u * 16u * 2u, "forced split at K=16");
    /* cross-attention k/v: 2 x 77 text tokens, 768 -> 320: 64-row tiles */
    a = sd15(); a.m = 154; a.rows_per_sample = 77; a.in_features = 768; a.ldx = 768; a.num_spms = 4; a.bias = NULL;
    snprintf(f, sizeof f, "fwd_fused_linear_r1_R16_nobias_aligned_M64_%s_sm%d", dt, arch);
    expect_plan(&a, arch, f, NULL, 5, 3, 0, "cross-attn k/v");
    /* odd shapes: the masked generic variants */
    a = sd15(); a.in_features = 300; a.ldx = 304;
    snprintf(f, sizeof f, "fwd_fused_linear_r1_R16_bias_generic_M64_%s_sm%d", dt, arch);
    expect_plan(&a, arch, f, NULL, 5, 128, 0, "in = 300");
    a = sd15(); a.out_features = 200; a.ldy = 200;
    expect_plan(&a, arch, f, NULL, 4, 128, 0, "out = 200");
    a = sd15(); a.x = (void *)0x100002;
    expect_plan(&a, arch, f, NULL, 5, 128, 0, "x 2-byte aligned only");
    a = sd15(); a.ldx = 328;
    expect_plan(&a, arch, f, NULL, 5, 128, 0, "ldx not a multiple of 16");
    a = sd15(); a.in_features = 352; a.ldx = 352; /* % 16 but not % 64: EVEN_K off */
    expect_plan(&a, arch, f, NULL, 5, 128, 0, "in = 352");
    for (int r = 0; r < num_ranks; ++r) {
        if (ranks[r] == 1) continue;
        a = sd15(); a.num_spms = 8; a.rank = ranks[r]; a.combine = SPM_COMBINE_OFFICIAL;
        snprintf(f, sizeof f, "fwd_fused_official_r%d_R%d_bias_aligned_M128_%s_sm%d", ranks[r], 8 * ranks[r] <= 16 ? 16 : 32,
                 dt, arch);
        if (8 * ranks[r] <= 32) expect_plan(&a, arch, f, NULL, 5, 64, 0, "rank > 1");
    }
}

static void test_driver(int expect_no_driver) {
    spm_status init = spm_kernels_init();
    spm_gated_linear_args a = sd15();
    spm_status fwd = spm_gated_linear_forward(NULL, &a);
    if (expect_no_driver) {
        expect_status(init, SPM_ERR_NO_DRIVER, "spm_kernels_init without a driver");
        CHECK(strstr(spm_last_error(), "/nonexistent/libcuda.so.1") != NULL, "message names the library: %s",
              spm_last_error());
        expect_status(fwd, SPM_ERR_NO_DRIVER, "forward without a driver");
        int cc = 0;
        expect_status(spm_kernels_device_cc(0, &cc), SPM_ERR_NO_DRIVER, "device_cc without a driver");
        printf("no-driver path: %s: %s\n", spm_status_string(fwd), spm_last_error());
    } else if (init == SPM_OK) {
        printf("a CUDA driver and device are present: the forward is checked by spm_gpu_forward\n");
    } else {
        CHECK(init == SPM_ERR_NO_DRIVER || init == SPM_ERR_NO_DEVICE, "init: %s", spm_status_string(init));
        expect_status(fwd, init, "forward on a machine without a usable driver/device");
        printf("this machine: %s: %s\n", spm_status_string(fwd), spm_last_error());
    }
}

int main(int argc, char **argv) {
    int archs[16], ranks[16], num_archs = 0, num_ranks = 0, expect_no_driver = 0;
    for (int i = 1; i < argc; ++i) {
        if (!strcmp(argv[i], "--archs") && i + 1 < argc) num_archs = parse_list(argv[++i], archs, 16);
        else if (!strcmp(argv[i], "--ranks") && i + 1 < argc) num_ranks = parse_list(argv[++i], ranks, 16);
        else if (!strcmp(argv[i], "--expect-no-driver")) expect_no_driver = 1;
        else {
            fprintf(stderr, "usage: %s --archs 80,90 --ranks 1 [--expect-no-driver]\n", argv[0]);
            return 2;
        }
    }
    if (!num_archs || !num_ranks) {
        fprintf(stderr, "--archs and --ranks are required\n");
        return 2;
    }
    test_info(archs, num_archs, ranks, num_ranks);
    test_arch_rule(archs, num_archs);
    for (int i = 0; i < num_archs; ++i) {
        test_validation(archs[i]);
        test_plans(archs[i], ranks, num_ranks);
    }
    test_driver(expect_no_driver);
    printf("%d checks, %d failed\n", g_checks, g_failures);
    return g_failures ? 1 : 0;
}
