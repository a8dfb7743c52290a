// What the ops built on cuDNN's frontend graph API share: errors, dtype and layout
// mapping, and a built plan with its execution.
#pragma once

#ifdef JAXDNN_HAVE_CUDNN_FRONTEND

#include <cudnn_frontend.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "common/descriptors.h"
#include "common/status.h"

namespace jaxdnn {

namespace fe = cudnn_frontend;

inline ffi::Error FrontendError(const char* op, const char* call, fe::error_t error) {
  return ffi::Error(ffi::ErrorCode::kInternal,
                    std::string("jaxdnn ") + op + ": " + call + " failed: " + error.get_message());
}

#define JAXDNN_RETURN_IF_FE_ERROR(op, expr)                           \
  do {                                                                \
    auto jaxdnn_fe_status_ = (expr);                                  \
    if (jaxdnn_fe_status_.is_bad())                                   \
      return ::jaxdnn::FrontendError((op), #expr, jaxdnn_fe_status_); \
  } while (0)

inline ffi::Error FrontendType(const char* op, std::string_view name, fe::DataType_t* out) {
  if (name == "float16")
    *out = fe::DataType_t::HALF;
  else if (name == "bfloat16")
    *out = fe::DataType_t::BFLOAT16;
  else if (name == "float32")
    *out = fe::DataType_t::FLOAT;
  else if (name == "float64")
    *out = fe::DataType_t::DOUBLE;
  else
    return InvalidArgument(op, "unsupported dtype " + std::string(name));
  return ffi::Error::Success();
}

inline std::string_view DtypeName(ffi::DataType dtype) {
  switch (dtype) {
    case ffi::DataType::F16:
      return "float16";
    case ffi::DataType::BF16:
      return "bfloat16";
    case ffi::DataType::F32:
      return "float32";
    case ffi::DataType::F64:
      return "float64";
    default:
      return "unsupported";
  }
}

// A buffer as a cuDNN tensor: logical dims (N or K, C, spatial...) and packed strides of
// its memory layout. 1-D convolutions gain a unit spatial axis in front of their one.
struct TensorShape {
  std::vector<int64_t> dims, strides;
};

inline TensorShape ShapeOf(ffi::Span<const int64_t> buffer_dims, Layout layout) {
  std::vector<int64_t> memory(buffer_dims.begin(), buffer_dims.end());
  if (memory.size() == 3)
    memory.insert(memory.begin() + (layout == Layout::kChannelsLast ? 1 : 2), 1);
  const size_t rank = memory.size();
  // Memory order as logical axis indices: N C S... or N S... C.
  std::vector<size_t> order(rank);
  for (size_t i = 0; i < rank; ++i) order[i] = i;
  if (layout == Layout::kChannelsLast) {
    order[rank - 1] = 1;
    for (size_t i = 1; i + 1 < rank; ++i) order[i] = i + 1;
  }
  TensorShape shape{std::vector<int64_t>(rank), std::vector<int64_t>(rank)};
  for (size_t i = 0; i < rank; ++i) shape.dims[order[i]] = memory[i];
  int64_t stride = 1;
  for (size_t i = rank; i-- > 0;) {
    shape.strides[order[i]] = stride;
    stride *= memory[i];
  }
  return shape;
}

// A built execution plan, cached and shared by every call site of one configuration.
struct FrontendPlan {
  std::shared_ptr<fe::graph::Graph> graph;
  int64_t plan_index = -1;  // among the graph's heuristic candidates; -1: the frontend's choice
  int64_t workspace_size = 0;
  // The frontend prepares its variant-pack template lazily on first execute; one
  // instance may run on several streams at once.
  mutable std::mutex execute_mutex;
};

// Runs `plan` on the handle's stream: the plan at plan_index, or the frontend's candidate.
inline ffi::Error ExecutePlan(const char* op, const FrontendPlan& plan, cudnnHandle_t handle,
                              std::unordered_map<int64_t, void*>& pack, void* workspace) {
  std::lock_guard<std::mutex> lock(plan.execute_mutex);
  auto status = plan.plan_index < 0
                    ? plan.graph->execute(handle, pack, workspace)
                    : plan.graph->execute_plan_at_index(handle, pack, workspace, plan.plan_index);
  if (status.is_bad()) return FrontendError(op, "execute", status);
  return ffi::Error::Success();
}

}  // namespace jaxdnn

#endif  // JAXDNN_HAVE_CUDNN_FRONTEND
