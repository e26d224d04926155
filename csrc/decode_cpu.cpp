// The decode layer's model logic (decode_cpu.h); the kernels are the other *_cpu.cpp files.
#include "decode_cpu.h"

std::vector<at::Tensor> decode_layer_cpu(const at::Tensor& x, const OptT& residual, const std::vector<OptT>& w,
                                         const std::vector<int64_t>& n, at::Tensor& k_cache, at::Tensor& v_cache,
                                         const at::Tensor& slot_mapping, const at::Tensor& block_table,
                                         const at::Tensor& seq_lens, const OptT& cos, const OptT& sin,
                                         int64_t n_head, double eps, bool rms, int64_t act, double scale,
                                         int64_t window_left, int64_t parallel, int64_t part, const OptT& k_scale,
                                         const OptT& v_scale, const std::vector<OptT>& lora, const OptT& lora_slots) {
  const int64_t B = x.size(0), Hkv = k_cache.size(2), D = k_cache.dim() == 4 ? k_cache.size(3) : 0;
  // GEMM g (0 qkv, 1 proj, 2 fc, 3 fc2) of h, its tokens' LoRA updates added before the activation
  const auto gemm = [&](const at::Tensor& h, int g, int64_t gact) {
    const int wi = g < 2 ? 2 + 2 * g : 4 + 2 * g;
    if (lora.empty() || !present(lora[2 * g])) return linear_packed(h, *w[wi], w[wi + 1], n[g], gact);
    at::Tensor y = linear_packed(h, *w[wi], w[wi + 1], n[g], 0);
    lora_add_cpu_(y, h, *lora[2 * g], *lora[2 * g + 1], *lora_slots, gact);
    return y;
  };
  const auto mlp = [&](const at::Tensor& h) {
    at::Tensor f = gemm(h, 2, act >= 4 ? 0 : act);
    if (act >= 4) f = glu_cpu(f, act == 5);
    return gemm(f, 3, 0);
  };
  if (part == 2) {  // the MLP half, after the caller's all-reduce of the attention half's output
    const at::Tensor& stream = *residual;
    if (parallel == 0) {
      const std::vector<at::Tensor> n2 = norm_fwd(x, stream, *w[6], w[7], eps, rms);
      return {mlp(n2[0]), n2[1]};
    }
    const at::Tensor h = parallel == 1 ? norm_fwd(stream, OptT(), *w[6], w[7], eps, rms)[0]
                                       : norm_fwd(stream, OptT(), *w[0], w[1], eps, rms)[0];
    return {mlp(h), stream};
  }
  const std::vector<at::Tensor> n1 = norm_fwd(x, residual, *w[0], w[1], eps, rms);
  const at::Tensor stream = present(residual) ? n1[1] : x;
  at::Tensor t = gemm(n1[0], 0, 0).view({B, n_head + 2 * Hkv, D});
  const OptT qn = w.size() > 12 ? w[12] : OptT(), kn = w.size() > 13 ? w[13] : OptT();
  if (present(qn) || present(kn)) rms_heads_cpu_(t, qn, kn, n_head, Hkv, eps);  // Qwen3: before the rotary
  if (present(cos)) rope_(t, *cos, *sin, n_head + Hkv);  // q and k rotated together
  const at::Tensor q = t.narrow(1, 0, n_head);
  store_kvcache(t.narrow(1, n_head, Hkv), t.narrow(1, n_head + Hkv, Hkv), k_cache, v_cache, slot_mapping, k_scale,
                v_scale);
  const at::Tensor o = paged_attention(q, k_cache, v_cache, block_table, seq_lens, scale, window_left, -1, k_scale,
                                       v_scale);
  const at::Tensor a = gemm(o.view({B, n_head * D}), 1, 0);
  if (part == 1) return {a, stream};  // the attention half: its output before the all-reduce
  if (parallel == 0) {  // pre-norm: the MLP reads the stream after attention's output joined it
    const std::vector<at::Tensor> n2 = norm_fwd(a, stream, *w[6], w[7], eps, rms);
    return {mlp(n2[0]), n2[1]};
  }
  // parallel: attention and MLP both read the stream s; the next layer's norm1 adds their sum to it
  const at::Tensor h = parallel == 1 ? norm_fwd(stream, OptT(), *w[6], w[7], eps, rms)[0] : n1[0];
  return {mlp(h).add_(a), stream};
}
