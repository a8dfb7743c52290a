#include "common/descriptors.h"

#include <string>

namespace jaxdnn {

namespace {
constexpr FloatType kFloatTypes[] = {
    {ffi::DataType::F16, "float16", CUDNN_DATA_HALF},
    {ffi::DataType::BF16, "bfloat16", CUDNN_DATA_BFLOAT16},
    {ffi::DataType::F32, "float32", CUDNN_DATA_FLOAT},
    {ffi::DataType::F64, "float64", CUDNN_DATA_DOUBLE},
};
constexpr char kExpected[] = " (expected float16, bfloat16, float32 or float64)";
}  // namespace

ffi::ErrorOr<FloatType> FloatTypeOf(const char* op, ffi::DataType dtype) {
  for (const FloatType& type : kFloatTypes)
    if (type.dtype == dtype) return type;
  return ffi::Unexpected(InvalidArgument(op, std::string("unsupported dtype") + kExpected));
}

ffi::ErrorOr<FloatType> FloatTypeNamed(const char* op, std::string_view name) {
  for (const FloatType& type : kFloatTypes)
    if (type.name == name) return type;
  return ffi::Unexpected(
      InvalidArgument(op, "unsupported dtype '" + std::string(name) + "'" + kExpected));
}

ffi::Error ParseLayout(const char* op, std::string_view text, Layout* out) {
  constexpr Layout kFirst = Layout::kChannelsFirst, kLast = Layout::kChannelsLast;
  return ParseChoice<Layout>(op, "layout", text,
                             {{"NCHW", kFirst},
                              {"NCDHW", kFirst},
                              {"NCW", kFirst},
                              {"NHWC", kLast},
                              {"NDHWC", kLast},
                              {"NWC", kLast}},
                             out);
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
