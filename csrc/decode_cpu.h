#pragma once
// One pre-norm decoder layer of a CPU decode step (one new token per sequence), run as the checked
// ops of ops.h back to back, so the engine's decode loop crosses into Python once per layer
// instead of once per op (each crossing pays the Python wrapper's checks and dispatch).
#include "ops.h"

// x (B, C): what enters the layer; residual (B, C) the residual stream, or None in the first
// layer (x is then the stream). w: norm1 w, b | qkv w, b | proj w, b | norm2 w, b | fc w, b |
// fc2 w, b (biases may be None) [| q_norm w | k_norm w: Qwen3's per-head RMSNorm of q and k
// before the rotary, either may be None], the four GEMM weights (qkv, proj, fc, fc2) packed by
// linear_pack and n their output features. cos, sin (B, R/2): rotary tables at each token's
// position, rotating each head's first R <= D dims, or None. act: as in gemm, or 4 for SwiGLU,
// 5 for GeGLU (tanh GELU) (fc yields the gate and up halves). window_left >= 0: a sliding-window
// layer, each token attends to its last window_left + 1 keys. parallel: 0 a sequential pre-norm
// block; 1 GPT-NeoX's attn(norm1(s)) + mlp(norm2(s)) over the stream s; 2 GPT-J's, with norm1
// for both (norm2's weights None). -> {x, residual}. part (tensor parallelism, whose all-reduces
// fall between the halves): 0 the whole layer; 1 the attention half -> {its output (the rank's
// partial sum), the stream}; 2 the MLP half -> {its output (partial), the stream}, given the
// stream as residual and, in a sequential block, the reduced attention output as x (in a
// parallel one x is unused: the caller sums both halves and reduces once). The layer's geometry
// (w, n, act, n_head against the cache) is checked by the caller. The caches hold float32, bfloat16, or
// int8 with k_scale/v_scale (ops.h's store_kvcache and paged_attention). lora: empty, or 8 tensors,
// A (L, W, K) and B (L, W, N) of qkv, proj, fc and fc2 (None, None for a GEMM without adapters), with
// lora_slots (B,) int64 each token's slot, -1 none: each GEMM adds its tokens' updates before its
// activation (lora_cpu.cpp).
std::vector<at::Tensor> decode_layer_cpu(const at::Tensor& x, const OptT& residual, const std::vector<OptT>& w,
                                         const std::vector<int64_t>& n, at::Tensor& k_cache, at::Tensor& v_cache,
                                         const at::Tensor& slot_mapping, const at::Tensor& block_table,
                                         const at::Tensor& seq_lens, const OptT& cos, const OptT& sin,
                                         int64_t n_head, double eps, bool rms, int64_t act, double scale,
                                         int64_t window_left, int64_t parallel, int64_t part = 0,
                                         const OptT& k_scale = {}, const OptT& v_scale = {},
                                         const std::vector<OptT>& lora = {}, const OptT& lora_slots = {});
