// RAII cuDNN descriptors, dtype mapping, and tensor descriptors for both image layouts.
#pragma once

#include <cudnn.h>

#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/status.h"

namespace jaxdnn {

template <typename Handle, cudnnStatus_t (*Destroy)(Handle)>
struct DescriptorDeleter {
  void operator()(Handle handle) const {
    if (handle != nullptr) Destroy(handle);
  }
};

template <typename Handle, cudnnStatus_t (*Destroy)(Handle)>
using Descriptor =
    std::unique_ptr<std::remove_pointer_t<Handle>, DescriptorDeleter<Handle, Destroy>>;

using TensorDescriptor = Descriptor<cudnnTensorDescriptor_t, cudnnDestroyTensorDescriptor>;

// Creates an empty descriptor with the matching cudnnCreate* call.
template <typename Handle, cudnnStatus_t (*Destroy)(Handle)>
ffi::Error CreateDescriptor(const char* op, cudnnStatus_t (*create)(Handle*),
                            Descriptor<Handle, Destroy>* out) {
  Handle raw = nullptr;
  JAXDNN_RETURN_IF_CUDNN_ERROR(op, create(&raw));
  out->reset(raw);
  return ffi::Error::Success();
}

// The cuDNN data type of an XLA buffer dtype (float16, bfloat16, float32, float64).
ffi::Error CudnnDataType(const char* op, ffi::DataType dtype, cudnnDataType_t* out);

// alpha/beta scaling factors: cuDNN reads them as double for double tensors and as float
// for every other type.
struct Scaling {
  explicit Scaling(double alpha = 1.0, double beta = 0.0)
      : f{static_cast<float>(alpha), static_cast<float>(beta)}, d{alpha, beta} {}
  const void* alpha(cudnnDataType_t type) const {
    return type == CUDNN_DATA_DOUBLE ? (const void*)&d[0] : &f[0];
  }
  const void* beta(cudnnDataType_t type) const {
    return type == CUDNN_DATA_DOUBLE ? (const void*)&d[1] : &f[1];
  }
  float f[2];
  double d[2];
};

enum class Layout { kChannelsFirst, kChannelsLast };

// Parses "NCHW"/"NCDHW"/"NCW" and "NHWC"/"NDHWC"/"NWC".
ffi::Error ParseLayout(const char* op, std::string_view text, Layout* out);

// The dimensions of a buffer in cuDNN's logical order (N, C, spatial...), whatever its
// memory layout.
std::vector<int> LogicalDims(ffi::Span<const int64_t> dims, Layout layout);

// A fully packed tensor descriptor of logical dims (N, C, spatial...) laid out in memory
// as `layout`; channels-last is expressed through strides.
ffi::Error MakeTensorDescriptor(const char* op, cudnnDataType_t type,
                                const std::vector<int>& logical_dims, Layout layout,
                                TensorDescriptor* out);

inline bool HasZeroSize(ffi::Span<const int64_t> dims) {
  for (int64_t d : dims)
    if (d == 0) return true;
  return false;
}

}  // namespace jaxdnn
