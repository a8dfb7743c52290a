// The anatomy every jaxdnn op shares, in the stages of XLA's FFI:
//   instantiate  the call's attributes, decoded by the FFI into the op's attribute struct
//                (JAXDNN_DEFINE_ATTRS), are checked and parsed into the op's Config, kept
//                in a per-instance State;
//   initialize   (outside CUDA-graph capture) reserves a cuDNN handle for execute and, the
//                first time, prepares what execute reads (descriptors, plans), usually
//                fetched from a ProcessCache keyed by everything that shapes it;
//   execute      borrows the handle, binds it to the stream and launches: nothing else, so
//                that it is safe inside CUDA graphs and cheap per call.
// An op file defines its attributes, Config, Prepared and parse function, one initialize
// and one execute function per target, and lists its targets with Registry::Add. Neither
// stage binds the attributes again: the State holds all they say.
#pragma once

#include <cstddef>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>

#include "common/cache.h"
#include "common/handles.h"
#include "common/registry.h"

// Declares `struct jaxdnn::Name` with one member per X(type, name) entry of LIST (and
// kNames, the names, for jaxdnn's own tests) and lets the FFI decode a call's attributes
// into it by name (XLA_FFI_REGISTER_STRUCT_ATTR_DECODING), so that an attribute is one
// line of C++. Use at global scope.
#define JAXDNN_ATTR_MEMBER_(type, name) type name;
#define JAXDNN_ATTR_NAME_(type, name) #name,
#define JAXDNN_ATTR_DECODER_(type, name) , ::xla::ffi::StructMember<type>(#name)
#define JAXDNN_REGISTER_ATTRS_(...) XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(__VA_ARGS__)
#define JAXDNN_DEFINE_ATTRS(Name, LIST)                                        \
  namespace jaxdnn {                                                           \
  struct Name {                                                                \
    LIST(JAXDNN_ATTR_MEMBER_)                                                  \
    static constexpr const char* kNames[] = {LIST(JAXDNN_ATTR_NAME_) nullptr}; \
  };                                                                           \
  }                                                                            \
  JAXDNN_REGISTER_ATTRS_(::jaxdnn::Name LIST(JAXDNN_ATTR_DECODER_))

namespace jaxdnn {

// What initialize prepared, set once (later initializes keep the first) and then only read.
template <typename Prepared>
class PreparedSlot {
 public:
  void Set(std::shared_ptr<const Prepared> prepared) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!prepared_) prepared_ = std::move(prepared);
  }
  bool empty() { return get() == nullptr; }
  const Prepared* get() {
    std::lock_guard<std::mutex> lock(mutex_);
    return prepared_.get();
  }
  // Held while one initialize prepares: XLA may initialize one executable from several
  // threads at once, and preparing also sets up the state's own buffers.
  std::mutex& preparing() { return preparing_; }

 private:
  std::mutex mutex_, preparing_;
  std::shared_ptr<const Prepared> prepared_;
};

template <typename ConfigType, typename PreparedType>
struct StagedState {
  using Config = ConfigType;
  using Prepared = PreparedType;
  static ffi::TypeId id;
  Config config;
  PreparedSlot<Prepared> prepared;
};
template <typename C, typename P>
ffi::TypeId StagedState<C, P>::id = {};

// Initialize: reserves a handle for execute; the first time, `prepare(handle, &prepared)`
// makes what execute reads (leaving it null when the call has nothing to compute).
template <typename State, typename Prepare>
ffi::Error InitializeState(const char* op, cudaStream_t stream, int device, State* state,
                           Prepare&& prepare) {
  return Guarded(op, [&]() -> ffi::Error {
    JAXDNN_RETURN_IF_ERROR(ReserveCudnnHandle(op, device));
    if (!state->prepared.empty()) return ffi::Error::Success();
    std::lock_guard<std::mutex> once(state->prepared.preparing());
    if (!state->prepared.empty()) return ffi::Error::Success();  // another thread prepared
    BorrowedCudnnHandle handle(op, device, stream);
    JAXDNN_RETURN_IF_ERROR(handle.error());
    std::shared_ptr<const typename State::Prepared> prepared;
    JAXDNN_RETURN_IF_ERROR(prepare(handle.get(), &prepared));
    state->prepared.Set(std::move(prepared));
    return ffi::Error::Success();
  });
}

// Execute: borrows a handle bound to `stream` and runs `launch(handle, prepared)`.
template <typename State, typename Launch>
ffi::Error ExecuteState(const char* op, cudaStream_t stream, int device, State* state,
                        Launch&& launch) {
  return Guarded(op, [&]() -> ffi::Error {
    const auto* prepared = state->prepared.get();
    if (prepared == nullptr)
      return ffi::Error::Internal(std::string("jaxdnn ") + op +
                                  ": nothing prepared; the initialize stage did not run");
    BorrowedCudnnHandle handle(op, device, stream);
    JAXDNN_RETURN_IF_ERROR(handle.error());
    return launch(handle.get(), *prepared);
  });
}

// ---- binding stage functions to FFI handlers ----------------------------------------------

// A stage function is ffi::Error(cudaStream_t, int device, State*, operands..., results...)
// with ffi::AnyBuffer operands and ffi::Result<ffi::AnyBuffer> results.
template <typename Fn>
struct StageSignature;
template <typename StateType, typename... Buffers>
struct StageSignature<ffi::Error (*)(cudaStream_t, int, StateType*, Buffers...)> {
  using State = StateType;
  static constexpr size_t kResults =
      (size_t{std::is_same_v<Buffers, ffi::Result<ffi::AnyBuffer>>} + ... + 0);
  static constexpr size_t kOperands = sizeof...(Buffers) - kResults;
};

// A parse function is ffi::Error(const Attrs&, Config*).
template <typename Fn>
struct ParseSignature;
template <typename AttrsType, typename Config>
struct ParseSignature<ffi::Error (*)(const AttrsType&, Config*)> {
  using Attrs = AttrsType;
};

// Appends kOperands buffer operands, then kResults (>= 1) buffer results. (Bindings cannot
// be copied or moved, so each step works on the temporary the previous one returned.)
template <size_t kOperands, size_t kResults, typename Binding>
auto WithBuffers(Binding&& binding) {
  if constexpr (kOperands > 0) {
    return WithBuffers<kOperands - 1, kResults>(std::move(binding).template Arg<ffi::AnyBuffer>());
  } else if constexpr (kResults > 1) {
    return WithBuffers<0, kResults - 1>(std::move(binding).template Ret<ffi::AnyBuffer>());
  } else {
    return std::move(binding).template Ret<ffi::AnyBuffer>();
  }
}

// The binding of stage function `fn`: stream, device ordinal, State, buffers.
template <auto fn, ffi::ExecutionStage stage>
auto StageBinding() {
  using Signature = StageSignature<decltype(fn)>;
  return WithBuffers<Signature::kOperands, Signature::kResults>(
      ffi::Ffi::Bind<stage>()
          .template Ctx<ffi::PlatformStream<cudaStream_t>>()
          .template Ctx<ffi::DeviceOrdinal>()
          .template Ctx<ffi::State<typename Signature::State>>());
}

template <auto fn, ffi::ExecutionStage stage, bool kGraphSafe>
XLA_FFI_Error* StageHandler(XLA_FFI_CallFrame* call_frame) {
  static auto* handler = [] {
    if constexpr (kGraphSafe) {
      return StageBinding<fn, stage>().To(fn, {ffi::Traits::kCmdBufferCompatible}).release();
    } else {
      return StageBinding<fn, stage>().To(fn).release();
    }
  }();
  return handler->Call(call_frame);
}

template <typename State, auto parse>
ffi::ErrorOr<std::unique_ptr<State>> Instantiate(
    typename ParseSignature<decltype(parse)>::Attrs attrs) {
  return Guarded("instantiate", [&]() -> ffi::ErrorOr<std::unique_ptr<State>> {
    auto state = std::make_unique<State>();
    ffi::Error error = parse(attrs, &state->config);
    if (error.failure()) return ffi::Unexpected(std::move(error));
    return state;
  });
}

template <typename State, auto parse>
XLA_FFI_Error* InstantiateHandler(XLA_FFI_CallFrame* call_frame) {
  using Attrs = typename ParseSignature<decltype(parse)>::Attrs;
  static auto* handler =
      ffi::Ffi::BindInstantiate().template Attrs<Attrs>().To(Instantiate<State, parse>).release();
  return handler->Call(call_frame);
}

template <typename State>
const XLA_FFI_TypeInfo* TypeInfoOf() {
  static const XLA_FFI_TypeInfo info = ffi::MakeTypeInfo<State>();
  return &info;
}

// The target "jaxdnn_" + `op` (`op` also names it in its errors): `parse` makes the Config
// of initialize's State from the attributes. kGraphSafe: execute may be captured in a CUDA
// graph (XLA's command buffers).
template <auto parse, auto initialize, auto execute, bool kGraphSafe>
void Registry::Add(const std::string& op) {
  const std::string name = "jaxdnn_" + op;
  using State = typename StageSignature<decltype(initialize)>::State;
  static_assert(std::is_same_v<State, typename StageSignature<decltype(execute)>::State>);
  using Attrs = typename ParseSignature<decltype(parse)>::Attrs;
  std::vector<std::string> attributes;
  for (const char* const* attribute = Attrs::kNames; *attribute != nullptr; ++attribute)
    attributes.push_back(*attribute);
  handlers.push_back({name, InstantiateHandler<State, parse>,
                      StageHandler<initialize, ffi::ExecutionStage::kInitialize, false>,
                      StageHandler<execute, ffi::ExecutionStage::kExecute, kGraphSafe>,
                      std::move(attributes)});
  for (const StateType& known : state_types)
    if (known.type_id == &State::id) return;
  state_types.push_back({name + "_state", &State::id, TypeInfoOf<State>()});
}

}  // namespace jaxdnn
