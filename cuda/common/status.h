// CUDA and cuDNN status codes -> xla::ffi::Error, and the guard that keeps C++ exceptions
// from crossing the FFI boundary (a C ABI: an exception there aborts the process).
#pragma once

#include <cuda_runtime_api.h>
#include <cudnn.h>

#include <exception>
#include <string>
#include <type_traits>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jaxdnn {

namespace ffi = xla::ffi;

// "CUDNN_STATUS_BAD_PARAM: <cuDNN's own explanation of the last failure>".
std::string CudnnStatusMessage(cudnnStatus_t status);

// The function name of a stringified call expression: "cudnnCreate(&h)" -> "cudnnCreate".
inline std::string CallName(const char* call) {
  std::string name(call);
  return name.substr(0, name.find('('));
}

inline ffi::Error CudnnError(const char* op, const char* call, cudnnStatus_t status) {
  return ffi::Error(ffi::ErrorCode::kInternal, std::string("jaxdnn ") + op + ": " + CallName(call) +
                                                   " failed: " + CudnnStatusMessage(status));
}

inline ffi::Error CudaError(const char* op, const char* call, cudaError_t status) {
  return ffi::Error(ffi::ErrorCode::kInternal, std::string("jaxdnn ") + op + ": " + CallName(call) +
                                                   " failed: " + cudaGetErrorName(status) + ": " +
                                                   cudaGetErrorString(status));
}

inline ffi::Error InvalidArgument(const char* op, const std::string& message) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, std::string("jaxdnn ") + op + ": " + message);
}

// An error on its way out of a function returning ffi::Error or ffi::ErrorOr<T>.
struct Failure {
  ffi::Error error;
  operator ffi::Error() && { return std::move(error); }  // NOLINT: implicit by design
  template <typename T>
  operator ffi::ErrorOr<T>() && {  // NOLINT
    return ffi::Unexpected(std::move(error));
  }
};

// Runs `body` (returning ffi::Error or ffi::ErrorOr<T>) and turns any exception it throws
// (std::bad_alloc from a cache insertion, say) into an error naming the op.
template <typename Body>
auto Guarded(const char* op, Body&& body) noexcept -> decltype(body()) {
  using Result = decltype(body());
  auto failure = [op](const char* what) -> Result {
    ffi::Error error = ffi::Error::Internal(std::string("jaxdnn ") + op + ": " + what);
    if constexpr (std::is_same_v<Result, ffi::Error>) {
      return error;
    } else {
      return ffi::Unexpected(std::move(error));
    }
  };
  try {
    return body();
  } catch (const std::exception& e) {
    return failure(e.what());
  } catch (...) {
    return failure("unknown C++ exception");
  }
}

}  // namespace jaxdnn

// The outcome of a cuDNN call as an ffi::Error naming the op and the call.
#define JAXDNN_CUDNN_CALL(op, expr)                                 \
  [&](cudnnStatus_t jaxdnn_status_) {                               \
    return jaxdnn_status_ == CUDNN_STATUS_SUCCESS                   \
               ? ::xla::ffi::Error::Success()                       \
               : ::jaxdnn::CudnnError((op), #expr, jaxdnn_status_); \
  }(expr)

// Early-return the error of a failed cuDNN / CUDA call, naming the op and the call.
#define JAXDNN_RETURN_IF_CUDNN_ERROR(op, expr)                  \
  do {                                                          \
    cudnnStatus_t jaxdnn_status_ = (expr);                      \
    if (jaxdnn_status_ != CUDNN_STATUS_SUCCESS)                 \
      return ::jaxdnn::CudnnError((op), #expr, jaxdnn_status_); \
  } while (0)

#define JAXDNN_RETURN_IF_CUDA_ERROR(op, expr)                                                   \
  do {                                                                                          \
    cudaError_t jaxdnn_status_ = (expr);                                                        \
    if (jaxdnn_status_ != cudaSuccess) return ::jaxdnn::CudaError((op), #expr, jaxdnn_status_); \
  } while (0)

#define JAXDNN_RETURN_IF_ERROR(expr)                   \
  do {                                                 \
    ::xla::ffi::Error jaxdnn_error_ = (expr);          \
    if (jaxdnn_error_.failure()) return jaxdnn_error_; \
  } while (0)

// `lhs = value of expr` (an ffi::ErrorOr), or early-return its error (from a function that
// returns ffi::Error or any ffi::ErrorOr).
#define JAXDNN_CONCAT_(a, b) a##b
#define JAXDNN_CONCAT(a, b) JAXDNN_CONCAT_(a, b)
#define JAXDNN_ASSIGN_OR_RETURN(lhs, expr) \
  JAXDNN_ASSIGN_OR_RETURN_(JAXDNN_CONCAT(jaxdnn_or_, __LINE__), lhs, expr)
#define JAXDNN_ASSIGN_OR_RETURN_(result, lhs, expr)                            \
  auto result = (expr);                                                        \
  if (result.has_error()) return ::jaxdnn::Failure{std::move(result.error())}; \
  lhs = std::move(result.value())
