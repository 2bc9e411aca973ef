"""Offline tools run from the command line: model quantization."""

# llama.cpp file types offered by ``models quantize --type``, by their usual names. Kept
# here, away from the numpy-heavy tool itself, so building the command line stays cheap.
GGUF_TYPES = (
    "f16",
    "bf16",
    "q8_0",
    "q6_k",
    "q5_k_m",
    "q5_k_s",
    "q5_0",
    "q4_k_m",
    "q4_k_s",
    "q4_0",
    "q3_k_m",
    "q2_k",
)
