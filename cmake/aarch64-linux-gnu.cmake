# Cross build for 64-bit ARM Linux with Debian's g++-aarch64-linux-gnu; the tests run under
# qemu-user through ctest.
#   cmake -S . -B build-aarch64 --toolchain cmake/aarch64-linux-gnu.cmake
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)

# Libraries and headers come from the target's root only. Packages may also come from the
# host's: gradus' dependencies Eigen and Catch2 are header-only.
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)

find_program(GRADUS_QEMU_AARCH64 NAMES qemu-aarch64-static qemu-aarch64)
if(GRADUS_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${GRADUS_QEMU_AARCH64} -L /usr/aarch64-linux-gnu)
endif()
