#pragma once
#include <torch/extension.h>

// Input checks for the bindings: each names the argument it rejects.
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CHECK_FLOAT(x)                                                                          \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||               \
                  (x).scalar_type() == at::kBFloat16,                                            \
              #x " must be float32, float16 or bfloat16, got ", (x).scalar_type())
#define CHECK_SAME_DEVICE(x, y) \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on the same device")
#define CHECK_SAME_DTYPE(x, y) \
  TORCH_CHECK((x).scalar_type() == (y).scalar_type(), #x " and " #y " must have the same dtype")
#define CHECK_INPUT(x) \
  CHECK_CONTIGUOUS(x); \
  CHECK_FLOAT(x)
