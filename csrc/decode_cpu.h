#pragma once
// One pre-norm decoder layer of a CPU decode step (one new token per sequence), run as the checked
// ops of ops.h back to back, so the engine's decode loop crosses into Python once per layer
// instead of once per op (each crossing pays the Python wrapper's checks and dispatch).
#include "ops.h"

// x (B, C): what enters the layer; residual (B, C) the residual stream, or None in the first
// layer (x is then the stream). w: norm1 w, b | qkv w, b | proj w, b | norm2 w, b | fc w, b |
// fc2 w, b (biases may be None), the four GEMM weights (qkv, proj, fc, fc2) packed by linear_pack
// and n their output features. cos, sin (B, D/2): rotary tables at each token's position, or
// None. act: as in gemm, or 4 for SwiGLU (fc yields the gate and up halves). window_left >= 0: a
// sliding-window layer, each token attends to its last window_left + 1 keys. -> {x, residual}.
// The layer's geometry (w, n, act, n_head against the cache) is checked by the caller.
std::vector<at::Tensor> decode_layer_cpu(const at::Tensor& x, const OptT& residual, const std::vector<OptT>& w,
                                         const std::vector<int64_t>& n, at::Tensor& k_cache, at::Tensor& v_cache,
                                         const at::Tensor& slot_mapping, const at::Tensor& block_table,
                                         const at::Tensor& seq_lens, const OptT& cos, const OptT& sin,
                                         int64_t n_head, double eps, bool rms, int64_t act, double scale,
                                         int64_t window_left);
