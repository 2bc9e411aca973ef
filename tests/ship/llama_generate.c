/* Loads the cross-built llama.cpp (libllama.so of the arm64 wheel), generates a few tokens
 * greedily and prints which CPU backend variant ggml chose: run under qemu-aarch64 by
 * tests/ship/test_cross_wheel.py. Usage: llama_generate MODEL.gguf PROMPT N_TOKENS */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL PROMPT N\n", argv[0]);
        return 2;
    }
    int n_predict = atoi(argv[3]);
    llama_backend_init(); /* ggml_backend_load_all(): picks the best libggml-cpu-*.so */
    FILE *maps = fopen("/proc/self/maps", "r");
    char line[4096];
    while (maps && fgets(line, sizeof line, maps)) {
        char *name = strstr(line, "libggml-cpu-");
        if (name && strstr(line, "r-xp")) printf("variant: %s", name);
    }
    if (maps) fclose(maps);

    struct llama_model_params mparams = llama_model_default_params();
    struct llama_model *model = llama_model_load_from_file(argv[1], mparams);
    if (!model) return 3;
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    llama_token tokens[256];
    int n = llama_tokenize(vocab, argv[2], (int)strlen(argv[2]), tokens, 256, true, false);
    if (n <= 0) return 4;
    struct llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = 256;
    cparams.n_threads = 1;
    struct llama_context *ctx = llama_init_from_model(model, cparams);
    if (!ctx) return 5;
    struct llama_sampler *smpl = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(smpl, llama_sampler_init_greedy());
    struct llama_batch batch = llama_batch_get_one(tokens, n);
    int generated = 0;
    printf("text: ");
    for (; generated < n_predict; generated++) {
        if (llama_decode(ctx, batch)) return 6;
        llama_token tok = llama_sampler_sample(smpl, ctx, -1);
        if (llama_vocab_is_eog(vocab, tok)) break;
        char piece[128];
        int len = llama_token_to_piece(vocab, tok, piece, sizeof piece, 0, false);
        if (len > 0) fwrite(piece, 1, (size_t)len, stdout);
        batch = llama_batch_get_one(&tokens[0], 1);
        tokens[0] = tok;
    }
    printf("\ngenerated: %d\n", generated);
    llama_sampler_free(smpl);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
