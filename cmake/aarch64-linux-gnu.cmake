# CMake toolchain file: cross-compile relayq_run for 64-bit ARM Linux with Debian's
# g++-aarch64-linux-gnu. Pass the aarch64 TVM runtime too (the headers come from the host wheel):
#
#   cmake -S . -B build/aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake \
#         -DRELAYQ_TVM_RUNTIME_LIB=/path/to/aarch64/libtvm_runtime.so \
#         -DRELAYQ_TVM_FFI_LIB=/path/to/aarch64/libtvm_ffi.so
#
# Run the result with qemu-aarch64 -L /usr/aarch64-linux-gnu build/aarch64/relayq_run ...
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
