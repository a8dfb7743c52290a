// What the ops built on cuDNN's frontend graph API share: errors, dtypes, tensors in
// either layout, and a built plan with its execution.
#pragma once

#ifdef JAXDNN_HAVE_CUDNN_FRONTEND

#include <cudnn_frontend.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
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

inline ffi::ErrorOr<fe::DataType_t> FrontendType(const char* op, ffi::DataType dtype) {
  JAXDNN_ASSIGN_OR_RETURN(FloatType type, FloatTypeOf(op, dtype));
  switch (type.cudnn) {
    case CUDNN_DATA_HALF:
      return fe::DataType_t::HALF;
    case CUDNN_DATA_BFLOAT16:
      return fe::DataType_t::BFLOAT16;
    case CUDNN_DATA_DOUBLE:
      return fe::DataType_t::DOUBLE;
    default:
      return fe::DataType_t::FLOAT;
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

// A graph's input tensor `uid`. Every tensor states its data type: left unset, the frontend
// would give it the graph's intermediate type (float32), wrong for float64 graphs.
inline std::shared_ptr<fe::graph::Tensor_attributes> GraphInput(fe::graph::Graph& graph,
                                                                int64_t uid,
                                                                const TensorShape& shape,
                                                                fe::DataType_t type) {
  return graph.tensor(fe::graph::Tensor_attributes()
                          .set_uid(uid)
                          .set_name(std::to_string(uid))
                          .set_dim(shape.dims)
                          .set_stride(shape.strides)
                          .set_data_type(type));
}

// Marks a node's result as the graph's output tensor `uid`.
inline void MarkOutput(const std::shared_ptr<fe::graph::Tensor_attributes>& tensor, int64_t uid,
                       const TensorShape& shape, fe::DataType_t type) {
  tensor->set_output(true)
      .set_uid(uid)
      .set_dim(shape.dims)
      .set_stride(shape.strides)
      .set_data_type(type);
}

// validate, build the operation graph, and create the execution plans of `modes`.
inline fe::error_t CreatePlans(fe::graph::Graph& graph, cudnnHandle_t handle,
                               const std::vector<fe::HeurMode_t>& modes) {
  fe::error_t status = graph.validate();
  if (status.is_good()) status = graph.build_operation_graph(handle);
  if (status.is_good()) status = graph.create_execution_plans(modes);
  return status;
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
