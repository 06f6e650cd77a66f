/* The CUDA driver API, reached at run time: dlopen("libcuda.so.1") and dlsym, never linked.
 * cuda.h provides the types and enums only. Shared by the library and the GPU test. */
#ifndef SPM_CUDA_DRIVER_H
#define SPM_CUDA_DRIVER_H

#include <cuda.h>

typedef struct spm_cuda_driver {
    CUresult (*init)(unsigned int);
    CUresult (*driverGetVersion)(int *);
    CUresult (*getErrorString)(CUresult, const char **);
    CUresult (*getErrorName)(CUresult, const char **);
    CUresult (*deviceGet)(CUdevice *, int);
    CUresult (*deviceGetCount)(int *);
    CUresult (*deviceGetAttribute)(int *, CUdevice_attribute, CUdevice);
    CUresult (*ctxGetCurrent)(CUcontext *);
    CUresult (*ctxSetCurrent)(CUcontext);
    CUresult (*ctxGetDevice)(CUdevice *);
    CUresult (*ctxSynchronize)(void);
    CUresult (*devicePrimaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*ctxPushCurrent)(CUcontext);
    CUresult (*ctxPopCurrent)(CUcontext *);
    CUresult (*streamGetCtx)(CUstream, CUcontext *);
    CUresult (*ctxGetId)(CUcontext, unsigned long long *); /* CUDA 12.0+; NULL with older drivers */
    CUresult (*moduleUnload)(CUmodule);
    CUresult (*moduleLoadData)(CUmodule *, const void *);
    CUresult (*moduleGetFunction)(CUfunction *, CUmodule, const char *);
    CUresult (*funcGetAttribute)(int *, CUfunction_attribute, CUfunction);
    CUresult (*funcSetAttribute)(CUfunction, CUfunction_attribute, int);
    CUresult (*funcSetCacheConfig)(CUfunction, CUfunc_cache);
    CUresult (*launchKernel)(CUfunction, unsigned int, unsigned int, unsigned int, unsigned int, unsigned int,
                             unsigned int, unsigned int, CUstream, void **, void **);
    /* used by the tests only */
    CUresult (*memAlloc)(CUdeviceptr *, size_t);
    CUresult (*memFree)(CUdeviceptr);
    CUresult (*memcpyHtoD)(CUdeviceptr, const void *, size_t);
    CUresult (*memcpyDtoH)(void *, CUdeviceptr, size_t);
    CUresult (*memsetD8)(CUdeviceptr, unsigned char, size_t);
    CUresult (*eventCreate)(CUevent *, unsigned int);
    CUresult (*eventRecord)(CUevent, CUstream);
    CUresult (*eventSynchronize)(CUevent);
    CUresult (*eventElapsedTime)(float *, CUevent, CUevent);
} spm_cuda_driver;

/* Loads libcuda.so.1 (or $SPM_CUDA_DRIVER_LIB) once and calls cuInit(0). Returns NULL with a
 * message in `why` (static storage) when there is no usable driver. Thread-safe. */
const spm_cuda_driver *spm_cuda_driver_get(const char **why);

/* The cuInit result of the load (CUDA_SUCCESS when the driver loaded; -1 when dlopen/dlsym failed). */
int spm_cuda_driver_init_result(void);

/* "cuModuleLoadData: CUDA_ERROR_NO_BINARY_FOR_GPU (no kernel image is available ...)" into buf. */
void spm_cuda_error_text(const spm_cuda_driver *cu, CUresult rc, const char *call, char *buf, size_t len);

#endif
