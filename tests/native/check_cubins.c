/* Every cubin embedded in libspm_kernels is a valid ELF for its architecture, holds its kernel
 * function, and (for the aligned variants that SD shapes use) does not spill: checked with cuobjdump (the CUDA toolkit's or Triton's copy).
 * usage: spm_check_cubins CUOBJDUMP OUT_DIR   (exit 77 = skipped: no cuobjdump) */
#include "spm_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int run(const char *cmd, char *out, size_t len) {
    FILE *p = popen(cmd, "r");
    if (!p) return -1;
    size_t n = fread(out, 1, len - 1, p);
    out[n] = 0;
    return pclose(p);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s CUOBJDUMP OUT_DIR\n", argv[0]);
        return 2;
    }
    const char *cuobjdump = argv[1], *dir = argv[2];
    if (!*cuobjdump || strstr(cuobjdump, "NOTFOUND") || access(cuobjdump, X_OK) != 0) {
        printf("SKIPPED: cuobjdump not found (%s): install the CUDA toolkit or triton, or pass "
               "-DSPM_CUOBJDUMP=/path/to/cuobjdump\n", cuobjdump);
        return 77;
    }
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
        perror(dir);
        return 1;
    }
    static char out[1 << 16];
    int failures = 0, n = 0, generic_spills = 0;
    for (const spm_kernel_variant *v; (v = spm__variant(n)) != NULL; ++n) {
        char path[1024], cmd[2300], want_arch[32];
        snprintf(path, sizeof path, "%s/%s.cubin", dir, v->info.name);
        FILE *f = fopen(path, "wb");
        if (!f || fwrite(v->image, 1, v->info.cubin_bytes, f) != v->info.cubin_bytes) {
            fprintf(stderr, "FAIL %s: cannot write %s\n", v->info.name, path);
            return 1;
        }
        fclose(f);
        /* Triton compiles capability >= 90 as the arch-specific target (sm_90a) */
        snprintf(want_arch, sizeof want_arch, v->info.arch >= 90 ? "sm_%da" : "sm_%d", v->info.arch);
        snprintf(cmd, sizeof cmd, "'%s' -lelf '%s' 2>&1", cuobjdump, path);
        int rc = run(cmd, out, sizeof out);
        char needle[48];
        snprintf(needle, sizeof needle, ".%s.", want_arch); /* "ELF file 1: NAME.sm_90a.cubin" */
        if (rc != 0 || !strstr(out, needle)) {
            fprintf(stderr, "FAIL %s: cuobjdump -lelf does not list a %s ELF (rc %d):\n%s\n", v->info.name, want_arch,
                    rc, out);
            ++failures;
            continue;
        }
        snprintf(cmd, sizeof cmd, "'%s' --dump-resource-usage '%s' 2>&1", cuobjdump, path);
        rc = run(cmd, out, sizeof out);
        char fn[256];
        snprintf(fn, sizeof fn, "Function %s:", v->function);
        const char *at = strstr(out, fn);
        const char *reg = at ? strstr(at, "REG:") : NULL;
        const char *stack = at ? strstr(at, "STACK:") : NULL;
        if (rc != 0 || !at || !reg || !stack) {
            fprintf(stderr, "FAIL %s: no resource usage for %s (rc %d):\n%s\n", v->info.name, v->function, rc, out);
            ++failures;
            continue;
        }
        int regs = atoi(reg + 4), stack_bytes = atoi(stack + 6);
        if (stack_bytes != 0 && v->info.aligned) {
            fprintf(stderr, "FAIL %s: %d-byte stack frame (register spills), %d registers\n", v->info.name,
                    stack_bytes, regs);
            ++failures;
            continue;
        }
        if (stack_bytes != 0) ++generic_spills; /* the masked fallback for odd shapes: reported, allowed */
        printf("%s %-60s %-6s REG %3d STACK %d SHARED(dyn) %6d cubin %6zu B\n", stack_bytes ? "SPILL(generic)" : "ok",
               v->info.name, want_arch, regs, stack_bytes, v->info.shared_bytes, v->info.cubin_bytes);
    }
    if (n == 0) {
        fprintf(stderr, "FAIL: the library holds no cubins\n");
        return 1;
    }
    printf("%d cubins checked with %s: %d failed; %d generic (odd-shape fallback) variants spill\n", n, cuobjdump,
           failures, generic_spills);
    return failures ? 1 : 0;
}
