// The C++ entry points' own rules (bindings.cpp): what their kernels take beyond the public ops'
// rules (checks.cpp), which the entry points of public ops run first. The Python ops route only
// input that passes these to the C++ kernels; a direct call with anything else raises.
#include <c10/util/accumulate.h>

#include <algorithm>
#include <string>
#include <vector>

#include "checks.h"
#include "quant_cpu.h"

// ---- building blocks of the entry points' rules

void check_kernel_device(const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu() || x.device().is_cuda(), name, " must be a CPU or CUDA tensor, got ",
                    x.device());
#ifndef WITH_CUDA
  TORCH_CHECK_VALUE(x.device().is_cpu(), "kernels._C was built without CUDA; ", name, " is on ", x.device());
#endif
}

void check_kernel_dtype(const char* name, const at::Tensor& x) {
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, name,
                   " must be float32, float16 or bfloat16 for the compiled kernels, got ", dtype_name(t));
}

void check_cpu_float32(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK_TYPE(x.device().is_cpu() && x.scalar_type() == at::kFloat, op, ": ", name,
                   " must be a CPU float32 tensor, got ", dtype_name(x.scalar_type()), " on ", x.device());
}

bool rows_dense(const at::Tensor& x) {
  return x.dim() == 3 && (x.size(2) <= 1 || x.stride(2) == 1) && (x.size(1) <= 1 || x.stride(1) == x.size(2));
}

void check_rows(const char* name, const at::Tensor& x) {
  check_dims(name, x, 3);
  TORCH_CHECK(rows_dense(x), name, "[i] must be contiguous, got strides ", x.strides());
}

void check_contiguous(const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
}

void check_packed(const char* op, const at::Tensor& pw, int64_t K, int64_t N) {
  const auto [pk, P] = packed_geometry(pw);
  const auto& ps = linear_cpu_panels();
  TORCH_CHECK_VALUE(pk > 0 && (K < 0 || pk == K) && std::find(ps.begin(), ps.end(), P) != ps.end() &&
                        pw.is_contiguous() && pw.device().is_cpu(),
                    op, ": packed must come from linear_pack (kernels.packed.pack_linear) of an (N, ",
                    K < 0 ? std::string("K") : std::to_string(K), ") weight (float32, bfloat16, int8 or w8a8 uint8), "
                    "got ", dtype_name(pw.scalar_type()), " ", pw.sizes());
  TORCH_CHECK_VALUE(N > 0 && (N + P - 1) / P == pw.size(0), op, ": N = ", N, " does not match the ", pw.size(0),
                    " panels of ", P, " rows");
}

// ---- entry points

void check_norm_fwd(const at::Tensor& x, const OptT& residual, const at::Tensor& weight, const OptT& bias,
                    double eps) {
  check_norm(x, weight, bias, residual, eps);
  check_kernel_device("x", x);
  check_kernel_dtype("x", x);
  TORCH_CHECK_VALUE(x.size(-1) > 0, "x's hidden size must be positive");
}

void check_linear_pack(const at::Tensor& w) {
  check_cpu_float32("linear_pack", "w", w);
  check_dims("w", w, 2);
}

void check_linear_packed(const at::Tensor& x, const at::Tensor& pw, const OptT& bias, int64_t N, int64_t act) {
  check_cpu_float32("linear_packed", "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, "linear_packed: x must be (..., K), got shape ", x.sizes());
  check_packed("linear_packed", pw, -1, N);
  const int64_t K = packed_geometry(pw).first;
  TORCH_CHECK_VALUE(x.size(-1) == K, "linear_packed: x must be (..., ", K, ") for this packed weight of ", K,
                    " input features, got shape ", x.sizes());
  if (present(bias)) {
    check_cpu_float32("linear_packed", "bias", *bias);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "linear_packed: bias must be (", N, ",), got ",
                      bias->sizes());
  }
  check_act("linear_packed", act, 3);
}

at::Tensor check_packed_rows(const at::Tensor& pw, const at::Tensor& ids, int64_t N) {
  check_packed("packed_rows", pw, -1, N);
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, "ids has dtype ",
                   dtype_name(ids.scalar_type()), "; expected torch.int64 or torch.int32");
  TORCH_CHECK_VALUE(ids.device().is_cpu(), "ids is on ", ids.device(), " but packed is on cpu");
  const at::Tensor flat = ids.reshape({-1}).to(at::kLong).contiguous();
  const int64_t* id = flat.data_ptr<int64_t>();
  for (int64_t r = 0; r < flat.numel(); ++r)
    TORCH_CHECK_VALUE(id[r] >= 0 && id[r] < N, "packed_rows: row ids must be in [0, ", N, "), got ", id[r]);
  return flat;
}

void check_glu(const at::Tensor& f) {
  check_cpu_float32("glu", "f", f);
  TORCH_CHECK_VALUE(f.dim() >= 1 && f.size(-1) % 2 == 0, "glu: f must be (..., 2 ff), of even width, got shape ",
                    f.sizes());
}

void check_rope(const at::Tensor& t, const at::Tensor& cos, const at::Tensor& sin, int64_t heads) {
  check_cpu_float32("rope_", "t", t);
  TORCH_CHECK_VALUE(t.dim() >= 2, "rope_: t must be (..., heads, D), got shape ", t.sizes());
  const int64_t h = t.size(-2), D = t.size(-1), N = c10::multiply_integers(t.sizes().slice(0, t.dim() - 2));
  // the kernel steps over rows of heads x D: 3-D rows may be strided (split from a fused projection)
  TORCH_CHECK_VALUE(t.dim() == 3 ? rows_dense(t) : t.is_contiguous(),
                    "rope_: t must be contiguous (3-D: each row dense), got strides ", t.strides());
  TORCH_CHECK_VALUE(D % 2 == 0 && heads >= 0 && heads <= h, "rope_: needs an even head dim and 0 <= heads <= ", h,
                    ", got D = ", D, ", heads = ", heads);
  // partial rotary (GPT-NeoX's rotary_pct, Phi): cos, sin of width R/2 rotate each head's first R dims
  const int64_t half = cos.dim() > 0 ? cos.size(-1) : -1;
  TORCH_CHECK_VALUE(half >= 0 && half <= D / 2, "rope_: cos and sin must be (..., R/2) with R/2 <= D/2 = ", D / 2,
                    ", got cos ", cos.sizes());
  for (const auto& [r, name] : {std::pair{&cos, "cos"}, {&sin, "sin"}}) {
    check_cpu_float32("rope_", name, *r);
    const bool rows = r->dim() > 0 && c10::multiply_integers(r->sizes().slice(0, r->dim() - 1)) == N;
    TORCH_CHECK_VALUE(rows && r->size(-1) == half, "rope_: cos and sin must be (..., R/2) for (", N, ", ", half,
                      ") rows, got ", name, " ", r->sizes());
  }
}

void check_store_kvcache_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& slot_mapping, const OptT& k_scale,
                             const OptT& v_scale) {
  check_store_kvcache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale);
  TORCH_CHECK_VALUE(k.device().is_cpu(), "store_kvcache: k must be a CPU tensor (CUDA runs Triton)");
  check_kernel_dtype("k", k);
  check_rows("k", k), check_rows("v", v);
  check_contiguous("k_cache", k_cache), check_contiguous("v_cache", v_cache);
  check_slot_indices(slot_mapping, k_cache.size(0) * k_cache.size(1));
}

void check_paged_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_table, const at::Tensor& seq_lens, int64_t left,
                               int64_t right, const OptT& k_scale, const OptT& v_scale) {
  check_paged_attention(q, k_cache, v_cache, block_table, seq_lens, left, right, k_scale, v_scale);
  TORCH_CHECK_VALUE(q.device().is_cpu(), "paged_attention: q must be a CPU tensor (CUDA runs Triton)");
  check_kernel_dtype("q", q);
  check_rows("q", q);
  check_contiguous("k_cache", k_cache), check_contiguous("v_cache", v_cache);
  check_paged_indices(block_table, seq_lens, k_cache.size(0), k_cache.size(1));
}

void check_varlen_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& cu_q, const at::Tensor& cu_k, const OptT& block_table,
                                int64_t left, int64_t right, const OptT& k_scale, const OptT& v_scale) {
  const bool paged = present(block_table);
  check_varlen(q, k, v, cu_q, cu_k, block_table, left, right, k_scale, v_scale);
  check_cpu_float32("varlen_attention", "q", q);  // paged caches may be bfloat16 or int8 (check_varlen)
  if (!paged) check_cpu_float32("varlen_attention", "k", k), check_cpu_float32("varlen_attention", "v", v);
  check_rows("q", q);
  if (paged) {
    check_contiguous("k_cache", k), check_contiguous("v_cache", v);
  } else {
    check_rows("k", k), check_rows("v", v);
  }
  check_varlen_indices(cu_q, cu_k, q.size(0), paged ? -1 : k.size(0), block_table, k.size(0),
                       paged ? k.size(1) : 0);
}

void check_norm_bwd(const at::Tensor& dy, const at::Tensor& h, const OptT& dh, const at::Tensor& weight,
                    const at::Tensor& mean, const at::Tensor& rstd) {
  check_kernel_device("h", h);
  check_kernel_dtype("h", h);
  TORCH_CHECK_VALUE(h.dim() == 2 && h.size(1) > 0, "h must be 2-D (rows, hidden), got ", h.sizes());
  check_contiguous("h", h);
  for (const auto& [t, name] : {std::pair{&dy, "dy"}, {present(dh) ? &*dh : nullptr, "dh"}}) {
    if (t == nullptr) continue;
    check_same("h", h, name, *t);
    check_contiguous(name, *t);
    TORCH_CHECK_VALUE(t->sizes() == h.sizes(), name, " must have h's shape ", h.sizes(), ", got ", t->sizes());
  }
  check_same("h", h, "weight", weight);
  check_contiguous("weight", weight);
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == h.size(1), "weight must be (", h.size(1), ",), got ",
                    weight.sizes());
  for (const at::Tensor* s : {&mean, &rstd}) {
    TORCH_CHECK(s->scalar_type() == at::kFloat && s->is_contiguous() && s->device() == h.device(),
                "mean and rstd must be contiguous float32 on h's device");
    TORCH_CHECK(s->dim() == 1 && s->size(0) == h.size(0), "mean and rstd must have one entry per row");
  }
}

void check_gemm(const at::Tensor& a, const at::Tensor& b, const OptT& bias, int64_t act, bool save_preact) {
  check_linear(a, b, bias);
  check_act("gemm", act, 3);
  check_kernel_device("a", a);
  check_contiguous("b", b);
  if (a.device().is_cpu()) {
    TORCH_CHECK(a.scalar_type() == at::kFloat, "gemm: CPU a must be float32, got ", dtype_name(a.scalar_type()));
    TORCH_CHECK(!save_preact, "gemm: the CPU kernel is forward-only (save_preact must be false)");
    return;
  }
  TORCH_CHECK(a.scalar_type() != at::kFloat && a.scalar_type() != at::kDouble, "gemm: CUDA a must be float16 or "
              "bfloat16");
  TORCH_CHECK(a.size(-1) % 8 == 0, "gemm: K must be a multiple of 8, got ", a.size(-1));
  check_contiguous("a", a);
  for (const at::Tensor* t : {&a, &b})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, "gemm: operands must be 16-byte aligned");
}

// dgrad: dz (M, N) @ w (N, K) -> (M, K); wgrad: dz (M, N)^T @ x (M, K) -> (N, K)
void check_backward_gemm(const char* op, const at::Tensor& dz, const at::Tensor& other, bool dgrad) {
  check_kernel_dtype("dz", dz);
  for (const auto& [t, name] : {std::pair{&dz, "dz"}, {&other, dgrad ? "w" : "x"}}) check_contiguous(name, *t);
  TORCH_CHECK(other.device() == dz.device(), op, ": dz and its other operand must be on the same device");
  TORCH_CHECK(other.scalar_type() == dz.scalar_type(), op, ": dz and its other operand must have the same dtype");
  TORCH_CHECK(dz.dim() == 2 && other.dim() == 2, op, ": 2-D operands expected, got ", dz.sizes(), " and ",
              other.sizes());
  TORCH_CHECK(other.size(0) == dz.size(dgrad ? 1 : 0), op, ": operand sizes ", dz.sizes(), " and ", other.sizes(),
              " do not match");
  TORCH_CHECK(dz.is_cuda(), op, ": dz must be a CUDA tensor");
  TORCH_CHECK(dz.scalar_type() != at::kFloat, op, ": dz must be float16 or bfloat16");
}

void check_act_bwd(const at::Tensor& dy, const at::Tensor& z, int64_t act) {
  check_kernel_dtype("z", z);
  check_contiguous("z", z);
  check_contiguous("dy", dy);
  check_same("z", z, "dy", dy);
  TORCH_CHECK(dy.sizes() == z.sizes(), "act_bwd: dy must have z's shape ", z.sizes());
  TORCH_CHECK(z.is_cuda(), "act_bwd: z must be a CUDA tensor");
  check_act("act_bwd", act, 3);
}

// The layer's geometry; the ops it runs (bindings.cpp's entry points) check their own inputs
void check_decode_layer(const at::Tensor& x, const std::vector<OptT>& w, const std::vector<int64_t>& n,
                        const at::Tensor& k_cache, const at::Tensor& v_cache, const OptT& k_scale,
                        const OptT& v_scale, const OptT& cos, const OptT& sin,
                        int64_t n_head, bool rms, int64_t act, int64_t window_left, int64_t parallel, int64_t part,
                        bool has_residual) {
  check_cpu_float32("decode_layer", "x", x);
  TORCH_CHECK_VALUE(x.dim() == 2, "decode_layer: x must be 2-D (B, C), got ", x.sizes());
  TORCH_CHECK_VALUE(w.size() == 12 || w.size() == 14, "decode_layer: w must hold the layer's 12 tensors (14 with "
                    "the q and k norms' weights), got ", w.size());
  TORCH_CHECK_VALUE(parallel >= 0 && parallel <= 2, "decode_layer: parallel must be 0 (sequential), 1 (GPT-NeoX) or "
                    "2 (GPT-J), got ", parallel);
  TORCH_CHECK_VALUE(part >= 0 && part <= 2, "decode_layer: part must be 0 (the layer), 1 (its attention half) or 2 "
                    "(its MLP half), got ", part);
  TORCH_CHECK_VALUE(part != 2 || has_residual, "decode_layer: part 2 (the MLP half) needs the stream as residual");
  for (size_t i = 0; i < 12; i += 2)
    TORCH_CHECK_VALUE(present(w[i]) || (i == 6 && parallel == 2), "decode_layer: w[", i, "] (a weight) is missing");
  TORCH_CHECK_VALUE(parallel != 2 || (!present(w[6]) && !present(w[7])), "decode_layer: parallel 2 (GPT-J) runs the "
                    "MLP on norm1's output: norm2's weight and bias must be None");
  // the reference's RMSNorm has no bias: one given would be added here and ignored there
  TORCH_CHECK_VALUE(!rms || (!present(w[1]) && !present(w[7])), "decode_layer: rms norms take no bias, but the "
                    "layer holds norm1's or norm2's bias");
  check_act("decode_layer", act, 5);
  TORCH_CHECK_VALUE(present(cos) == present(sin), "decode_layer: give both cos and sin, or neither");
  check_kv_cache("x", x, k_cache, v_cache, k_scale, v_scale);
  // the cache write's rule (a RuntimeError there, for direct calls), a ValueError of this public op
  TORCH_CHECK_VALUE(k_cache.is_contiguous() && v_cache.is_contiguous(), "decode_layer: k_cache and v_cache must "
                    "be contiguous");
  const int64_t Hkv = k_cache.size(2), D = k_cache.size(3);
  check_head_dim(D);  // before the layer writes the cache
  for (size_t i = 12; i < w.size(); ++i)
    if (present(w[i])) {
      const char* name = i == 12 ? "q_norm weight" : "k_norm weight";
      check_cpu_float32("decode_layer", name, *w[i]);
      TORCH_CHECK_VALUE(w[i]->dim() == 1 && w[i]->size(0) == D && w[i]->is_contiguous(), "decode_layer: the ",
                        name, " must be contiguous (", D, ",), one scale per head dim, got ", w[i]->sizes());
    }
  TORCH_CHECK_VALUE(n_head > 0 && Hkv > 0 && n_head % Hkv == 0, "decode_layer: n_head ", n_head,
                    " must be a positive multiple of the cache's ", Hkv, " heads");
  // the packed weights no longer show their row counts exactly (panels are padded): n states them,
  // and they must fit the layer's geometry (fc2's input width is the MLP's)
  TORCH_CHECK_VALUE(n.size() == 4, "decode_layer: n must hold the 4 GEMMs' output features, got ", n.size());
  constexpr size_t kGemms[] = {2, 4, 8, 10};  // qkv, proj, fc, fc2 among the layer's 12 tensors
  for (size_t j = 0; j < 4; ++j) check_packed("decode_layer", *w[kGemms[j]], -1, n[j]);
  const int64_t C = x.size(1), F = packed_geometry(*w[10]).first;
  TORCH_CHECK_VALUE(n[0] == (n_head + 2 * Hkv) * D && n[1] == C && n[3] == C && n[2] == (act >= 4 ? 2 * F : F),
                    "decode_layer: the layer's GEMM output features n = ", c10::IntArrayRef(n), " do not fit x's C = ",
                    C, ", (n_head ", n_head, " + 2 x k_cache's ", Hkv, ") heads x ", D, ", MLP width ", F);
  check_window(window_left, -1);
}

// a (L, W, K), b (L, W, N) and slots (M,) in [-1, L) for a GEMM of M rows from K inputs to N outputs
static void check_lora_slots(const char* op, int64_t M, int64_t K, int64_t N, const at::Tensor& a, const at::Tensor& b,
                             const at::Tensor& slots) {
  check_cpu_float32(op, "a LoRA A", a);
  check_cpu_float32(op, "a LoRA B", b);
  TORCH_CHECK_VALUE(a.dim() == 3 && b.dim() == 3 && a.is_contiguous() && b.is_contiguous() && a.size(0) == b.size(0) &&
                    a.size(1) == b.size(1) && a.size(2) == K && b.size(2) == N,
                    op, ": LoRA A and B must be contiguous (L, W, ", K, ") and (L, W, ", N, "), got ", a.sizes(),
                    " and ", b.sizes());
  TORCH_CHECK_TYPE(slots.scalar_type() == at::kLong && slots.device().is_cpu(), op, ": lora_slots must be a CPU int64 "
                   "tensor, got ", slots.scalar_type(), " on ", slots.device());
  TORCH_CHECK_VALUE(slots.dim() == 1 && slots.size(0) == M && slots.is_contiguous(), op, ": lora_slots must be "
                    "contiguous (M,) = (", M, ",), got ", slots.sizes());
  const int64_t* s = slots.data_ptr<int64_t>();
  for (int64_t i = 0, L = a.size(0); i < M; ++i)
    TORCH_CHECK_VALUE(s[i] >= -1 && s[i] < L, op, ": lora_slots[", i, "] = ", s[i], " is outside [-1, ", L, ")");
}

void check_lora(const char* op, const at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                const at::Tensor& slots) {
  check_cpu_float32(op, "x", x);
  check_cpu_float32(op, "y", y);
  TORCH_CHECK_VALUE(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0) && x.is_contiguous() && y.is_contiguous(),
                    op, ": x and y must be contiguous (M, K) and (M, N), got ", x.sizes(), " and ", y.sizes());
  check_lora_slots(op, x.size(0), x.size(1), y.size(1), a, b, slots);
}

void check_decode_lora(const at::Tensor& x, const std::vector<int64_t>& n, int64_t act, int64_t attn_width,
                       const std::vector<OptT>& lora, const OptT& lora_slots) {
  TORCH_CHECK_VALUE(lora.empty() || lora.size() == 8, "decode_layer: lora must be empty or hold 8 tensors (A, B of "
                    "qkv, proj, fc, fc2), got ", lora.size());
  TORCH_CHECK_VALUE(lora.empty() == !present(lora_slots), "decode_layer: give lora_slots with lora, and only then");
  const char* names[] = {"qkv", "proj", "fc", "fc2"};
  const int64_t B = x.size(0), C = x.size(1), k_in[] = {C, attn_width, C, act >= 4 ? n[2] / 2 : n[2]};
  for (size_t g = 0; g < lora.size() / 2; ++g) {
    const OptT &a = lora[2 * g], &b = lora[2 * g + 1];
    TORCH_CHECK_VALUE(present(a) == present(b), "decode_layer: ", names[g], "'s LoRA A and B: give both or neither");
    if (!present(a)) continue;
    check_lora_slots("decode_layer", B, k_in[g], n[g], *a, *b, *lora_slots);
  }
}

void check_token_bitmask(const at::Tensor& logits, const at::Tensor& rows, const at::Tensor& bitmask) {
  check_cpu_float32("apply_token_bitmask_", "logits", logits);
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.is_contiguous(), "apply_token_bitmask_: logits must be contiguous "
                    "(B, V), got ", logits.sizes());
  TORCH_CHECK_TYPE(rows.scalar_type() == at::kLong && rows.device().is_cpu() && bitmask.scalar_type() == at::kInt &&
                   bitmask.device().is_cpu(), "apply_token_bitmask_: rows must be CPU int64 and bitmask CPU int32, "
                   "got ", rows.scalar_type(), " and ", bitmask.scalar_type());
  TORCH_CHECK_VALUE(rows.dim() == 1 && rows.is_contiguous() && bitmask.dim() == 2 && bitmask.is_contiguous() &&
                    bitmask.size(0) == rows.size(0), "apply_token_bitmask_: rows (R,) and bitmask (R, W) must be "
                    "contiguous, got ", rows.sizes(), " and ", bitmask.sizes());
  const int64_t* r = rows.data_ptr<int64_t>();
  std::vector<bool> seen(static_cast<size_t>(logits.size(0)), false);
  for (int64_t i = 0; i < rows.size(0); ++i) {
    TORCH_CHECK_VALUE(r[i] >= 0 && r[i] < logits.size(0) && !seen[r[i]], "apply_token_bitmask_: rows[", i, "] = ",
                      r[i], " is outside [0, ", logits.size(0), ") or repeated");
    seen[r[i]] = true;
  }
}
