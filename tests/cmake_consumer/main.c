/* Consumer of the installed package: the header compiles without cuda.h, the library links and
 * reports its contents, and a bad call returns an error code. */
#include <spm_kernels.h>

#include <stdio.h>

int main(void) {
    const spm_library_info *info = spm_kernels_info();
    printf("spm_kernels %s (abi %d): %d variants for", info->version, info->abi_version, info->num_variants);
    for (int i = 0; i < info->num_archs; ++i) printf(" sm_%d", info->archs[i]);
    printf("\n");
    spm_status st = spm_gated_linear_forward(NULL, NULL);
    printf("forward(NULL): %s (%s)\n", spm_status_string(st), spm_last_error());
    return info->num_variants > 0 && st == SPM_ERR_INVALID_ARGUMENT ? 0 : 1;
}
