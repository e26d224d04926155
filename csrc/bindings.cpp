// The only PYBIND11_MODULE: validate every input, dispatch on device, return.
// Shapes are 2-D here (the Python side flattens leading dims); dtypes must match x's.
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "decode_cpu.h"
#include "ops.h"
#include "quant_cpu.h"

namespace {

void check_device(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() || x.device().is_cuda(), "x must be a CPU or CUDA tensor, got ", x.device());
#ifndef WITH_CUDA
  TORCH_CHECK(x.device().is_cpu(), "kernels._C was built without CUDA; x is on ", x.device());
#endif
}

bool known_panel(int64_t p) {
  const auto& ps = linear_cpu_panels();
  return std::find(ps.begin(), ps.end(), p) != ps.end();
}

#ifndef WITH_CUDA
[[noreturn]] void no_cuda() { TORCH_CHECK(false, "kernels._C was built without CUDA"); }
#endif

// The backward GEMMs of F.linear on CUDA, on the tensors autograd holds (no transposed copies on
// the sm90 path): dgrad: dz (M, N) @ w (N, K) -> (M, K); wgrad: dz (M, N)^T @ x (M, K) -> (N, K).
at::Tensor backward_gemm(const char* name, const at::Tensor& dz, const at::Tensor& other, bool dgrad) {
  const int64_t shared_dim = dgrad ? 1 : 0;
  TORCH_CHECK(dz.dim() == 2 && other.dim() == 2, name, ": 2-D operands expected, got ", dz.sizes(), " and ",
              other.sizes());
  TORCH_CHECK(other.size(0) == dz.size(shared_dim), name, ": operand sizes ", dz.sizes(), " and ", other.sizes(),
              " do not match");
  TORCH_CHECK(dz.is_cuda(), name, ": dz must be a CUDA tensor");
  TORCH_CHECK(dz.scalar_type() != at::kFloat, name, ": dz must be float16 or bfloat16");
#ifdef WITH_CUDA
  const c10::DeviceGuard guard(dz.device());
  return dgrad ? gemm_dgrad_cuda(dz, other) : gemm_wgrad_cuda(dz, other);
#else
  no_cuda();
#endif
}

// (N, heads, D) rows of x may be strided (views of a fused projection); each row is dense
void check_rows(const at::Tensor& x, const char* name) {
  CHECK_FLOAT(x);
  TORCH_CHECK(x.dim() == 3, name, " must be 3-D, got ", x.sizes());
  TORCH_CHECK(x.stride(2) == 1 && x.stride(1) == x.size(2), name, "[i] must be contiguous, got strides ",
              x.strides());
}

// The blocks holding the first n tokens of sequence b (its table row, bs tokens a block) must be
// blocks of the cache: the CPU kernels read them straight from the table.
void check_table_row(const int32_t* row, int64_t b, int64_t n, int64_t bs, int64_t blocks, const char* who) {
  for (int64_t j = 0; j < (n + bs - 1) / bs; ++j)
    TORCH_CHECK_VALUE(row[j] >= 0 && row[j] < blocks, who, "block_table[", b, ", ", j, "] = ", row[j],
                      " is not a block of the cache (", blocks, " blocks)");
}

void check_cache(const at::Tensor& c, const at::Tensor& ref, const char* name) {
  CHECK_CONTIGUOUS(c);
  CHECK_SAME_DEVICE(c, ref);
  TORCH_CHECK(c.scalar_type() == ref.scalar_type(), name, " has dtype ", c.scalar_type(), ", expected ",
              ref.scalar_type());
  TORCH_CHECK(c.dim() == 4, name, " must be (blocks, block_size, Hkv, D), got ", c.sizes());
}

}  // namespace

// ---- checked entry points shared with C++ callers (ops.h)

std::vector<at::Tensor> norm_fwd(const at::Tensor& x, const OptT& residual, const at::Tensor& weight,
                                 const OptT& bias, double eps, bool rms) {
  CHECK_INPUT(x);
  check_device(x);
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (rows, hidden), got ", x.sizes());
  const int64_t n = x.size(1);
  TORCH_CHECK(n > 0, "x's hidden size must be positive");
  CHECK_LIKE(weight, x);
  CHECK_SHAPE(weight, n);
  if (present(residual)) {
    CHECK_LIKE(*residual, x);
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual must have x's shape ", x.sizes());
  }
  if (present(bias)) {
    CHECK_LIKE(*bias, x);
    CHECK_SHAPE(*bias, n);
  }
  TORCH_CHECK(eps >= 0, "eps must be non-negative");
  const OptT r = present(residual) ? residual : OptT(), b = present(bias) ? bias : OptT();
  const c10::DeviceGuard guard(x.device());
#ifdef WITH_CUDA
  if (x.is_cuda()) return norm_fwd_cuda(x, r, weight, b, eps, rms);
#endif
  return norm_fwd_cpu(x, r, weight, b, eps, rms);
}

at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& pw, const OptT& bias, int64_t N, int64_t act) {
  TORCH_CHECK_TYPE(x.device().is_cpu() && x.scalar_type() == at::kFloat, "linear_packed: x must be a CPU float32 "
                   "tensor, got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.is_contiguous(), "linear_packed: x must be contiguous (M, K), got ", x.sizes());
  const auto [pk, P] = packed_geometry(pw);
  TORCH_CHECK_VALUE(known_panel(P) && pk == x.size(1) && pw.is_contiguous() && pw.device().is_cpu(),
                    "linear_packed: packed must come from linear_pack (kernels.decode.pack_linear) of an (N, ", x.size(1),
                    ") weight (float32, bfloat16, int8 or w8a8 uint8), got ", pw.scalar_type(), " ", pw.sizes());
  TORCH_CHECK_VALUE(N > 0 && (N + P - 1) / P == pw.size(0), "linear_packed: N = ", N, " does not match the ",
                    pw.size(0), " panels of ", P, " rows");
  if (present(bias)) {
    CHECK_LIKE(*bias, x);
    CHECK_SHAPE(*bias, N);
  }
  TORCH_CHECK_VALUE(act >= 0 && act <= 3, "linear_packed: act must be 0..3, got ", act);
  if (pw.scalar_type() != at::kFloat) return quant_cpu_packed(x, pw, present(bias) ? bias : OptT(), N, act);
  return linear_cpu_packed(x, pw, present(bias) ? bias : OptT(), N, act);
}

at::Tensor packed_rows(const at::Tensor& pw, const at::Tensor& ids, int64_t N) {
  const auto [K, W] = packed_geometry(pw);
  TORCH_CHECK_VALUE(known_panel(W) && K > 0 && pw.is_contiguous() && pw.device().is_cpu(),
                    "packed_rows: packed must come from kernels.decode.pack_linear, got ", pw.scalar_type(), " ",
                    pw.sizes());
  TORCH_CHECK_VALUE(N > 0 && (N + W - 1) / W == pw.size(0), "packed_rows: N = ", N, " does not match the ",
                    pw.size(0), " panels of ", W, " rows");
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong && ids.device().is_cpu() && ids.dim() == 1 && ids.is_contiguous(),
                   "packed_rows: ids must be a contiguous 1-D CPU int64 tensor");
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < ids.numel(); ++r)
    TORCH_CHECK_VALUE(id[r] >= 0 && id[r] < N, "packed_rows: row ids must be in [0, ", N, "), got ", id[r]);
  return packed_rows_cpu(pw, ids);
}

// In place: the first `heads` heads of t (N, heads', D), rows dense, rotated by cos, sin (N, D/2)
void rope_(at::Tensor& t, const at::Tensor& cos, const at::Tensor& sin, int64_t heads) {
  check_rows(t, "t");
  TORCH_CHECK_TYPE(t.device().is_cpu() && t.scalar_type() == at::kFloat, "rope_: t must be a CPU float32 tensor, got ",
                   t.scalar_type(), " on ", t.device());
  const int64_t N = t.size(0), D = t.size(2);
  TORCH_CHECK_VALUE(D % 2 == 0 && heads >= 0 && heads <= t.size(1), "rope_: needs an even head dim and 0 <= heads <= ",
                    t.size(1), ", got D = ", D, ", heads = ", heads);
  for (const at::Tensor* r : {&cos, &sin})
    TORCH_CHECK_VALUE(r->sizes() == at::IntArrayRef({N, D / 2}) && r->scalar_type() == at::kFloat &&
                          r->is_contiguous() && r->device().is_cpu(),
                      "rope_: cos and sin must be contiguous CPU float32 (N, D/2) = (", N, ", ", D / 2, "), got ",
                      r->sizes(), " ", r->scalar_type());
  rope_cpu_(t, cos, sin, heads);
}

// writes k/v (N, Hkv, D) into the caches at slot_mapping (N,) int64, -1 skips a token; in place
void store_kvcache(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                   const at::Tensor& slot_mapping) {
  check_rows(k, "k");
  check_rows(v, "v");
  TORCH_CHECK(k.device().is_cpu(), "store_kvcache: k must be a CPU tensor (CUDA runs Triton)");
  CHECK_SAME_DEVICE(v, k);
  CHECK_SAME_DTYPE(v, k);
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape");
  check_cache(k_cache, k, "k_cache");
  check_cache(v_cache, k, "v_cache");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must have the same shape");
  TORCH_CHECK(k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2), "k rows (", k.size(1), ", ", k.size(2),
              ") do not match cache rows (", k_cache.size(2), ", ", k_cache.size(3), ")");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == k.size(0) && slot_mapping.device().is_cpu(),
              "slot_mapping must be int64 (N,) on the CPU");
  const at::Tensor slots = slot_mapping.contiguous();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t n_slots = k_cache.size(0) * k_cache.size(1);
  for (int64_t i = 0; i < slots.size(0); ++i)
    TORCH_CHECK_VALUE(sp[i] >= -1 && sp[i] < n_slots, "slot_mapping[", i, "] = ", sp[i], " is outside [-1, ", n_slots, ")");
  store_kvcache_cpu(k, v, k_cache, v_cache, slots);
}

// CPU decode attention over paged caches -> (B, H, D); the CUDA path is Triton (kernels/triton_paged.py)
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_table, const at::Tensor& seq_lens, double scale,
                           int64_t window_left) {
  check_rows(q, "q");
  TORCH_CHECK(q.device().is_cpu(), "paged_attention: q must be a CPU tensor (CUDA runs Triton)");
  check_cache(k_cache, q, "k_cache");
  check_cache(v_cache, q, "v_cache");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must have the same shape");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t blocks = k_cache.size(0), bs = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, "cache head dim ", k_cache.size(3), " != q's ", D);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "q's heads (", H, ") must be a multiple of the cache's (", Hkv, ")");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2 && block_table.size(0) == B &&
                  block_table.device().is_cpu(),
              "block_table must be int32 (B, max_blocks) on the CPU");
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 && seq_lens.size(0) == B &&
                  seq_lens.device().is_cpu(),
              "seq_lens must be int32 (B,) on the CPU");
  // every block the kernel will read must exist: a bad table is a ValueError, not a wild read
  const at::Tensor table = block_table.contiguous(), lens = seq_lens.contiguous();
  const int32_t* tb = table.data_ptr<int32_t>();
  const int32_t* ln = lens.data_ptr<int32_t>();
  const int64_t mb = table.size(1);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(ln[b] >= 1 && ln[b] <= mb * bs, "seq_lens[", b, "] = ", ln[b], " is outside [1, ", mb * bs, "]");
    check_table_row(tb + b * mb, b, ln[b], bs, blocks, "");
  }
  TORCH_CHECK_VALUE(window_left >= -1, "paged_attention: window_left must be >= -1 (-1: unbounded), got ",
                    window_left);
  return paged_attention_cpu(q, k_cache, v_cache, table, lens, scale, window_left);
}

namespace {

std::vector<at::Tensor> norm_bwd(const at::Tensor& dy, const at::Tensor& h, const OptT& dh, const at::Tensor& weight,
                                 const at::Tensor& mean, const at::Tensor& rstd, bool has_bias, bool rms) {
  CHECK_INPUT(h);
  check_device(h);
  TORCH_CHECK(h.dim() == 2 && h.size(1) > 0, "h must be 2-D (rows, hidden), got ", h.sizes());
  const int64_t rows = h.size(0), n = h.size(1);
  CHECK_LIKE(dy, h);
  TORCH_CHECK(dy.sizes() == h.sizes(), "dy must have h's shape ", h.sizes());
  if (present(dh)) {
    CHECK_LIKE(*dh, h);
    TORCH_CHECK(dh->sizes() == h.sizes(), "dh must have h's shape ", h.sizes());
  }
  CHECK_LIKE(weight, h);
  CHECK_SHAPE(weight, n);
  for (const at::Tensor* s : {&mean, &rstd}) {
    TORCH_CHECK(s->scalar_type() == at::kFloat && s->is_contiguous() && s->device() == h.device(),
                "mean and rstd must be contiguous float32 on h's device");
    TORCH_CHECK(s->dim() == 1 && s->size(0) == rows, "mean and rstd must have one entry per row");
  }
  const OptT d = present(dh) ? dh : OptT();
  const c10::DeviceGuard guard(h.device());
#ifdef WITH_CUDA
  if (h.is_cuda()) return norm_bwd_cuda(dy, h, d, weight, mean, rstd, has_bias, rms);
#endif
  return norm_bwd_cpu(dy, h, d, weight, mean, rstd, has_bias, rms);
}

// a (M, K) @ b (N, K)^T + bias (N), activation act (0 none, 1 gelu, 2 gelu_tanh, 3 relu)
// -> {y, pre-activation z (only when save_preact and act != 0)}. CUDA: bf16/fp16 tensor cores;
// CPU: float32, inference only (no pre-activation for a backward).
std::vector<at::Tensor> gemm(const at::Tensor& a, const at::Tensor& b, const OptT& bias, int64_t act,
                             bool save_preact) {
  CHECK_INPUT(a);
  CHECK_LIKE(b, a);
  check_device(a);
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1), "gemm: a (M, K) and b (N, K) expected, got ",
              a.sizes(), " and ", b.sizes());
  if (present(bias)) {
    CHECK_LIKE(*bias, a);
    CHECK_SHAPE(*bias, b.size(0));
  }
  TORCH_CHECK(act >= 0 && act <= 3, "gemm: act must be 0..3, got ", act);
  if (a.device().is_cpu()) {
    TORCH_CHECK(a.scalar_type() == at::kFloat, "gemm: CPU a must be float32, got ", a.scalar_type());
    TORCH_CHECK(!save_preact, "gemm: the CPU kernel is forward-only (save_preact must be false)");
    return {linear_cpu(a, b, present(bias) ? bias : OptT(), act), at::Tensor()};
  }
  TORCH_CHECK(a.scalar_type() != at::kFloat, "gemm: CUDA a must be float16 or bfloat16");
  TORCH_CHECK(a.size(1) % 8 == 0, "gemm: K must be a multiple of 8, got ", a.size(1));
  for (const at::Tensor* t : {&a, &b})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, "gemm: operands must be 16-byte aligned");
#ifdef WITH_CUDA
  const c10::DeviceGuard guard(a.device());
  return gemm_cuda(a, b, present(bias) ? bias : OptT(), act, save_preact);
#else
  no_cuda();
#endif
}

// The CPU inference GEMM on a weight rearranged once by linear_pack: w (N, K) float32 ->
// (ceil(N / panel), K, panel), panel one of linear_panels() (0: the first, the fastest here).
// linear_packed(x (M, K), packed, bias (N,) or None, N, act) -> (M, N).
at::Tensor linear_pack(const at::Tensor& w, int64_t panel) {
  TORCH_CHECK_TYPE(w.device().is_cpu() && w.scalar_type() == at::kFloat, "linear_pack: w must be a CPU float32 "
                   "tensor, got ", w.scalar_type(), " on ", w.device());
  TORCH_CHECK_VALUE(w.dim() == 2, "linear_pack: w must be 2-D (N, K), got ", w.sizes());
  if (panel == 0) panel = linear_cpu_panels()[0];
  TORCH_CHECK_VALUE(known_panel(panel), "linear_pack: panel must be 0 or one of this CPU's ",
                    c10::IntArrayRef(linear_cpu_panels()), ", got ", panel);
  return linear_cpu_pack(w.contiguous(), panel);
}

// f (M, 2 ff) = [gate | up] -> silu(gate) * up (M, ff), CPU float32
at::Tensor swiglu(const at::Tensor& f) {
  TORCH_CHECK_TYPE(f.device().is_cpu() && f.scalar_type() == at::kFloat, "swiglu: f must be a CPU float32 tensor, "
                   "got ", f.scalar_type(), " on ", f.device());
  TORCH_CHECK_VALUE(f.dim() == 2 && f.is_contiguous() && f.size(1) % 2 == 0,
                    "swiglu: f must be contiguous (M, 2 ff), got ", f.sizes());
  return swiglu_cpu(f);
}

at::Tensor gemm_dgrad(const at::Tensor& dz, const at::Tensor& w) {
  CHECK_INPUT(dz);
  CHECK_LIKE(w, dz);
  return backward_gemm("gemm_dgrad", dz, w, true);
}

at::Tensor gemm_wgrad(const at::Tensor& dz, const at::Tensor& x) {
  CHECK_INPUT(dz);
  CHECK_LIKE(x, dz);
  return backward_gemm("gemm_wgrad", dz, x, false);
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
  CHECK_INPUT(z);
  CHECK_LIKE(dy, z);
  TORCH_CHECK(dy.sizes() == z.sizes(), "act_bwd: dy must have z's shape ", z.sizes());
  TORCH_CHECK(z.is_cuda(), "act_bwd: z must be a CUDA tensor");
  TORCH_CHECK(act >= 0 && act <= 3, "act_bwd: act must be 0..3, got ", act);
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
// where sequence b has cu_k[b + 1] - cu_k[b] cached keys.
at::Tensor varlen_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                            const at::Tensor& cu_k, bool causal, double scale, const OptT& block_table,
                            int64_t window_left, int64_t window_right) {
  const bool paged = present(block_table);
  check_rows(q, "q");
  for (const auto& [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}})
    TORCH_CHECK_TYPE(t->device().is_cpu() && t->scalar_type() == at::kFloat, "varlen_attention: ", name,
                     " must be a CPU float32 tensor, got ", t->scalar_type(), " on ", t->device());
  if (paged) {
    check_cache(k, q, "k_cache");
    check_cache(v, q, "v_cache");
  } else {
    check_rows(k, "k");
    check_rows(v, "v");
  }
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "varlen_attention: k and v must have the same shape, got ", k.sizes(),
                    " and ", v.sizes());
  const int64_t Hkv = k.size(-2), D = q.size(2);
  TORCH_CHECK_VALUE(k.size(-1) == D, "varlen_attention: k's head dim ", k.size(-1), " != q's ", D);
  TORCH_CHECK_VALUE(D % 16 == 0, "varlen_attention: the head dim must be a multiple of 16, got ", D);
  TORCH_CHECK_VALUE(Hkv > 0 && q.size(1) % Hkv == 0, "varlen_attention: q's heads (", q.size(1),
                    ") must be a multiple of k's (", Hkv, ")");
  for (const auto& [t, name] : {std::pair{&cu_q, "cu_seqlens_q"}, {&cu_k, "cu_seqlens_k"}})
    TORCH_CHECK_VALUE(t->scalar_type() == at::kInt && t->dim() == 1 && t->size(0) >= 1 && t->device().is_cpu() &&
                          t->is_contiguous(),
                      "varlen_attention: ", name, " must be a contiguous int32 (B + 1,) CPU tensor");
  TORCH_CHECK_VALUE(cu_q.size(0) == cu_k.size(0), "varlen_attention: cu_seqlens_q and cu_seqlens_k differ in length");
  const int64_t B = cu_q.size(0) - 1;
  at::Tensor table;
  if (paged) {
    table = block_table->contiguous();
    TORCH_CHECK_VALUE(table.scalar_type() == at::kInt && table.dim() == 2 && table.size(0) == B &&
                          table.device().is_cpu(),
                      "varlen_attention: block_table must be int32 (B, max_blocks) on the CPU");
  }
  // every row the kernel reads or writes must exist: a bad offset or block is a ValueError, not a
  // wild access
  const int32_t *cq = cu_q.data_ptr<int32_t>(), *ck = cu_k.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(cq[b] >= 0 && cq[b] <= cq[b + 1] && cq[b + 1] <= q.size(0) && ck[b] >= 0 && ck[b] <= ck[b + 1] &&
                          (paged || ck[b + 1] <= k.size(0)),
                      "varlen_attention: sequence ", b, "'s offsets (q ", cq[b], "..", cq[b + 1], ", k ", ck[b], "..",
                      ck[b + 1], ") are not increasing within q's ", q.size(0), " and k's ", k.size(0), " rows");
    if (!paged) continue;
    const int64_t bs = k.size(1), mb = table.size(1), n = ck[b + 1] - ck[b];
    const int32_t* tb = table.data_ptr<int32_t>() + b * mb;
    TORCH_CHECK_VALUE(n <= mb * bs, "varlen_attention: sequence ", b, " has ", n, " cached keys, more than its ", mb,
                      " table entries hold");
    check_table_row(tb, b, n, bs, k.size(0), "varlen_attention: ");
  }
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, "varlen_attention: window_left and window_right must "
                    "be >= -1 (-1: unbounded), got ", window_left, " and ", window_right);
  return varlen_attention_cpu(q, k, v, cu_q, cu_k, causal, scale, table, window_left, window_right);
}

// One decoder layer of a CPU decode step in one call (decode_cpu.h has the arguments) -> {x, residual}.
// Checked here as far as the layer's geometry goes; each op it runs checks its own inputs.
std::vector<at::Tensor> decode_layer(const at::Tensor& x, const OptT& residual, const std::vector<OptT>& w,
                                     const std::vector<int64_t>& n, at::Tensor& k_cache, at::Tensor& v_cache,
                                     const at::Tensor& slot_mapping, const at::Tensor& block_table,
                                     const at::Tensor& seq_lens, const OptT& cos, const OptT& sin, int64_t n_head,
                                     double eps, bool rms, int64_t act, double scale, int64_t window_left) {
  TORCH_CHECK_TYPE(x.device().is_cpu() && x.scalar_type() == at::kFloat, "decode_layer: x must be a CPU float32 "
                   "tensor, got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 2, "decode_layer: x must be 2-D (B, C), got ", x.sizes());
  TORCH_CHECK_VALUE(w.size() == 12, "decode_layer: w must hold the layer's 12 tensors, got ", w.size());
  for (size_t i = 0; i < 12; i += 2)
    TORCH_CHECK_VALUE(present(w[i]), "decode_layer: w[", i, "] (a weight) is missing");
  TORCH_CHECK_VALUE(act >= 0 && act <= 4, "decode_layer: act must be 0..4, got ", act);
  TORCH_CHECK_VALUE(present(cos) == present(sin), "decode_layer: give both cos and sin, or neither");
  const int64_t Hkv = k_cache.size(2), D = k_cache.dim() == 4 ? k_cache.size(3) : 0;
  TORCH_CHECK_VALUE(n_head > 0 && Hkv > 0 && n_head % Hkv == 0, "decode_layer: n_head ", n_head,
                    " must be a positive multiple of the cache's ", Hkv, " heads");
  // the packed weights no longer show their row counts exactly (panels are padded): n states them,
  // and they must fit the layer's geometry (fc2's input width is the MLP's)
  for (size_t i : {2, 4, 8, 10})
    TORCH_CHECK_VALUE(packed_geometry(*w[i]).first > 0, "decode_layer: w[", i, "] must be packed by linear_pack "
                      "(kernels.decode.pack_linear), got ", w[i]->scalar_type(), " ", w[i]->sizes());
  const int64_t C = x.size(1), F = packed_geometry(*w[10]).first;
  TORCH_CHECK_VALUE(n.size() == 4 && n[0] == (n_head + 2 * Hkv) * D && n[1] == C && n[3] == C &&
                        n[2] == (act == 4 ? 2 * F : F),
                    "decode_layer: the GEMMs' output features n = ", c10::IntArrayRef(n), " do not fit C = ", C,
                    ", (", n_head, " + 2 x ", Hkv, ") heads x ", D, ", MLP width ", F);
  TORCH_CHECK_VALUE(window_left >= -1, "decode_layer: window_left must be >= -1 (-1: unbounded), got ", window_left);
  return decode_layer_cpu(x, residual, w, n, k_cache, v_cache, slot_mapping, block_table, seq_lens, cos, sin, n_head,
                          eps, rms, act, scale, window_left);
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
  m.def("norm_fwd", &norm_fwd, "LayerNorm/RMSNorm forward -> [y, x + residual or None, mean, rstd]", py::arg("x"),
        py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("rms"));
  m.def("norm_bwd", &norm_bwd, "LayerNorm/RMSNorm backward -> [dx, dweight, dbias or None]", py::arg("dy"),
        py::arg("h"), py::arg("dh"), py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("has_bias"),
        py::arg("rms"));
  m.def("gemm", &gemm, "a @ b.T + bias with a fused activation -> [y, pre-activation or None]", py::arg("a"),
        py::arg("b"), py::arg("bias"), py::arg("act"), py::arg("save_preact"));
  m.def("linear_pack", &linear_pack, "w (N, K) float32 -> the panels linear_packed reads", py::arg("w"),
        py::arg("panel") = 0);
  m.def("linear_panels", &linear_cpu_panels, "the panel widths linear_pack can make on this CPU, fastest first");
  m.def("linear_packed", &linear_packed, "CPU act(x @ w.T + bias) on a weight from linear_pack -> (M, N)",
        py::arg("x"), py::arg("packed"), py::arg("bias"), py::arg("n"), py::arg("act"));
  m.def("packed_rows", &packed_rows, "rows ids of a packed (N, K) weight, dequantised -> (len(ids), K) float32",
        py::arg("packed"), py::arg("ids"), py::arg("n"));
  m.def("swiglu", &swiglu, "CPU [gate | up] -> silu(gate) * up", py::arg("f"));
  m.def("rope_", &rope_, "CPU rotary embedding of t's first heads, in place", py::arg("t"), py::arg("cos"),
        py::arg("sin"), py::arg("heads"));
  m.def("gemm_dgrad", &gemm_dgrad, "dz @ w: the input gradient of F.linear (CUDA)", py::arg("dz"), py::arg("w"));
  m.def("gemm_wgrad", &gemm_wgrad, "dz.T @ x: the weight gradient of F.linear (CUDA)", py::arg("dz"), py::arg("x"));
  m.def("gemm_sm90", &gemm_sm90, "whether gemm(a, b, ...) takes the CUTLASS Hopper kernels", py::arg("a"),
        py::arg("b"));
  m.def("act_bwd", &act_bwd, "dy * act'(z)", py::arg("dy"), py::arg("z"), py::arg("act"));
  m.def("paged_attention", &paged_attention, "CPU decode attention over a paged KV cache -> (B, H, D)", py::arg("q"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("block_table"), py::arg("seq_lens"), py::arg("scale"),
        py::arg("window_left") = -1);
  m.def("varlen_attention", &varlen_attention, "CPU float32 attention over packed variable-length sequences",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("causal"),
        py::arg("scale"), py::arg("block_table") = py::none(), py::arg("window_left") = -1,
        py::arg("window_right") = -1);
  m.def("store_kvcache", &store_kvcache, "CPU write of new K/V rows into the paged caches, in place", py::arg("k"),
        py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slot_mapping"));
  m.def("decode_layer", &decode_layer, "one decoder layer of a CPU decode step -> [x, residual]", py::arg("x"),
        py::arg("residual"), py::arg("w"), py::arg("n"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slot_mapping"),
        py::arg("block_table"), py::arg("seq_lens"), py::arg("cos"), py::arg("sin"), py::arg("n_head"),
        py::arg("eps"), py::arg("rms"), py::arg("act"), py::arg("scale"), py::arg("window_left") = -1);
  m.def("has_cuda", &has_cuda, "whether this build has the CUDA kernels");
}
