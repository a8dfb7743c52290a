#include "common/descriptors.h"

#include <string>

namespace jaxdnn {

ffi::Error CudnnDataType(const char* op, ffi::DataType dtype, cudnnDataType_t* out) {
  switch (dtype) {
    case ffi::DataType::F16:
      *out = CUDNN_DATA_HALF;
      break;
    case ffi::DataType::BF16:
      *out = CUDNN_DATA_BFLOAT16;
      break;
    case ffi::DataType::F32:
      *out = CUDNN_DATA_FLOAT;
      break;
    case ffi::DataType::F64:
      *out = CUDNN_DATA_DOUBLE;
      break;
    default:
      return InvalidArgument(op,
                             "unsupported dtype (expected float16, bfloat16, float32 or float64)");
  }
  return ffi::Error::Success();
}

ffi::Error ParseLayout(const char* op, std::string_view text, Layout* out) {
  if (text == "NCHW" || text == "NCDHW" || text == "NCW") {
    *out = Layout::kChannelsFirst;
  } else if (text == "NHWC" || text == "NDHWC" || text == "NWC") {
    *out = Layout::kChannelsLast;
  } else {
    return InvalidArgument(op, "unknown layout '" + std::string(text) + "'");
  }
  return ffi::Error::Success();
}

std::vector<int> LogicalDims(ffi::Span<const int64_t> dims, Layout layout) {
  std::vector<int> logical(dims.begin(), dims.end());
  if (layout == Layout::kChannelsLast && logical.size() >= 3) {
    // (N, spatial..., C) -> (N, C, spatial...)
    int channels = logical.back();
    logical.pop_back();
    logical.insert(logical.begin() + 1, channels);
  }
  return logical;
}

ffi::Error MakeTensorDescriptor(const char* op, cudnnDataType_t type,
                                const std::vector<int>& logical_dims, Layout layout,
                                TensorDescriptor* out) {
  const int rank = static_cast<int>(logical_dims.size());
  std::vector<int> strides(rank);
  if (layout == Layout::kChannelsFirst) {
    int stride = 1;
    for (int i = rank - 1; i >= 0; --i) {
      strides[i] = stride;
      stride *= logical_dims[i];
    }
  } else {
    // Memory order N, spatial..., C: C is innermost, then the spatial axes, then N.
    int stride = 1;
    strides[1] = stride;
    stride *= logical_dims[1];
    for (int i = rank - 1; i >= 2; --i) {
      strides[i] = stride;
      stride *= logical_dims[i];
    }
    strides[0] = stride;
  }
  JAXDNN_RETURN_IF_ERROR(CreateDescriptor(op, cudnnCreateTensorDescriptor, out));
  JAXDNN_RETURN_IF_CUDNN_ERROR(
      op, cudnnSetTensorNdDescriptor(out->get(), type, rank, logical_dims.data(), strides.data()));
  return ffi::Error::Success();
}

}  // namespace jaxdnn
