#pragma once
// Every op's argument rules, each written once: the public ops' and the index rules in checks.cpp,
// the C++ entry points' own in kernel_checks.cpp. The entry points of bindings.cpp run them before
// their kernels; the Python ops (kernels/*.py) run the public ones through the bindings (check_* in
// PYBIND11_MODULE) before their Triton and torch paths. A wrong argument raises a ValueError
// (shape, device, value) or a TypeError (dtype) that names it.
#include <string>
#include <vector>

#include "ops.h"

// ---- building blocks
std::string dtype_name(at::ScalarType t);  // as torch prints it: torch.float32
void check_dims(const char* name, const at::Tensor& x, int64_t ndim);
void check_float(const char* name, const at::Tensor& x, int64_t ndim);  // a public op's float dtypes; ndim -1: any
void check_on_device(const char* name, const at::Tensor& x, const char* ref_name, const at::Tensor& ref);
void check_same(const char* ref_name, const at::Tensor& ref, const char* name, const at::Tensor& x);  // device, dtype

// ---- the public ops' rules: every path, float64 included. window: (left, right), -1 unbounded.
void check_window(int64_t left, int64_t right);
void check_head_dim(int64_t d);  // every attention path's
void check_flash_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t left,
                           int64_t right);
// paged KV caches (blocks, bs, Hkv, D) on ref's device: in ref's dtype, bfloat16, or int8 with k_scale and
// v_scale, contiguous float32 (blocks, bs, Hkv) (given only then)
void check_kv_cache(const char* ref_name, const at::Tensor& ref, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const OptT& k_scale, const OptT& v_scale);
void check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                  const at::Tensor& cu_k, const OptT& block_table, int64_t left, int64_t right,
                  const OptT& k_scale = {}, const OptT& v_scale = {});
void check_paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_table, const at::Tensor& seq_lens, int64_t left, int64_t right,
                           const OptT& k_scale = {}, const OptT& v_scale = {});
void check_store_kvcache(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& slot_mapping, const OptT& k_scale = {},
                         const OptT& v_scale = {});
void check_norm(const at::Tensor& x, const at::Tensor& weight, const OptT& bias, const OptT& residual, double eps);
void check_linear(const at::Tensor& x, const at::Tensor& weight, const OptT& bias);
void check_act(const char* op, int64_t act, int64_t max_act);
// quantize_int8: weight (N, K) float; group 0 (per output channel) or a divisor of K
void check_quantize(const at::Tensor& weight, int64_t group);
// a QuantizedWeight: q (N, K) int8, scale (N, K / group) float32
void check_quantized(const at::Tensor& q, const at::Tensor& scale, int64_t group);
void check_linear_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, int64_t group,
                       const OptT& bias);
void check_linear_w8a8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, int64_t group,
                       const OptT& bias);
// int8 activations (w8a8) quantise x in blocks of 32 inputs, which must tile K and the weight's groups
void check_w8a8(int64_t K, int64_t group);
// pack_linear: a float weight (N, K), or a QuantizedWeight's q and scale (int8_activations: for w8a8)
void check_pack_linear(const at::Tensor& weight, const OptT& scale, int64_t group, bool int8_activations);
// a panel width linear_pack can make here (0: the fastest) -> the width
int64_t check_panel(int64_t panel);

// ---- index values, against the cache they address: the C++ kernels check them always, the other
// paths with GPT_ENGINE_DEBUG_CHECKS=1 (kernels/_checks.py, on host copies). CPU tensors.
void check_paged_indices(const at::Tensor& block_table, const at::Tensor& seq_lens, int64_t num_blocks,
                         int64_t block_size);
void check_slot_indices(const at::Tensor& slot_mapping, int64_t num_slots);
// k_rows -1: k is a paged cache (block_table given)
void check_varlen_indices(const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t q_rows, int64_t k_rows,
                          const OptT& block_table, int64_t num_blocks, int64_t block_size);

// ---- the C++ entry points' rules (kernel_checks.cpp): the public ones first where they serve a public op
void check_kernel_device(const char* name, const at::Tensor& x);  // CPU, or CUDA in a CUDA build
void check_kernel_dtype(const char* name, const at::Tensor& x);   // float32, float16 or bfloat16
void check_cpu_float32(const char* op, const char* name, const at::Tensor& x);
// (N, heads, D) with each row dense (rows may be strided, as split from a fused projection); sizes
// 0 and 1 have no stride to keep
bool rows_dense(const at::Tensor& x);
void check_rows(const char* name, const at::Tensor& x);
void check_contiguous(const char* name, const at::Tensor& x);
// a weight packed by linear_pack / kernels.packed.pack_linear, of K inputs (-1: any) and N rows
void check_packed(const char* op, const at::Tensor& pw, int64_t K, int64_t N);
void check_norm_fwd(const at::Tensor& x, const OptT& residual, const at::Tensor& weight, const OptT& bias,
                    double eps);
void check_norm_bwd(const at::Tensor& dy, const at::Tensor& h, const OptT& dh, const at::Tensor& weight,
                    const at::Tensor& mean, const at::Tensor& rstd);
void check_gemm(const at::Tensor& a, const at::Tensor& b, const OptT& bias, int64_t act, bool save_preact);
void check_backward_gemm(const char* op, const at::Tensor& dz, const at::Tensor& other, bool dgrad);
void check_act_bwd(const at::Tensor& dy, const at::Tensor& z, int64_t act);
void check_linear_pack(const at::Tensor& w);
void check_linear_packed(const at::Tensor& x, const at::Tensor& pw, const OptT& bias, int64_t N, int64_t act);
// -> ids as the flat int64 tensor the kernel reads
at::Tensor check_packed_rows(const at::Tensor& pw, const at::Tensor& ids, int64_t N);
void check_glu(const at::Tensor& f);
void check_rope(const at::Tensor& t, const at::Tensor& cos, const at::Tensor& sin, int64_t heads);
void check_store_kvcache_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& slot_mapping, const OptT& k_scale,
                             const OptT& v_scale);
void check_paged_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_table, const at::Tensor& seq_lens, int64_t left,
                               int64_t right, const OptT& k_scale, const OptT& v_scale);
void check_varlen_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& cu_q, const at::Tensor& cu_k, const OptT& block_table,
                                int64_t left, int64_t right, const OptT& k_scale, const OptT& v_scale);
void check_decode_layer(const at::Tensor& x, const std::vector<OptT>& w, const std::vector<int64_t>& n,
                        const at::Tensor& k_cache, const at::Tensor& v_cache, const OptT& k_scale,
                        const OptT& v_scale, const OptT& cos, const OptT& sin, int64_t n_head, bool rms, int64_t act,
                        int64_t window_left, int64_t parallel, int64_t part, bool has_residual);
// apply_token_bitmask_'s arguments (bitmask_cpu.cpp)
void check_token_bitmask(const at::Tensor& logits, const at::Tensor& rows, const at::Tensor& bitmask);
// lora_add_'s arguments (lora_cpu.cpp)
void check_lora(const char* op, const at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                const at::Tensor& slots);
// decode_layer's LoRA slots (decode_cpu.h), after check_decode_layer: attn_width is n_head x head dim
void check_decode_lora(const at::Tensor& x, const std::vector<int64_t>& n, int64_t act, int64_t attn_width,
                       const std::vector<OptT>& lora, const OptT& lora_slots);
