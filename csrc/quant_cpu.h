#pragma once
// The packed CPU GEMM on low-precision weights (quant_cpu.cpp): bf16 storage and int8 weight-only
// quantisation, each widened to fp32 in registers and accumulated in fp32.
//
// Layouts (made by kernels.packed.pack_linear; W a panel width of linear_cpu_panels):
//   bf16: (P, K, W) bfloat16, as linear_cpu_pack's fp32 panels.
//   int8: (P, ng, 4 + G, W) int8: per panel and group of G inputs (K = ng G), the W fp32 scales
//         of the panel's rows (the first 4 W bytes), then the group's G x W int8 values k-major.
//   w8a8: (P, ng, 4 + G, W) uint8: the scales as int8's, then the values as q + 128 in G / 4 quads
//         of W x 4 bytes (each row's four consecutive inputs together: VNNI's operand layout).
//         x is quantised per row and block of 32 inputs (kernels.reference.linear_w8a8).
#include "ops.h"

// K, W of a packed weight of any format (fp32, bf16, int8), or {-1, -1} when pw is none of them
std::pair<int64_t, int64_t> packed_geometry(const at::Tensor& pw);

// x (M, K) float32, pw bf16, int8 or uint8 (w8a8) packed as above, bias (N,) float32 or undefined; checked by the binding
at::Tensor quant_cpu_packed(const at::Tensor& x, const at::Tensor& pw, const OptT& bias, int64_t N, int64_t act);


// rows ids (n,) int64 (checked by the binding) of a packed weight of any format, dequantised: (n, K) float32
at::Tensor packed_rows_cpu(const at::Tensor& pw, const at::Tensor& ids);
