# ctest driver: install the build tree into a scratch prefix, configure + build the consumer
# against it with find_package(spm_kernels), run it.
# cmake -DBUILD_DIR=... -DSOURCE_DIR=... -DWORK_DIR=... -DGENERATOR=... -DC_COMPILER=... -P run.cmake
file(REMOVE_RECURSE "${WORK_DIR}")
set(prefix "${WORK_DIR}/prefix")
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${prefix}" COMMAND_ERROR_IS_FATAL ANY)
foreach(f include/spm_kernels.h)
  if(NOT EXISTS "${prefix}/${f}")
    message(FATAL_ERROR "install did not write ${f}")
  endif()
endforeach()
file(GLOB_RECURSE configs "${prefix}/*/spm_kernelsConfig.cmake")
if(NOT configs)
  message(FATAL_ERROR "install did not write spm_kernelsConfig.cmake")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${WORK_DIR}/build" -G "${GENERATOR}"
  "-DCMAKE_C_COMPILER=${C_COMPILER}" "-DCMAKE_PREFIX_PATH=${prefix}" COMMAND_ERROR_IS_FATAL ANY)
execute_process(COMMAND "${CMAKE_COMMAND}" --build "${WORK_DIR}/build" COMMAND_ERROR_IS_FATAL ANY)
execute_process(COMMAND "${WORK_DIR}/build/spm_consumer" RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "spm_consumer failed (${rc})")
endif()
message(STATUS "consumer found, linked and ran against ${prefix}")
