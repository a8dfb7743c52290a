// RAII cuDNN descriptors, dtype mapping, and tensor descriptors for both image layouts.
#pragma once

#include <cudnn.h>

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
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

// The floating types the handlers take: XLA's dtype, the name Python gives it (attributes,
// trace-time queries, cache keys) and cuDNN's type. common/frontend.h maps them to the
// frontend's types.
struct FloatType {
  ffi::DataType dtype;
  std::string_view name;
  cudnnDataType_t cudnn;
};
ffi::ErrorOr<FloatType> FloatTypeOf(const char* op, ffi::DataType dtype);
ffi::ErrorOr<FloatType> FloatTypeNamed(const char* op, std::string_view name);

// cuDNN's legacy calls take int sizes.
inline bool FitsInt(int64_t value) { return value >= 0 && value <= INT32_MAX; }

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

// `text` parsed as one of `choices`' names into its value, or an error naming `what`.
template <typename T>
ffi::Error ParseChoice(const char* op, const char* what, std::string_view text,
                       std::initializer_list<std::pair<std::string_view, T>> choices, T* out) {
  for (const auto& [name, value] : choices) {
    if (name != text) continue;
    *out = value;
    return ffi::Error::Success();
  }
  return InvalidArgument(op, std::string("unknown ") + what + " '" + std::string(text) + "'");
}

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

// Whether any of a call's buffers is empty (cuDNN takes no zero-sized tensor).
inline bool AnyEmpty(std::initializer_list<ffi::AnyBuffer> buffers) {
  for (const ffi::AnyBuffer& buffer : buffers)
    if (HasZeroSize(buffer.dimensions())) return true;
  return false;
}

}  // namespace jaxdnn
