// The only PYBIND11_MODULE. Each entry point checks its arguments (checks.h: the rules live there),
// shapes them for its kernel and dispatches on device; the public ops' check_* functions are bound
// as well, for the Python ops' Triton and torch paths.
#include <c10/core/DeviceGuard.h>
#include <c10/util/accumulate.h>

#include <vector>

#include "checks.h"
#include "decode_cpu.h"
#include "quant_cpu.h"

namespace {

#ifndef WITH_CUDA
[[noreturn]] void no_cuda() { TORCH_CHECK(false, "kernels._C was built without CUDA"); }
#endif

OptT opt(const OptT& t) { return present(t) ? t : OptT(); }  // None and an undefined tensor alike

// x (..., n) as (rows, n); reshape({-1, n}) cannot infer the rows of an empty x
at::Tensor rows_of(const at::Tensor& x) { return x.dim() == 1 ? x.unsqueeze(0) : x.flatten(0, -2); }

// x's leading dims with a last dim of n
std::vector<int64_t> with_last(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = n;
  return s;
}

}  // namespace

// ---- entry points shared with C++ callers (ops.h)

std::vector<at::Tensor> norm_fwd(const at::Tensor& x, const OptT& residual, const at::Tensor& weight,
                                 const OptT& bias, double eps, bool rms) {
  check_norm_fwd(x, residual, weight, bias, eps);
  const int64_t n = x.size(-1);
  const auto t = x.scalar_type();
  const at::Tensor x2 = rows_of(x).contiguous(), w = weight.to(t).contiguous();
  const OptT r = present(residual) ? OptT(rows_of(*residual).contiguous()) : OptT();
  const OptT b = present(bias) ? OptT(bias->to(t).contiguous()) : OptT();
  const c10::DeviceGuard guard(x.device());
#ifdef WITH_CUDA
  auto out = x.is_cuda() ? norm_fwd_cuda(x2, r, w, b, eps, rms) : norm_fwd_cpu(x2, r, w, b, eps, rms);
#else
  auto out = norm_fwd_cpu(x2, r, w, b, eps, rms);
#endif
  if (x.dim() != 2)
    for (int i : {0, 1})
      if (out[i].defined()) out[i] = out[i].view(x.sizes());
  return out;
}

at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& pw, const OptT& bias, int64_t N, int64_t act) {
  check_linear_packed(x, pw, bias, N, act);
  const at::Tensor x2 = rows_of(x).contiguous();
  const OptT b = present(bias) ? OptT(bias->contiguous()) : OptT();
  const at::Tensor y = pw.scalar_type() == at::kFloat ? linear_cpu_packed(x2, pw, b, N, act)
                                                      : quant_cpu_packed(x2, pw, b, N, act);
  return x.dim() == 2 ? y : y.view(with_last(x, N));
}

// In place: the first `heads` heads of t (..., heads', D), their first R dims rotated by cos, sin (..., R/2)
void rope_(at::Tensor& t, const at::Tensor& cos, const at::Tensor& sin, int64_t heads) {
  check_rope(t, cos, sin, heads);
  const int64_t h = t.size(-2), D = t.size(-1), N = c10::multiply_integers(t.sizes().slice(0, t.dim() - 2));
  const int64_t r = cos.size(-1);
  at::Tensor t3 = t.dim() == 3 ? t : t.view({N, h, D});
  rope_cpu_(t3, cos.reshape({N, r}).contiguous(), sin.reshape({N, r}).contiguous(), heads);
}

// writes k/v (N, Hkv, D) into the caches at slot_mapping (N,) int64, -1 skips a token; in place (an
// int8 cache: the rows quantised, their scales into k_scale/v_scale)
void store_kvcache(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                   const at::Tensor& slot_mapping, const OptT& k_scale, const OptT& v_scale) {
  check_store_kvcache_cpu(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale);
  store_kvcache_cpu(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale);
}

// CPU decode attention over paged caches -> (B, H, D); the CUDA path is Triton (kernels/triton_paged.py)
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_table, const at::Tensor& seq_lens, double scale,
                           int64_t window_left, int64_t window_right, const OptT& k_scale, const OptT& v_scale) {
  check_paged_attention_cpu(q, k_cache, v_cache, block_table, seq_lens, window_left, window_right, k_scale, v_scale);
  return paged_attention_cpu(q, k_cache, v_cache, block_table, seq_lens, scale, window_left, k_scale, v_scale);
}

namespace {

std::vector<at::Tensor> norm_bwd(const at::Tensor& dy, const at::Tensor& h, const OptT& dh, const at::Tensor& weight,
                                 const at::Tensor& mean, const at::Tensor& rstd, bool has_bias, bool rms) {
  check_norm_bwd(dy, h, dh, weight, mean, rstd);
  const c10::DeviceGuard guard(h.device());
#ifdef WITH_CUDA
  if (h.is_cuda()) return norm_bwd_cuda(dy, h, opt(dh), weight, mean, rstd, has_bias, rms);
#endif
  return norm_bwd_cpu(dy, h, opt(dh), weight, mean, rstd, has_bias, rms);
}

// a (..., K) @ b (N, K)^T + bias (N), activation act (0 none, 1 gelu, 2 gelu_tanh, 3 relu)
// -> {y (..., N), pre-activation z (only when save_preact and act != 0)}. CUDA: bf16/fp16 tensor
// cores; CPU: float32, inference only (no pre-activation for a backward).
std::vector<at::Tensor> gemm(const at::Tensor& a, const at::Tensor& b, const OptT& bias, int64_t act,
                             bool save_preact) {
  check_gemm(a, b, bias, act, save_preact);
  const at::Tensor a2 = rows_of(a).contiguous();
  const OptT c = present(bias) ? OptT(bias->contiguous()) : OptT();
  std::vector<at::Tensor> out;
  if (a.device().is_cpu()) {
    out = {linear_cpu(a2, b, c, act), at::Tensor()};
  } else {
#ifdef WITH_CUDA
    const c10::DeviceGuard guard(a.device());
    out = gemm_cuda(a2, b, c, act, save_preact);
#else
    no_cuda();
#endif
  }
  if (a.dim() != 2)
    for (auto& t : out)
      if (t.defined()) t = t.view(with_last(a, b.size(0)));
  return out;
}

// The CPU inference GEMM on a weight rearranged once by linear_pack: w (N, K) float32 ->
// (ceil(N / panel), K, panel), panel one of linear_panels() (0: the first, the fastest here).
at::Tensor linear_pack(const at::Tensor& w, int64_t panel) {
  check_linear_pack(w);
  return linear_cpu_pack(w.contiguous(), check_panel(panel));
}

// rows ids (any shape, int64 or int32) of a packed (N, K) weight, dequantised -> (*ids.shape, K) float32
at::Tensor packed_rows(const at::Tensor& pw, const at::Tensor& ids, int64_t N) {
  const at::Tensor rows = packed_rows_cpu(pw, check_packed_rows(pw, ids, N));
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(rows.size(1));
  return rows.view(shape);
}

// f (..., 2 ff) = [gate | up] -> act(gate) * up (..., ff), CPU float32; act silu, or GELU's tanh form
at::Tensor glu(const at::Tensor& f, bool gelu_tanh) {
  check_glu(f);
  const at::Tensor y = glu_cpu(rows_of(f).contiguous(), gelu_tanh);
  return f.dim() == 2 ? y : y.view(with_last(f, f.size(-1) / 2));
}

at::Tensor gemm_dgrad(const at::Tensor& dz, const at::Tensor& w) {
  check_backward_gemm("gemm_dgrad", dz, w, true);
#ifdef WITH_CUDA
  const c10::DeviceGuard guard(dz.device());
  return gemm_dgrad_cuda(dz, w);
#else
  no_cuda();
#endif
}

at::Tensor gemm_wgrad(const at::Tensor& dz, const at::Tensor& x) {
  check_backward_gemm("gemm_wgrad", dz, x, false);
#ifdef WITH_CUDA
  const c10::DeviceGuard guard(dz.device());
  return gemm_wgrad_cuda(dz, x);
#else
  no_cuda();
#endif
}

// Whether gemm(a, b, ...) runs the CUTLASS sm90 kernels (for tests and benchmarks).
bool gemm_sm90(const at::Tensor& a, const at::Tensor& b) {
#ifdef WITH_CUDA
  return a.is_cuda() && b.is_cuda() && gemm_sm90_taken(a, b);
#else
  (void)a, (void)b;
  return false;
#endif
}

// dz = dy * act'(z), elementwise
at::Tensor act_bwd(const at::Tensor& dy, const at::Tensor& z, int64_t act) {
  check_act_bwd(dy, z, act);
#ifdef WITH_CUDA
  const c10::DeviceGuard guard(z.device());
  return act_bwd_cuda(dy, z, act);
#else
  no_cuda();
#endif
}

// CPU float32 attention over packed variable-length sequences (prefill) -> (Nq, H, D): q (Nq, H, D)
// with dense rows; cu_q, cu_k (B + 1) int32 offsets. k and v (Nk, Hkv, D) with dense rows, packed
// like q; or, with block_table (B, max_blocks) int32, contiguous paged caches (blocks, bs, Hkv, D)
// where sequence b has cu_k[b + 1] - cu_k[b] cached keys. window as given (causal moves its right
// edge to 0).
at::Tensor varlen_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                            const at::Tensor& cu_k, bool causal, double scale, const OptT& block_table,
                            int64_t window_left, int64_t window_right, const OptT& k_scale, const OptT& v_scale) {
  const bool paged = present(block_table);
  check_varlen_attention_cpu(q, k, v, cu_q, cu_k, opt(block_table), window_left, window_right, opt(k_scale),
                             opt(v_scale));
  return varlen_attention_cpu(q, k, v, cu_q.contiguous(), cu_k.contiguous(), causal, scale,
                              paged ? block_table->contiguous() : at::Tensor(), window_left, causal ? 0 : window_right,
                              opt(k_scale), opt(v_scale));
}

// structured outputs' token mask over the logits' rows (bitmask_cpu.cpp), in place
void apply_token_bitmask_(at::Tensor& logits, const at::Tensor& rows, const at::Tensor& bitmask) {
  check_token_bitmask(logits, rows, bitmask);
  apply_token_bitmask_cpu_(logits, rows, bitmask);
}

// y += each token's LoRA update of x, then act over y (lora_cpu.cpp), in place
void lora_add_(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, const at::Tensor& slots,
               int64_t act) {
  check_lora("lora_add_", y, x, a, b, slots);
  check_act("lora_add_", act, 3);
  lora_add_cpu_(y, x, a, b, slots, act);
}

// One decoder layer of a CPU decode step in one call (decode_cpu.h has the arguments) -> {x, residual}
std::vector<at::Tensor> decode_layer(const at::Tensor& x, const OptT& residual, const std::vector<OptT>& w,
                                     const std::vector<int64_t>& n, at::Tensor& k_cache, at::Tensor& v_cache,
                                     const at::Tensor& slot_mapping, const at::Tensor& block_table,
                                     const at::Tensor& seq_lens, const OptT& cos, const OptT& sin, int64_t n_head,
                                     double eps, bool rms, int64_t act, double scale, int64_t window_left,
                                     int64_t parallel, int64_t part, const OptT& k_scale, const OptT& v_scale,
                                     const std::vector<OptT>& lora, const OptT& lora_slots) {
  check_decode_layer(x, w, n, k_cache, v_cache, opt(k_scale), opt(v_scale), opt(cos), opt(sin), n_head, rms, act,
                     window_left, parallel, part, present(residual));
  check_decode_lora(x, n, act, n_head * k_cache.size(3), lora, opt(lora_slots));
  return decode_layer_cpu(x, opt(residual), w, n, k_cache, v_cache, slot_mapping, block_table, seq_lens, opt(cos),
                          opt(sin), n_head, eps, rms, act, scale, window_left, parallel, part, opt(k_scale),
                          opt(v_scale), lora, opt(lora_slots));
}

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gpt-engine hand-written kernels";
  // the kernels run without the GIL, as torch's own ops do: the server's event loop and the grammar
  // thread keep running while a step's kernels do
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("norm_fwd", &norm_fwd, nogil,
        "LayerNorm/RMSNorm forward of x (..., N) -> [y, x + residual or None, mean, rstd]",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("rms"));
  m.def("norm_bwd", &norm_bwd, nogil, "LayerNorm/RMSNorm backward -> [dx, dweight, dbias or None]", py::arg("dy"),
        py::arg("h"), py::arg("dh"), py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("has_bias"),
        py::arg("rms"));
  m.def("gemm", &gemm, nogil, "a @ b.T + bias with a fused activation -> [y, pre-activation or None]", py::arg("a"),
        py::arg("b"), py::arg("bias"), py::arg("act"), py::arg("save_preact"));
  m.def("linear_pack", &linear_pack, nogil, "w (N, K) float32 -> the panels linear_packed reads", py::arg("w"),
        py::arg("panel") = 0);
  m.def("linear_panels", &linear_cpu_panels, "the panel widths linear_pack can make on this CPU, fastest first");
  m.def("linear_packed", &linear_packed, nogil, "CPU act(x @ w.T + bias) on a weight from linear_pack -> (..., N)",
        py::arg("x"), py::arg("packed"), py::arg("bias"), py::arg("n"), py::arg("act"));
  m.def("packed_rows", &packed_rows, nogil,
        "rows ids of a packed (N, K) weight, dequantised -> (*ids.shape, K) float32",
        py::arg("packed"), py::arg("ids"), py::arg("n"));
  m.def("glu", &glu, nogil, "CPU [gate | up] -> act(gate) * up, act silu or tanh GELU", py::arg("f"),
        py::arg("gelu_tanh") = false);
  m.def("rope_", &rope_, nogil, "CPU rotary embedding of t's first heads, in place", py::arg("t"), py::arg("cos"),
        py::arg("sin"), py::arg("heads"));
  m.def("gemm_dgrad", &gemm_dgrad, nogil, "dz @ w: the input gradient of F.linear (CUDA)", py::arg("dz"),
        py::arg("w"));
  m.def("gemm_wgrad", &gemm_wgrad, nogil, "dz.T @ x: the weight gradient of F.linear (CUDA)", py::arg("dz"),
        py::arg("x"));
  m.def("gemm_sm90", &gemm_sm90, "whether gemm(a, b, ...) takes the CUTLASS Hopper kernels", py::arg("a"),
        py::arg("b"));
  m.def("act_bwd", &act_bwd, nogil, "dy * act'(z)", py::arg("dy"), py::arg("z"), py::arg("act"));
  m.def("paged_attention", &paged_attention, nogil, "CPU decode attention over a paged KV cache -> (B, H, D)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_table"), py::arg("seq_lens"),
        py::arg("scale"), py::arg("window_left") = -1, py::arg("window_right") = -1, py::arg("k_scale") = py::none(),
        py::arg("v_scale") = py::none());
  m.def("varlen_attention", &varlen_attention, nogil, "CPU float32 attention over packed variable-length sequences",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("causal"),
        py::arg("scale"), py::arg("block_table") = py::none(), py::arg("window_left") = -1,
        py::arg("window_right") = -1, py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none());
  m.def("store_kvcache", &store_kvcache, nogil, "CPU write of new K/V rows into the paged caches, in place",
        py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slot_mapping"),
        py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none());
  m.def("decode_layer", &decode_layer, nogil, "one decoder layer of a CPU decode step -> [x, residual]",
        py::arg("x"), py::arg("residual"), py::arg("w"), py::arg("n"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("slot_mapping"), py::arg("block_table"), py::arg("seq_lens"), py::arg("cos"), py::arg("sin"),
        py::arg("n_head"), py::arg("eps"), py::arg("rms"), py::arg("act"), py::arg("scale"),
        py::arg("window_left") = -1, py::arg("parallel") = 0, py::arg("part") = 0, py::arg("k_scale") = py::none(),
        py::arg("v_scale") = py::none(), py::arg("lora") = std::vector<OptT>(), py::arg("lora_slots") = py::none());
  m.def("apply_token_bitmask_", &apply_token_bitmask_, nogil,
        "CPU: logits' rows -> -inf where the token's bit is 0, in place", py::arg("logits"), py::arg("rows"),
        py::arg("bitmask"));
  m.def("lora_add_", &lora_add_, nogil, "CPU: y += each token's LoRA update of x, then the activation, in place",
        py::arg("y"), py::arg("x"), py::arg("a"), py::arg("b"), py::arg("slots"), py::arg("act") = 0);
  m.def("has_cuda", &has_cuda, "whether this build has the CUDA kernels");

  // the public ops' rules (checks.h), for their paths that do not run an entry point above
  m.def("check_flash_attention", &check_flash_attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("left"),
        py::arg("right"));
  m.def("check_varlen", &check_varlen, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens_q"),
        py::arg("cu_seqlens_k"), py::arg("block_table"), py::arg("left"), py::arg("right"),
        py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none());
  m.def("check_paged_attention", &check_paged_attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("block_table"), py::arg("seq_lens"), py::arg("left"), py::arg("right"),
        py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none());
  m.def("check_store_kvcache", &check_store_kvcache, py::arg("k"), py::arg("v"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("slot_mapping"), py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none());
  m.def("check_norm", &check_norm, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("residual"),
        py::arg("eps"));
  m.def("check_linear", &check_linear, py::arg("x"), py::arg("weight"), py::arg("bias"));
  m.def("check_quantize", &check_quantize, py::arg("weight"), py::arg("group_size"));
  m.def("check_quantized", &check_quantized, py::arg("q"), py::arg("scale"), py::arg("group_size"));
  m.def("check_linear_int8", &check_linear_int8, py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("group_size"),
        py::arg("bias"));
  m.def("check_linear_w8a8", &check_linear_w8a8, py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("group_size"),
        py::arg("bias"));
  m.def("check_pack_linear", &check_pack_linear, py::arg("weight"), py::arg("scale"), py::arg("group_size"),
        py::arg("int8_activations"));
  m.def("check_panel", &check_panel, "-> the panel width (0: the fastest)", py::arg("panel"));
  // index values, on host tensors (GPT_ENGINE_DEBUG_CHECKS=1)
  m.def("check_paged_indices", &check_paged_indices, py::arg("block_table"), py::arg("seq_lens"),
        py::arg("num_blocks"), py::arg("block_size"));
  m.def("check_slot_indices", &check_slot_indices, py::arg("slot_mapping"), py::arg("num_slots"));
  m.def("check_varlen_indices", &check_varlen_indices, py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
        py::arg("q_rows"), py::arg("k_rows"), py::arg("block_table"), py::arg("num_blocks"), py::arg("block_size"));
}
