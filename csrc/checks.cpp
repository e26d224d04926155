// The public ops' argument rules and the index rules (checks.h says who runs them); the C++
// kernels' own rules are kernel_checks.cpp's. Messages name the argument, the value found and
// what was expected.
#include "checks.h"

#include <algorithm>
#include <string>

namespace {

// the attention kernels' head dims: the Triton ones pad D to a power of two (at least 16, tl.dot's
// smallest), the C++ ones step over D in 8-float vectors; 256 bounds the Triton tiles
constexpr int64_t kHeadDimStep = 8, kMaxHeadDim = 256;

// an integer tensor (offsets, tables, slots) of dtype t on ref's device
void indices(const char* name, const at::Tensor& x, int64_t ndim, at::ScalarType t, const char* ref_name,
             const at::Tensor& ref) {
  TORCH_CHECK_TYPE(x.scalar_type() == t, name, " has dtype ", dtype_name(x.scalar_type()), "; expected ",
                   dtype_name(t));
  check_dims(name, x, ndim);
  check_on_device(name, x, ref_name, ref);
}

// q (..., H, D) against k and v (..., Hkv, D): GQA/MQA heads, one head dim the kernels take (check_head_dim);
// same_dtype: k and v in q's dtype (caches have their own rule, check_kv_cache)
void heads(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* kname, const char* vname,
           bool same_dtype = true) {
  if (same_dtype) check_same("q", q, kname, k), check_same("q", q, vname, v);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), kname, " and ", vname, " must have the same shape, got ", k.sizes(),
                    " and ", v.sizes());
  const int64_t h = q.size(-2), hkv = k.size(-2), d = q.size(-1);
  TORCH_CHECK_VALUE(k.size(-1) == d, kname, " head dim ", k.size(-1), " != q head dim ", d);
  TORCH_CHECK_VALUE(hkv > 0 && h % hkv == 0, "q heads (", h, ") must be a multiple of ", kname, "/", vname,
                    " heads (", hkv, ")");
  check_head_dim(d);
}

// The values of an index tensor, read on the host (keep holds a contiguous copy when x is not)
template <typename T>
const T* host_values(const char* name, const at::Tensor& x, at::Tensor& keep) {
  TORCH_CHECK(x.device().is_cpu(), name, ": index values are checked on the CPU, got ", x.device());
  keep = x.contiguous();
  return keep.data_ptr<T>();
}

// The blocks holding the first lens(b) tokens of each row b of the table are blocks of the cache;
// entries past them are padding, never read
template <typename Lens>
void table_rows(const int32_t* tb, int64_t rows, int64_t width, Lens lens, int64_t num_blocks, int64_t bs) {
  for (int64_t b = 0; b < rows; ++b)
    for (int64_t j = 0; j < (lens(b) + bs - 1) / bs; ++j) {
      const int32_t blk = tb[b * width + j];
      TORCH_CHECK_VALUE(blk >= 0 && blk < num_blocks, "block_table[", b, ", ", j, "] = ", blk, " is outside [0, ",
                        num_blocks - 1, "] (the cache's blocks)");
    }
}

// cu (B + 1) rises from 0, within rows (-1: unbounded) of `of`
void offsets(const char* name, const int32_t* cu, int64_t n, int64_t rows, const char* of) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t lo = i == 0 ? 0 : cu[i - 1];
    if (rows >= 0) {
      TORCH_CHECK_VALUE(cu[i] >= lo && cu[i] <= rows, name, "[", i, "] = ", cu[i], " is outside [", lo, ", ", rows,
                        "] (offsets rise from 0 within ", of, "'s ", rows, " rows)");
    } else {
      TORCH_CHECK_VALUE(cu[i] >= lo, name, "[", i, "] = ", cu[i], " is outside [", lo, ", ...) (offsets rise from 0)");
    }
  }
}

}  // namespace

// ---- building blocks

std::string dtype_name(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

void check_dims(const char* name, const at::Tensor& x, int64_t ndim) {
  TORCH_CHECK_VALUE(x.dim() == ndim, name, " must be ", ndim, "-D, got shape ", x.sizes());
}

// a floating-point tensor of the public ops (float64 runs their torch paths); ndim -1: any
void check_float(const char* name, const at::Tensor& x, int64_t ndim) {
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble, name, " has dtype ",
                   dtype_name(t), "; expected one of torch.float32, torch.float16, torch.bfloat16, torch.float64");
  if (ndim >= 0) check_dims(name, x, ndim);
}

void check_on_device(const char* name, const at::Tensor& x, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(x.device() == ref.device(), name, " is on ", x.device(), " but ", ref_name, " is on ",
                    ref.device());
}

// x on ref's device with ref's dtype
void check_same(const char* ref_name, const at::Tensor& ref, const char* name, const at::Tensor& x) {
  check_on_device(name, x, ref_name, ref);
  TORCH_CHECK_TYPE(x.scalar_type() == ref.scalar_type(), name, " has dtype ", dtype_name(x.scalar_type()), " but ",
                   ref_name, " has ", dtype_name(ref.scalar_type()));
}

// ---- public ops

void check_kv_cache(const char* ref_name, const at::Tensor& ref, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const OptT& k_scale, const OptT& v_scale) {
  check_dims("k_cache", k_cache, 4), check_dims("v_cache", v_cache, 4);
  check_on_device("k_cache", k_cache, ref_name, ref), check_on_device("v_cache", v_cache, ref_name, ref);
  const auto t = k_cache.scalar_type();
  TORCH_CHECK_TYPE(v_cache.scalar_type() == t, "v_cache has dtype ", dtype_name(v_cache.scalar_type()),
                   " but k_cache has ", dtype_name(t));
  TORCH_CHECK_TYPE(t == ref.scalar_type() || t == at::kBFloat16 || t == at::kChar, "k_cache has dtype ",
                   dtype_name(t), "; expected ", ref_name, "'s ", dtype_name(ref.scalar_type()),
                   ", torch.bfloat16 or torch.int8 (with k_scale and v_scale)");
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must have the same shape, got ",
                    k_cache.sizes(), " and ", v_cache.sizes());
  const bool int8 = t == at::kChar;
  for (const auto& [s, name] : {std::pair{&k_scale, "k_scale"}, {&v_scale, "v_scale"}}) {
    TORCH_CHECK_VALUE(present(*s) == int8, int8 ? "an int8 KV cache needs " : "only an int8 KV cache takes ", name);
    if (!int8) continue;
    TORCH_CHECK_TYPE((*s)->scalar_type() == at::kFloat, name, " has dtype ", dtype_name((*s)->scalar_type()),
                     "; expected torch.float32");
    check_on_device(name, **s, ref_name, ref);
    TORCH_CHECK_VALUE((*s)->sizes() == k_cache.sizes().slice(0, 3) && (*s)->is_contiguous(), name,
                      " must be contiguous (blocks, block_size, Hkv) = ", k_cache.sizes().slice(0, 3), ", got ",
                      (*s)->sizes());
  }
}

void check_head_dim(int64_t d) {
  TORCH_CHECK_VALUE(d > 0 && d % kHeadDimStep == 0 && d <= kMaxHeadDim, "head dim ", d, " not supported: must be a "
                    "multiple of ", kHeadDimStep, " up to ", kMaxHeadDim);
}

void check_window(int64_t left, int64_t right) {
  TORCH_CHECK_VALUE(left >= -1 && right >= -1, "window_size entries must be >= -1 (-1: unbounded), got (", left, ", ",
                    right, ")");
}

void check_flash_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t left,
                           int64_t right) {
  check_float("q", q, 4), check_float("k", k, 4), check_float("v", v, 4);
  heads(q, k, v, "k", "v");
  TORCH_CHECK_VALUE(k.size(0) == q.size(0), "k batch ", k.size(0), " != q batch ", q.size(0));
  check_window(left, right);
}

void check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                  const at::Tensor& cu_k, const OptT& block_table, int64_t left, int64_t right, const OptT& k_scale,
                  const OptT& v_scale) {
  check_float("q", q, 3);
  if (present(block_table)) {  // paged caches
    check_kv_cache("q", q, k, v, k_scale, v_scale);
  } else {  // packed rows
    check_float("k", k, 3), check_float("v", v, 3);
    TORCH_CHECK_VALUE(!present(k_scale) && !present(v_scale), "k_scale and v_scale go with a paged int8 cache "
                      "(block_table)");
  }
  heads(q, k, v, "k", "v", !present(block_table));
  indices("cu_seqlens_q", cu_q, 1, at::kInt, "q", q);
  indices("cu_seqlens_k", cu_k, 1, at::kInt, "q", q);
  TORCH_CHECK_VALUE(cu_q.size(0) == cu_k.size(0) && cu_q.size(0) >= 1, "cu_seqlens_q and cu_seqlens_k must both "
                    "have B+1 entries, got ", cu_q.size(0), " and ", cu_k.size(0));
  if (present(block_table)) {
    indices("block_table", *block_table, 2, at::kInt, "q", q);
    TORCH_CHECK_VALUE(block_table->size(0) == cu_q.size(0) - 1, "block_table has ", block_table->size(0),
                      " rows for ", cu_q.size(0) - 1, " sequences");
  }
  check_window(left, right);
}

void check_paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_table, const at::Tensor& seq_lens, int64_t left, int64_t right,
                           const OptT& k_scale, const OptT& v_scale) {
  check_float("q", q, 3);
  check_kv_cache("q", q, k_cache, v_cache, k_scale, v_scale);
  heads(q, k_cache, v_cache, "k_cache", "v_cache", false);
  indices("block_table", block_table, 2, at::kInt, "q", q);
  indices("seq_lens", seq_lens, 1, at::kInt, "q", q);
  TORCH_CHECK_VALUE(block_table.size(0) == q.size(0) && seq_lens.size(0) == q.size(0), "block_table rows (",
                    block_table.size(0), ") and seq_lens (", seq_lens.size(0), ") must equal the batch size (",
                    q.size(0), ")");
  check_window(left, right);
}

void check_store_kvcache(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& slot_mapping, const OptT& k_scale,
                         const OptT& v_scale) {
  check_float("k", k, 3), check_float("v", v, 3);
  check_same("k", k, "v", v);
  check_kv_cache("k", k, k_cache, v_cache, k_scale, v_scale);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes() && k_cache.sizes() == v_cache.sizes(), "k/v shapes ", k.sizes(), ", ",
                    v.sizes(), " and cache shapes ", k_cache.sizes(), ", ", v_cache.sizes(), " must match pairwise");
  TORCH_CHECK_VALUE(k.sizes().slice(1) == k_cache.sizes().slice(2), "k rows ", k.sizes().slice(1),
                    " do not match cache rows ", k_cache.sizes().slice(2));
  indices("slot_mapping", slot_mapping, 1, at::kLong, "k", k);
  TORCH_CHECK_VALUE(slot_mapping.size(0) == k.size(0), "slot_mapping has ", slot_mapping.size(0), " entries for ",
                    k.size(0), " tokens");
  TORCH_CHECK_VALUE(k_cache.stride(-1) == 1 && v_cache.stride(-1) == 1,
                    "k_cache and v_cache must be contiguous in the head dim");
}

void check_norm(const at::Tensor& x, const at::Tensor& weight, const OptT& bias, const OptT& residual, double eps) {
  check_float("x", x, -1);
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have a last dim to normalize, got shape ", x.sizes());
  check_float("weight", weight, 1);
  if (present(bias)) check_float("bias", *bias, 1);
  if (present(residual)) {
    check_float("residual", *residual, -1);
    TORCH_CHECK_VALUE(residual->sizes() == x.sizes(), "residual shape ", residual->sizes(), " != x shape ",
                      x.sizes());
    check_same("x", x, "residual", *residual);
  }
  // weight and bias in another float dtype (fp32 masters) are cast to x's
  for (const auto& [p, name] : {std::pair{&weight, "weight"}, {present(bias) ? &*bias : nullptr, "bias"}}) {
    if (p == nullptr) continue;
    check_on_device(name, *p, "x", x);
    TORCH_CHECK_VALUE(p->size(0) == x.size(-1), name, " has ", p->size(0), " elements but x's last dim is ",
                      x.size(-1));
  }
  TORCH_CHECK_VALUE(eps >= 0, "eps must be non-negative, got ", eps);
}

void check_linear(const at::Tensor& x, const at::Tensor& weight, const OptT& bias) {
  check_float("x", x, -1), check_float("weight", weight, 2);
  if (present(bias)) check_float("bias", *bias, 1);
  check_same("x", x, "weight", weight);
  if (present(bias)) check_same("x", x, "bias", *bias);
  TORCH_CHECK_VALUE(x.dim() >= 1 && weight.size(1) == x.size(-1), "weight has in_features ", weight.size(1),
                    " but x's last dim is ", x.dim() >= 1 ? x.size(-1) : 0, " (x has shape ", x.sizes(), ")");
  if (present(bias))
    TORCH_CHECK_VALUE(bias->size(0) == weight.size(0), "bias has ", bias->size(0), " elements but weight has ",
                      weight.size(0), " rows");
}

void check_act(const char* op, int64_t act, int64_t max_act) {
  TORCH_CHECK_VALUE(act >= 0 && act <= max_act, op, ": act must be 0..", max_act, ", got ", act);
}

void check_quantize(const at::Tensor& weight, int64_t group) {
  check_float("weight", weight, 2);
  const int64_t K = weight.size(1);
  TORCH_CHECK_VALUE(group == 0 || K % group == 0, "group_size must be None (per output channel) or a positive "
                    "divisor of the weight's ", K, " input features, got ", group);
  TORCH_CHECK_VALUE(K > 0, "weight has no input features (K = 0)");
}

void check_quantized(const at::Tensor& q, const at::Tensor& scale, int64_t group) {
  TORCH_CHECK_TYPE(q.scalar_type() == at::kChar, "w.q has dtype ", dtype_name(q.scalar_type()),
                   "; expected torch.int8");
  check_dims("w.q", q, 2);
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat, "w.scale has dtype ", dtype_name(scale.scalar_type()),
                   "; expected torch.float32");
  check_dims("w.scale", scale, 2);
  TORCH_CHECK_VALUE(scale.size(0) == q.size(0) && scale.size(1) * group == q.size(1) && scale.device() == q.device(),
                    "w.scale ", scale.sizes(), " on ", scale.device(), " does not fit q ", q.sizes(), " on ",
                    q.device(), " in groups of ", group);
}

void check_linear_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, int64_t group,
                       const OptT& bias) {
  check_quantized(q, scale, group);
  check_float("x", x, -1);
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, "x must be (..., ", K, ") for a (", N, ", ", K,
                    ") weight, got shape ", x.sizes());
  check_on_device("x", x, "w", q);
  if (present(bias)) {
    check_float("bias", *bias, 1);
    check_same("x", x, "bias", *bias);
    TORCH_CHECK_VALUE(bias->size(0) == N, "bias must be (", N, ",), got ", bias->sizes());
  }
}

void check_w8a8(int64_t K, int64_t group) {
  TORCH_CHECK_VALUE(K % 32 == 0 && group % 32 == 0, "int8 activations (w8a8) need K (", K, ") and the group size (",
                    group, ") in multiples of 32");
}

void check_linear_w8a8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, int64_t group,
                       const OptT& bias) {
  check_linear_int8(x, q, scale, group, bias);
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "x has dtype ", dtype_name(x.scalar_type()),
                   "; expected torch.float32");
  check_w8a8(q.size(1), group);
}

void check_pack_linear(const at::Tensor& weight, const OptT& scale, int64_t group, bool int8_activations) {
  if (!present(scale)) {
    check_float("weight", weight, 2);
    TORCH_CHECK_VALUE(!int8_activations, "int8_activations needs a QuantizedWeight (K and group size in multiples "
                      "of 32)");
    return;
  }
  check_quantized(weight, *scale, group);
  if (int8_activations) check_w8a8(weight.size(1), group);
}

int64_t check_panel(int64_t panel) {
  const auto& ps = linear_cpu_panels();
  const int64_t width = panel == 0 ? ps[0] : panel;
  TORCH_CHECK_VALUE(std::find(ps.begin(), ps.end(), width) != ps.end(), "panel must be 0 or one of this CPU's ",
                    c10::IntArrayRef(ps), ", got ", panel);
  return width;
}

// ---- index values

void check_paged_indices(const at::Tensor& block_table, const at::Tensor& seq_lens, int64_t num_blocks,
                         int64_t block_size) {
  at::Tensor tk, lk;
  const int32_t* tb = host_values<int32_t>("block_table", block_table, tk);
  const int32_t* ln = host_values<int32_t>("seq_lens", seq_lens, lk);
  const int64_t rows = block_table.size(0), width = block_table.size(1), cap = width * block_size;
  for (int64_t b = 0; b < rows; ++b)
    TORCH_CHECK_VALUE(ln[b] >= 1 && ln[b] <= cap, "seq_lens[", b, "] = ", ln[b], " is outside [1, ", cap, "] (", width,
                      " table entries x block size ", block_size, ")");
  table_rows(tb, rows, width, [&](int64_t b) { return int64_t{ln[b]}; }, num_blocks, block_size);
}

void check_slot_indices(const at::Tensor& slot_mapping, int64_t num_slots) {
  at::Tensor keep;
  const int64_t* s = host_values<int64_t>("slot_mapping", slot_mapping, keep);
  for (int64_t i = 0; i < slot_mapping.size(0); ++i)
    TORCH_CHECK_VALUE(s[i] >= -1 && s[i] < num_slots, "slot_mapping[", i, "] = ", s[i], " is outside [-1, ",
                      num_slots - 1, "] (-1 skips a token)");
}

void check_varlen_indices(const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t q_rows, int64_t k_rows,
                          const OptT& block_table, int64_t num_blocks, int64_t block_size) {
  const int64_t B = cu_q.size(0) - 1;
  if (B < 1) return;  // no sequence, nothing read
  at::Tensor qk, kk, tk;
  const int32_t* cq = host_values<int32_t>("cu_seqlens_q", cu_q, qk);
  const int32_t* ck = host_values<int32_t>("cu_seqlens_k", cu_k, kk);
  offsets("cu_seqlens_q", cq, B + 1, q_rows, "q");
  offsets("cu_seqlens_k", ck, B + 1, present(block_table) ? -1 : k_rows, "k");
  if (!present(block_table)) return;
  const int32_t* tb = host_values<int32_t>("block_table", *block_table, tk);
  const int64_t width = block_table->size(1), cap = width * block_size;
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(ck[b + 1] - ck[b] <= cap, "cu_seqlens_k gives sequence ", b, " ", ck[b + 1] - ck[b],
                      " cached keys, outside [0, ", cap, "] (", width, " table entries x block size ", block_size, ")");
  table_rows(tb, B, width, [&](int64_t b) { return int64_t{ck[b + 1]} - ck[b]; }, num_blocks, block_size);
}
