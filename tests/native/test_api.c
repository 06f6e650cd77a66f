/* CPU tests of libspm_kernels: the library loads, spm_kernels_info() lists the variants the tile
 * table asks for, argument validation returns the right codes with messages, plans are created
 * from a desc alone (no GPU, no pointers) and follow the table's rule, and a machine without a
 * driver gets SPM_ERR_NO_DRIVER/NO_DEVICE. (That the C picker and the Triton launcher choose the
 * same kernel for every shape of the GPU check is tests/test_native.py's job: it runs both.)
 *
 * usage: spm_test_api --archs 80,90 --ranks 1 [--expect-no-driver] */
#include "spm_kernels.h"
#include "spm_tile_table.h" /* generated from kernels/tiles.py */

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
    int want_fused = 0;
    for (int a = 0; a < num_archs; ++a) {
        const spm_tile_rule *t = archs[a] >= 90 ? spm_fwd_table_sm90 : spm_fwd_table_sm80;
        int rows = archs[a] >= 90 ? SPM_FWD_TABLE_SM90_ROWS : SPM_FWD_TABLE_SM80_ROWS;
        for (int i = 0; i < rows; ++i) want_fused = t[i].fused_max_rank > want_fused ? t[i].fused_max_rank : want_fused;
    }
    CHECK(info->max_fused_rank == want_fused && info->max_split_rank == 128, "max ranks %d %d",
          info->max_fused_rank, info->max_split_rank);
    /* per arch and dtype, from the arch's table (spm_tile_table.h, generated from kernels/tiles.py):
     * per distinct tile, fused (combine x rank x BLOCK_R 16 .. fused_max_rank x bias) and split
     * forward (bias); the generic split forward (bias); shrink (combine x rank x R64/R128 x
     * aligned/generic) */
    const char *dt[] = {"fp16", "bf16"}, *comb[] = {"linear", "official"}, *bias[] = {"nobias", "bias"};
    char name[160], tile[64];
    int want_total = 0;
    for (int a = 0; a < num_archs; ++a) {
        const spm_tile_rule *t = archs[a] >= 90 ? spm_fwd_table_sm90 : spm_fwd_table_sm80;
        int rows = archs[a] >= 90 ? SPM_FWD_TABLE_SM90_ROWS : SPM_FWD_TABLE_SM80_ROWS;
        for (int d = 0; d < 2; ++d) {
            for (int i = 0; i < rows; ++i) {
                int seen = 0; /* a tile of an earlier row: compiled once */
                for (int j = 0; j < i; ++j)
                    seen |= t[j].block_m == t[i].block_m && t[j].block_n == t[i].block_n &&
                            t[j].num_warps == t[i].num_warps && t[j].num_stages == t[i].num_stages &&
                            t[j].fused_max_rank == t[i].fused_max_rank;
                if (seen) continue;
                snprintf(tile, sizeof tile, "aligned_M%dN%dw%d", t[i].block_m, t[i].block_n, t[i].num_warps);
                for (int b = 0; b < 2; ++b) {
                    for (int c = 0; c < 2; ++c)
                        for (int r = 0; r < num_ranks; ++r)
                            for (int br = 16; br <= t[i].fused_max_rank; br *= 2) {
                                snprintf(name, sizeof name, "fwd_fused_%s_r%d_R%d_%s_%s_%s_sm%d", comb[c], ranks[r],
                                         br, bias[b], tile, dt[d], archs[a]);
                                CHECK(has_variant(name), "missing variant %s", name);
                                ++want_total;
                            }
                    snprintf(name, sizeof name, "fwd_split_R64_%s_%s_%s_sm%d", bias[b], tile, dt[d], archs[a]);
                    CHECK(has_variant(name), "missing variant %s", name);
                    ++want_total;
                }
            }
            for (int b = 0; b < 2; ++b) {
                snprintf(name, sizeof name, "fwd_split_R64_%s_generic_M64N64w8_%s_sm%d", bias[b], dt[d], archs[a]);
                CHECK(has_variant(name), "missing variant %s", name);
                ++want_total;
            }
            for (int c = 0; c < 2; ++c)
                for (int r = 0; r < num_ranks; ++r)
                    for (int br = 64; br <= 128; br *= 2)
                        for (int al = 0; al < 2; ++al) {
                            snprintf(name, sizeof name, "shrink_%s_r%d_R%d_%s_M64_%s_sm%d", comb[c], ranks[r], br,
                                     al ? "generic" : "aligned", dt[d], archs[a]);
                            CHECK(has_variant(name), "missing variant %s", name);
                            ++want_total;
                        }
        }
    }
    CHECK(info->num_variants == want_total, "%d variants, want %d", info->num_variants, want_total);
    for (int i = 0; i < info->num_variants; ++i) {
        const spm_variant_info *v = &info->variants[i];
        int want_aligned = !strstr(v->name, "_generic_") ? (v->kernel == SPM_KERNEL_FWD && v->fused ? 1 : 2) : 0;
        CHECK(v->cubin_bytes > 1000 && (v->num_warps == 4 || v->num_warps == 8) && v->block_m > 0 &&
                  v->shared_bytes >= 0 && v->aligned == want_aligned && (v->aligned || v->num_warps == 8),
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
    a = sd15(); a.num_spms = 80; a.pattern = SPM_PATTERN_FUSED;
    expect_status(spm_gated_linear_plan(&a, arch, &p), SPM_ERR_UNSUPPORTED, "fused with K*r = 80 (R128)");
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
    a = sd15(); a.num_spms = 96;
    expect_status(spm_gated_linear_workspace_size(&a, &ws), SPM_OK, "workspace size");
    CHECK(ws == 8192u * 96u * 2u, "workspace %zu", ws);
    for (int s = -1; s <= 12; ++s) CHECK(spm_status_string((spm_status)s) != NULL, "status string %d", s);
}

/* A plan desc of the SD1.5 self-attention projection (8192 x 320 -> 320, K = 16), for `arch`. */
static spm_plan_desc desc15(int arch) {
    spm_plan_desc d;
    spm_plan_desc_init(&d);
    d.dtype = SPM_DTYPE_FLOAT16;
    d.combine = SPM_COMBINE_LINEAR;
    d.pattern = SPM_PATTERN_AUTO;
    d.m = 8192;
    d.in_features = 320;
    d.out_features = 320;
    d.ldx = 320;
    d.ldy = 320;
    d.rows_per_sample = 4096;
    d.num_spms = 16;
    d.rank = 1;
    d.groups = 1;
    d.has_bias = 1;
    d.alignment = 256;
    d.arch = arch;
    return d;
}

/* Create a plan (expected OK) and return its info; the variant names through *fwd / *shrink. */
static int plan_info(const spm_plan_desc *d, spm_plan_info *info, const char **fwd, const char **shrink,
                     const char *what) {
    spm_plan *plan = NULL;
    spm_status st = spm_plan_create(d, &plan);
    expect_status(st, SPM_OK, what);
    if (st != SPM_OK) return 0;
    spm_plan_info_init(info);
    expect_status(spm_plan_get_info(plan, info), SPM_OK, what);
    *fwd = vname(info->forward_variant);
    *shrink = info->shrink_variant >= 0 ? vname(info->shrink_variant) : NULL;
    spm_plan_destroy(plan);
    return 1;
}

static const spm_variant_info *vinfo(int i) { return &spm_kernels_info()->variants[i]; }

/* The plan API on CPU: plans from a desc alone, following the generated tile table. */
static void test_plan_api(int arch) {
    spm_plan_desc d;
    spm_plan_info info;
    const char *fwd, *shrink;
    spm_plan *plan = NULL;
    char want[160];
    const spm_tile_rule *t0 = arch >= 90 ? spm_fwd_table_sm90 : spm_fwd_table_sm80;
    const int hopper = arch >= 90; /* sm_90: 128x128 ff tiles with the N loop; sm_80: 64x64 everywhere */
    /* the table's first row: 64x64 tiles, one N tile per program, whatever the SM count */
    d = desc15(arch);
    if (plan_info(&d, &info, &fwd, &shrink, "sd15 K=16")) {
        const spm_variant_info *v = vinfo(info.forward_variant);
        CHECK(t0[0].block_m == 64 && t0[0].n_loop == 0, "table row 0 changed: update the test");
        snprintf(want, sizeof want, "fwd_fused_linear_r1_R16_bias_aligned_M64N64w4_fp16_sm%d", arch);
        CHECK(!strcmp(fwd, want), "sd15 K=16: %s, want %s", fwd, want);
        CHECK(v->block_m == t0[0].block_m && v->block_n == t0[0].block_n && v->num_warps == t0[0].num_warps &&
                  v->num_stages == t0[0].num_stages,
              "sd15 K=16: variant tile is not the table's");
        CHECK(info.fused && info.n_per_prog == 1 && info.forward_grid[0] == 5 && info.forward_grid[1] == 128 &&
                  info.workspace_bytes == 0 && info.sm_count == 132 && info.arch == arch,
              "sd15 K=16: fused %d n_per_prog %d grid (%u, %u) ws %zu sm %d", info.fused, info.n_per_prog,
              info.forward_grid[0], info.forward_grid[1], info.workspace_bytes, info.sm_count);
    }
    /* ff GEGLU in (8192 x 320 -> 2560): 128x128 tiles looping over N tiles, the count from the SM count */
    int sms[] = {132, 114, 1000}, want_npp[] = {5, 10, 1};
    for (int i = 0; i < 3; ++i) {
        d = desc15(arch);
        d.out_features = 2560; d.ldy = 2560; d.sm_count = sms[i];
        if (plan_info(&d, &info, &fwd, &shrink, "ff GEGLU in") && hopper) {
            CHECK(strstr(fwd, "_aligned_M128N128w8_") && info.n_per_prog == want_npp[i] &&
                      info.forward_grid[0] == 20u / (unsigned)want_npp[i] && info.forward_grid[1] == 64,
                  "ff in, %d SMs: %s n_per_prog %d grid (%u, %u), want n_per_prog %d", sms[i], fwd, info.n_per_prog,
                  info.forward_grid[0], info.forward_grid[1], want_npp[i]);
        } else if (!hopper) {
            CHECK(strstr(fwd, "_aligned_M64N64w4_") && info.n_per_prog == 1 && info.forward_grid[0] == 40 &&
                      info.forward_grid[1] == 128, "ff in on sm_%d: %s n_per_prog %d grid (%u, %u)", arch, fwd,
                  info.n_per_prog, info.forward_grid[0], info.forward_grid[1]);
        }
    }
    /* K*r above the fused limit (64): shrink + split forward with the table's tile, workspace */
    d = desc15(arch); d.num_spms = 96; d.combine = SPM_COMBINE_OFFICIAL;
    if (plan_info(&d, &info, &fwd, &shrink, "K=96 split")) {
        snprintf(want, sizeof want, "shrink_official_r1_R128_aligned_M64_fp16_sm%d", arch);
        CHECK(!info.fused && shrink && !strcmp(shrink, want) && strstr(fwd, "fwd_split_R64_bias_aligned_M64N64w4") &&
                  info.workspace_bytes == 8192u * 96u * 2u && info.n_per_prog == 1,
              "K=96: %s + %s, ws %zu", shrink ? shrink : "(none)", fwd, info.workspace_bytes);
    }
    /* grouped q/k/v, bf16, no bias, K = 64 fused at R64 */
    d = desc15(arch); d.groups = 3; d.ldy = 960; d.has_bias = 0; d.num_spms = 64; d.dtype = SPM_DTYPE_BFLOAT16;
    d.scale_per_group = 1;
    if (plan_info(&d, &info, &fwd, &shrink, "q/k/v")) {
        if (hopper) snprintf(want, sizeof want, "fwd_fused_linear_r1_R64_nobias_aligned_M64N64w4_bf16_sm%d", arch);
        else snprintf(want, sizeof want, "fwd_split_R64_nobias_aligned_M64N64w4_bf16_sm%d", arch); /* fused <= 32 */
        CHECK(!strcmp(fwd, want) && info.forward_grid[0] == 15 && info.forward_grid[1] == 128, "q/k/v: %s (%u, %u)",
              fwd, info.forward_grid[0], info.forward_grid[1]);
    }
    /* what the aligned variants cannot take: the masked generic split variants */
    d = desc15(arch); d.alignment = 2;
    if (plan_info(&d, &info, &fwd, &shrink, "2-byte alignment"))
        CHECK(!info.fused && strstr(fwd, "_generic_M64N64w8_") && shrink && strstr(shrink, "_R64_generic_"),
              "2-byte alignment: %s + %s", shrink ? shrink : "(none)", fwd);
    d = desc15(arch); d.in_features = 300; d.ldx = 304;
    if (plan_info(&d, &info, &fwd, &shrink, "in = 300"))
        CHECK(!info.fused && strstr(fwd, "_generic_"), "in = 300: %s", fwd);
    d = desc15(arch); d.alignment = 2; d.pattern = SPM_PATTERN_FUSED;
    expect_status(spm_plan_create(&d, &plan), SPM_ERR_UNSUPPORTED, "forced fused on unaligned shapes");
    CHECK(plan == NULL, "a failed create leaves *plan NULL");
    /* strided gates: any row stride >= K, or broadcast (stride 0) */
    d = desc15(arch); d.ld_gates = 8;
    expect_status(spm_plan_create(&d, &plan), SPM_ERR_SHAPE, "ld_gates < K");
    d = desc15(arch); d.ld_gates = 40;
    expect_status(spm_plan_create(&d, &plan), SPM_OK, "ld_gates 40");
    spm_plan_destroy(plan);
    d = desc15(arch); d.gates_broadcast = 1;
    expect_status(spm_plan_create(&d, &plan), SPM_OK, "broadcast gates");
    spm_plan_destroy(plan);
    /* struct versions, bad values */
    d = desc15(arch); d.struct_size -= 8;
    expect_status(spm_plan_create(&d, &plan), SPM_ERR_VERSION, "desc struct_size");
    d = desc15(arch); d.version = 99;
    expect_status(spm_plan_create(&d, &plan), SPM_ERR_VERSION, "desc version");
    d = desc15(arch); d.alignment = 24;
    expect_status(spm_plan_create(&d, &plan), SPM_ERR_INVALID_ARGUMENT, "alignment not a power of two");
    d = desc15(75);
    expect_status(spm_plan_create(&d, &plan), SPM_ERR_ARCH, "arch not built");
    expect_status(spm_plan_create(NULL, &plan), SPM_ERR_INVALID_ARGUMENT, "NULL desc");
    d = desc15(arch);
    expect_status(spm_plan_create(&d, NULL), SPM_ERR_INVALID_ARGUMENT, "NULL plan");
    /* execute without prepare: refused before any driver call; m = 0 is a no-op */
    d = desc15(arch);
    expect_status(spm_plan_create(&d, &plan), SPM_OK, "plan for execute");
    spm_pointers p;
    spm_pointers_init(&p);
    expect_status(spm_plan_execute(plan, &p, NULL), SPM_ERR_NOT_PREPARED, "execute before prepare");
    p.version = 7;
    expect_status(spm_plan_execute(plan, &p, NULL), SPM_ERR_VERSION, "pointers version");
    spm_plan_info_init(&info);
    info.struct_size = 3;
    expect_status(spm_plan_get_info(plan, &info), SPM_ERR_VERSION, "info struct_size");
    spm_plan_destroy(plan);
    d = desc15(arch); d.m = 0;
    expect_status(spm_plan_create(&d, &plan), SPM_OK, "m = 0");
    spm_pointers_init(&p);
    expect_status(spm_plan_execute(plan, &p, NULL), SPM_OK, "m = 0 executes as a no-op");
    spm_plan_destroy(plan);
    spm_plan_destroy(NULL);
}

/* The one-call API's plan (version 1) is the plan core's: spot checks. */
static void test_plans(int arch) {
    char f[160];
    spm_gated_linear_args a = sd15();
    snprintf(f, sizeof f, "fwd_fused_linear_r1_R16_bias_aligned_M64N64w4_fp16_sm%d", arch);
    expect_plan(&a, arch, f, NULL, 5, 128, 0, "one-call sd15 K=16");
    a = sd15(); a.x = (void *)0x100002; /* 2-byte aligned only: the generic split variants */
    spm_launch_plan p;
    expect_status(spm_gated_linear_plan(&a, arch, &p), SPM_OK, "one-call unaligned x");
    CHECK(!p.fused && strstr(vname(p.forward_variant), "_generic_"), "one-call unaligned x: %s",
          vname(p.forward_variant));
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
        spm_plan_desc d = desc15(0); /* arch 0: the current device's, which needs the driver */
        spm_plan *plan = NULL;
        expect_status(spm_plan_create(&d, &plan), SPM_ERR_NO_DRIVER, "plan for the current device without a driver");
        d = desc15(spm_kernels_info()->archs[0]);
        expect_status(spm_plan_create(&d, &plan), SPM_OK, "plan for a given arch without a driver");
        expect_status(spm_plan_prepare(plan, NULL), SPM_ERR_NO_DRIVER, "prepare without a driver");
        spm_plan_destroy(plan);
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
        test_plans(archs[i]);
        test_plan_api(archs[i]);
    }
    test_driver(expect_no_driver);
    printf("%d checks, %d failed\n", g_checks, g_failures);
    return g_failures ? 1 : 0;
}
