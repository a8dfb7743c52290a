// Trace-time queries of the RNN family (cuda/rnn.cc), for the extension module: the sizes
// jaxdnn/rnn.py gives its primitives, and cuDNN's own weight layout for the GPU tests.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"

namespace jaxdnn {

// One configuration, named as the FFI attributes name it, with the data's dtype
// ("float16", "bfloat16", "float32", "float64") and the input size.
struct RnnQuery {
  std::string mode, input_mode, algo, dtype;
  int64_t hidden_size = 0, num_layers = 0, bidirectional = 0, allow_tf32 = 1, input_dim = 0;
};

// One matrix or bias of the weight space, as cudnnGetRNNWeightParams describes it.
struct RnnWeightParam {
  int64_t pseudo_layer, lin_id;
  std::string kind;           // "matrix" or "bias"
  int64_t offset;             // in elements from the start of the weight space
  std::vector<int64_t> dims;  // the descriptor's dims
};

struct RnnWeightLayout {
  int64_t weight_bytes = 0;
  std::vector<RnnWeightParam> params;
};

// (workspace, reserve) bytes of a call on x of (max_seq_length, batch_size, input_dim), in
// cuDNN's training or inference mode, on the current device.
ffi::ErrorOr<std::pair<int64_t, int64_t>> RnnTempSpaceSizes(const RnnQuery& query,
                                                            int64_t max_seq_length,
                                                            int64_t batch_size, bool training);

// The weight space's size and every matrix and bias in it, on the current device.
ffi::ErrorOr<RnnWeightLayout> RnnWeightParams(const RnnQuery& query);

}  // namespace jaxdnn
