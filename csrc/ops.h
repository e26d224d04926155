#pragma once
// The kernels each device file defines (*_cpu, *_cuda: inputs already checked), and the checked
// entry points bindings.cpp defines, which C++ callers (decode_cpu.cpp) share with Python.
// Argument rules: checks.h.
#include <torch/extension.h>

#include <vector>

using OptT = c10::optional<at::Tensor>;

std::vector<at::Tensor> norm_fwd_cpu(const at::Tensor& x, const OptT& residual, const at::Tensor& w, const OptT& b,
                                     double eps, bool rms);
std::vector<at::Tensor> norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& h, const OptT& dh, const at::Tensor& w,
                                     const at::Tensor& mean, const at::Tensor& rstd, bool has_bias, bool rms);
at::Tensor paged_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_table, const at::Tensor& seq_lens, double scale,
                               int64_t window_left, const OptT& k_scale, const OptT& v_scale);
void store_kvcache_cpu(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                       const at::Tensor& slot_mapping, const OptT& k_scale, const OptT& v_scale);
at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& w, const OptT& bias, int64_t act);
const std::vector<int64_t>& linear_cpu_panels();
at::Tensor linear_cpu_pack(const at::Tensor& w, int64_t panel);
at::Tensor linear_cpu_packed(const at::Tensor& x, const at::Tensor& pw, const OptT& bias, int64_t N, int64_t act);
void rope_cpu_(at::Tensor& t, const at::Tensor& cos, const at::Tensor& sin, int64_t heads);
at::Tensor glu_cpu(const at::Tensor& f, bool gelu_tanh);
void lora_add_cpu_(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                   const at::Tensor& slots, int64_t act);
void apply_token_bitmask_cpu_(at::Tensor& logits, const at::Tensor& rows, const at::Tensor& bitmask);
void rms_heads_cpu_(at::Tensor& t, const OptT& qw, const OptT& kw, int64_t nq, int64_t nk, double eps);
at::Tensor varlen_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                                const at::Tensor& cu_k, bool causal, double scale, const at::Tensor& block_table,
                                int64_t window_left, int64_t window_right, const OptT& k_scale, const OptT& v_scale);
#ifdef WITH_CUDA
std::vector<at::Tensor> norm_fwd_cuda(const at::Tensor& x, const OptT& residual, const at::Tensor& w, const OptT& b,
                                      double eps, bool rms);
std::vector<at::Tensor> norm_bwd_cuda(const at::Tensor& dy, const at::Tensor& h, const OptT& dh, const at::Tensor& w,
                                      const at::Tensor& mean, const at::Tensor& rstd, bool has_bias, bool rms);
std::vector<at::Tensor> gemm_cuda(const at::Tensor& a, const at::Tensor& b, const OptT& bias, int64_t act,
                                  bool save_preact);
at::Tensor act_bwd_cuda(const at::Tensor& dy, const at::Tensor& z, int64_t act);
at::Tensor gemm_dgrad_cuda(const at::Tensor& dz, const at::Tensor& w);
at::Tensor gemm_wgrad_cuda(const at::Tensor& dz, const at::Tensor& x);
bool gemm_sm90_taken(const at::Tensor& a, const at::Tensor& b);
#endif

// ---- checked entry points (bindings.cpp): check (checks.h), dispatch on device, return. KV caches
// (blocks, bs, Hkv, D) hold q's dtype, bfloat16, or int8 with k_scale/v_scale (blocks, bs, Hkv) fp32.
std::vector<at::Tensor> norm_fwd(const at::Tensor& x, const OptT& residual, const at::Tensor& weight,
                                 const OptT& bias, double eps, bool rms);
at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& pw, const OptT& bias, int64_t N, int64_t act);
void rope_(at::Tensor& t, const at::Tensor& cos, const at::Tensor& sin, int64_t heads);
void store_kvcache(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                   const at::Tensor& slot_mapping, const OptT& k_scale = {}, const OptT& v_scale = {});
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_table, const at::Tensor& seq_lens, double scale,
                           int64_t window_left = -1, int64_t window_right = -1, const OptT& k_scale = {},
                           const OptT& v_scale = {});

inline bool present(const OptT& t) { return t.has_value() && t->defined(); }
