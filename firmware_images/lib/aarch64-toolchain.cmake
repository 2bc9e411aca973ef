# CMake toolchain: build for 64-bit Arm Linux (Raspberry Pi 4/5, Debian bookworm) on an
# amd64 host with Debian's crossbuild-essential-arm64 (aarch64-linux-gnu-gcc/g++, glibc 2.36,
# libgomp for OpenMP). Used by lib/cross-wheel for llama.cpp.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
# Tools (git, ccache) from the build host; libraries and headers only from the target's.
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
