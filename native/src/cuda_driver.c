/* dlopen-based access to the CUDA driver (see cuda_driver.h). */
#include "cuda_driver.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

static spm_cuda_driver g_driver;
static const spm_cuda_driver *g_loaded;
static char g_why[512];
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static int g_init_result = -1;

#define LOAD(field, symbol)                                                                         \
    do {                                                                                            \
        *(void **)(&g_driver.field) = dlsym(lib, symbol);                                           \
        if (!g_driver.field) {                                                                      \
            snprintf(g_why, sizeof g_why, "%s has no symbol %s (driver too old?)", path, symbol);   \
            return;                                                                                 \
        }                                                                                           \
    } while (0)

static void load_once(void) {
    const char *path = getenv("SPM_CUDA_DRIVER_LIB");
    if (!path || !*path) path = "libcuda.so.1";
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        const char *err = dlerror();
        snprintf(g_why, sizeof g_why, "cannot load the CUDA driver %s (%s): no NVIDIA driver on this machine?",
                 path, err ? err : "dlopen failed");
        return;
    }
    LOAD(init, "cuInit");
    LOAD(driverGetVersion, "cuDriverGetVersion");
    LOAD(getErrorString, "cuGetErrorString");
    LOAD(getErrorName, "cuGetErrorName");
    LOAD(deviceGet, "cuDeviceGet");
    LOAD(deviceGetCount, "cuDeviceGetCount");
    LOAD(deviceGetAttribute, "cuDeviceGetAttribute");
    LOAD(ctxGetCurrent, "cuCtxGetCurrent");
    LOAD(ctxSetCurrent, "cuCtxSetCurrent");
    LOAD(ctxGetDevice, "cuCtxGetDevice");
    LOAD(ctxSynchronize, "cuCtxSynchronize");
    LOAD(devicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
    LOAD(ctxPushCurrent, "cuCtxPushCurrent_v2");
    LOAD(ctxPopCurrent, "cuCtxPopCurrent_v2");
    LOAD(streamGetCtx, "cuStreamGetCtx");
    *(void **)(&g_driver.ctxGetId) = dlsym(lib, "cuCtxGetId"); /* optional: CUDA 12.0+ */
    LOAD(moduleUnload, "cuModuleUnload");
    LOAD(moduleLoadData, "cuModuleLoadData");
    LOAD(moduleGetFunction, "cuModuleGetFunction");
    LOAD(funcGetAttribute, "cuFuncGetAttribute");
    LOAD(funcSetAttribute, "cuFuncSetAttribute");
    LOAD(funcSetCacheConfig, "cuFuncSetCacheConfig");
    LOAD(launchKernel, "cuLaunchKernel");
    LOAD(memAlloc, "cuMemAlloc_v2");
    LOAD(memFree, "cuMemFree_v2");
    LOAD(memcpyHtoD, "cuMemcpyHtoD_v2");
    LOAD(memcpyDtoH, "cuMemcpyDtoH_v2");
    LOAD(memsetD8, "cuMemsetD8_v2");
    LOAD(eventCreate, "cuEventCreate");
    LOAD(eventRecord, "cuEventRecord");
    LOAD(eventSynchronize, "cuEventSynchronize");
    LOAD(eventElapsedTime, "cuEventElapsedTime");
    CUresult rc = g_driver.init(0);
    g_init_result = (int)rc;
    if (rc != CUDA_SUCCESS) {
        const char *name = NULL;
        g_driver.getErrorName(rc, &name);
        snprintf(g_why, sizeof g_why, "cuInit failed: %s (%d): driver present but unusable (no device?)",
                 name ? name : "?", (int)rc);
        return;
    }
    g_loaded = &g_driver;
}

const spm_cuda_driver *spm_cuda_driver_get(const char **why) {
    pthread_once(&g_once, load_once);
    if (why) *why = g_loaded ? "" : g_why;
    return g_loaded;
}

int spm_cuda_driver_init_result(void) {
    pthread_once(&g_once, load_once);
    return g_init_result;
}

void spm_cuda_error_text(const spm_cuda_driver *cu, CUresult rc, const char *call, char *buf, size_t len) {
    const char *name = NULL, *text = NULL;
    if (cu) {
        cu->getErrorName(rc, &name);
        cu->getErrorString(rc, &text);
    }
    snprintf(buf, len, "%s: %s (%d): %s", call, name ? name : "CUDA_ERROR_?", (int)rc, text ? text : "");
}
