// LayerNorm forward on CPU: fp32 statistics, one row per task.
#include <ATen/Parallel.h>
#include <cmath>
#include <tuple>

#include "checks.h"

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& w,
                                                                   const at::Tensor& b, double eps) {
  const int64_t n = x.size(-1), rows = x.numel() / n;
  auto xf = x.to(at::kFloat).contiguous(), wf = w.to(at::kFloat).contiguous(), bf = b.to(at::kFloat).contiguous();
  auto y = at::empty_like(xf);
  auto mean = at::empty({rows}, xf.options()), rstd = at::empty({rows}, xf.options());
  const float *xp = xf.data_ptr<float>(), *wp = wf.data_ptr<float>(), *bp = bf.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * n;
      double s = 0;
      for (int64_t i = 0; i < n; ++i) s += xr[i];
      const float mu = s / n;
      double v = 0;
      for (int64_t i = 0; i < n; ++i) v += (xr[i] - mu) * (xr[i] - mu);
      const float rs = 1.0f / std::sqrt(float(v / n) + float(eps));
      for (int64_t i = 0; i < n; ++i) yp[r * n + i] = (xr[i] - mu) * rs * wp[i] + bp[i];
      mp[r] = mu;
      rp[r] = rs;
    }
  });
  return {y.to(x.scalar_type()), mean, rstd};
}
