/* Consumer of the installed package: the header compiles without cuda.h, the library links and
 * reports its contents, the plan API plans without a GPU, and bad calls return error codes. */
#include <spm_kernels.h>

#include <stdio.h>

int main(void) {
    const spm_library_info *info = spm_kernels_info();
    printf("spm_kernels %s (abi %d): %d variants for", info->version, info->abi_version, info->num_variants);
    for (int i = 0; i < info->num_archs; ++i) printf(" sm_%d", info->archs[i]);
    printf("\n");
    int ok = info->num_variants > 0 && info->num_archs > 0 && info->abi_version == SPM_KERNELS_ABI_VERSION;

    /* the plan API from a desc alone: SD1.5 self-attention projection, K = 16 */
    spm_plan_desc d;
    spm_plan_desc_init(&d);
    d.dtype = SPM_DTYPE_FLOAT16; d.combine = SPM_COMBINE_LINEAR; d.pattern = SPM_PATTERN_AUTO;
    d.m = 8192; d.in_features = 320; d.out_features = 320; d.ldx = 320; d.ldy = 320; d.rows_per_sample = 4096;
    d.num_spms = 16; d.rank = 1; d.groups = 1; d.has_bias = 1; d.alignment = 256;
    d.arch = info->num_archs > 0 ? info->archs[0] : 90;
    spm_plan *plan = NULL;
    spm_status st = spm_plan_create(&d, &plan);
    spm_plan_info pi;
    spm_plan_info_init(&pi);
    if (st == SPM_OK) st = spm_plan_get_info(plan, &pi);
    printf("plan: %s, forward %s, grid (%u, %u), n_per_prog %d, workspace %zu\n", spm_status_string(st),
           st == SPM_OK ? info->variants[pi.forward_variant].name : "-", pi.forward_grid[0], pi.forward_grid[1],
           pi.n_per_prog, pi.workspace_bytes);
    ok = ok && st == SPM_OK && pi.fused && pi.workspace_bytes == 0;
    spm_pointers p;
    spm_pointers_init(&p);
    st = spm_plan_execute(plan, &p, NULL);
    printf("execute before prepare: %s\n", spm_status_string(st));
    ok = ok && st == SPM_ERR_NOT_PREPARED;
    spm_plan_destroy(plan);

    st = spm_gated_linear_forward(NULL, NULL);
    printf("forward(NULL): %s (%s)\n", spm_status_string(st), spm_last_error());
    return ok && st == SPM_ERR_INVALID_ARGUMENT ? 0 : 1;
}
