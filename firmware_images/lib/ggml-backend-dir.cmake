# Included after every project() of the llama.cpp build (CMAKE_PROJECT_INCLUDE): compiles
# the directory ggml looks in for its CPU backend variants (libggml-cpu-*.so) into
# libggml.so, without ggml's own GGML_BACKEND_DIR option, which would also install them to
# that absolute path on the build host instead of into the wheel.
if(APPLIANCE_GGML_BACKEND_DIR)
    add_compile_definitions(GGML_BACKEND_DIR="${APPLIANCE_GGML_BACKEND_DIR}")
endif()
