// What each op file contributes to the extension module: its targets (FFI handler bundles)
// and the State types they use, added with Registry::Add (common/staged_op.h). module.cc
// turns them into the capsules Python registers.
#pragma once

#include <string>
#include <vector>

#include "xla/ffi/api/c_api.h"

namespace nanobind {
class module_;
}

namespace jaxdnn {

struct HandlerBundle {
  std::string name;                     // FFI target name, e.g. "jaxdnn_softmax_fwd"
  XLA_FFI_Handler* instantiate;         // attributes -> per-instance State
  XLA_FFI_Handler* initialize;          // outside graph capture: handles, descriptors, plans
  XLA_FFI_Handler* execute;             // launches only
  std::vector<std::string> attributes;  // the names instantiate decodes
};

struct StateType {
  std::string name;
  XLA_FFI_TypeId* type_id;
  const XLA_FFI_TypeInfo* type_info;
};

struct Registry {
  std::vector<HandlerBundle> handlers;
  std::vector<StateType> state_types;

  template <auto parse, auto initialize, auto execute, bool kGraphSafe = true>
  void Add(const std::string& op);
};

void AddSoftmaxHandlers(Registry& registry);
void AddPoolingHandlers(Registry& registry);
void AddConvHandlers(Registry& registry);
void AddBatchNormHandlers(Registry& registry);
void AddSpatialTransformerHandlers(Registry& registry);
void AddRnnHandlers(Registry& registry);

// The RNN family's trace-time queries (rnn_temp_space_sizes, rnn_weight_params).
void AddRnnQueries(nanobind::module_& module);

}  // namespace jaxdnn
