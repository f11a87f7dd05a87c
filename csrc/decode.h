// Host-side declarations of the decode op (schema in decode.cpp, CUDA kernel in cuda/decode.cu).
#pragma once

#include <ATen/ATen.h>

namespace hss {

// Checks shared by the CPU and CUDA implementations (the op can be called through torch.ops directly).
void check_decode_args(const at::Tensor& logits, const at::Tensor& path_nodes, int64_t activation, int64_t score);

}  // namespace hss
