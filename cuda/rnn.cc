// Recurrent networks through cuDNN's RNN v8 API: cudnnRNNForward, cudnnRNNBackwardData_v8
// and cudnnRNNBackwardWeights_v8 (rnn_relu, rnn_tanh, lstm, gru; linear or skip input; uni-
// or bidirectional; any depth; CUDNN_RNN_DOUBLE_BIAS, no projection, no dropout).
//
// FFI targets (jaxdnn/rnn.py's docstring is the contract; every floating buffer of one call
// has one dtype, float16, bfloat16, float32 or float64; each target has a trailing u8
// workspace result sized in Python by rnn_temp_space_sizes):
//   jaxdnn_rnn_fwd          x, hx, cx, w, seq_lengths                    -> y, hy, cy, reserve
//   jaxdnn_rnn_bwd_data     x, hx, cx, w, seq_lengths, y, dy, dhy, dcy, reserve
//                                                                         -> dx, dhx, dcx, reserve
//   jaxdnn_rnn_bwd_weights  (the same operands)                           -> dw
// and the same three with the suffix _host_lengths, for variable lengths (below).
// x, y, dx, dy are sequence-major (T, N, features), CUDNN_RNN_DATA_LAYOUT_SEQ_MAJOR_UNPACKED;
// hx, cx and their kin (layers * directions, N, hidden); cx and its kin are (.., N, 0) for
// cells without a cell state. seq_lengths is int32 (N,) on the device.
// Attributes: mode, input_mode, algo (strings); hidden_size, num_layers, bidirectional,
// variable_lengths, allow_tf32 (int64); static_lengths (int32[N] or empty); and, for
// rnn_fwd, training (int64).
//
// Sequence lengths. cudnnSetRNNDataDescriptor takes the lengths on the host and the calls
// take a device copy (devSeqLengths); cuDNN plans each call from the host lengths (measured
// on an H200: with host lengths all T and shorter device lengths, the backward direction
// starts at T and outputs past the ends are written). So there are two kinds of target:
//   jaxdnn_rnn_*                every length T (no lengths given): the data descriptors
//                               are built once, at initialize; execute only launches, and
//                               is safe inside CUDA graphs (tested).
//   jaxdnn_rnn_*_host_lengths   variable lengths. Known at trace time (static_lengths, the
//                               values of the seq_lengths operand), they shape descriptors
//                               built once at initialize and execute only launches; known
//                               only to the device, execute copies them to pinned host
//                               memory, synchronizes the stream, checks them (each in
//                               [1, T]) and sets the state's own data descriptors to
//                               them (host calls only). Neither is declared command-
//                               buffer compatible: the sync cannot run inside a capture,
//                               and cuDNN's variable-length calls failed inside CUDA
//                               graphs on an H200 even with static lengths.
//
// Trace time: rnn_temp_space_sizes (workspace and reserve bytes) and rnn_weight_params
// (cudnnGetRNNWeightParams's layout, which the GPU tests compare with jaxdnn/rnn.py's)
// build the same descriptors, on the current device, through the same cache.
#include "rnn.h"

#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "common/cache.h"
#include "common/descriptors.h"
#include "common/handles.h"
#include "common/legacy_op.h"
#include "common/registry.h"
#include "common/status.h"

namespace jaxdnn {
namespace {

constexpr char kFwd[] = "rnn_fwd";
constexpr char kBwdData[] = "rnn_bwd_data";
constexpr char kBwdWeights[] = "rnn_bwd_weights";
constexpr char kQuery[] = "rnn_temp_space_sizes";

using RnnDescriptor = Descriptor<cudnnRNNDescriptor_t, cudnnDestroyRNNDescriptor>;
using RnnDataDescriptor = Descriptor<cudnnRNNDataDescriptor_t, cudnnDestroyRNNDataDescriptor>;
using DropoutDescriptor = Descriptor<cudnnDropoutDescriptor_t, cudnnDestroyDropoutDescriptor>;
using Str = std::string_view;

// What cudnnSetRNNDescriptor_v8 takes apart from the data type and the input size.
struct RnnConfig {
  cudnnRNNMode_t cell = CUDNN_LSTM;
  cudnnRNNInputMode_t input_mode = CUDNN_LINEAR_INPUT;
  cudnnRNNAlgo_t algo = CUDNN_RNN_ALGO_STANDARD;
  int hidden_size = 0;
  int num_layers = 0;
  bool bidirectional = false;
  bool allow_tf32 = true;
};

// One call's data: its type and the sizes of x.
struct RnnShape {
  cudnnDataType_t type = CUDNN_DATA_FLOAT;
  int steps = 0, batch = 0, input_size = 0;
  std::vector<int> lengths;  // of each sequence; empty: every one `steps` long
};

// Everything a call needs, built once per (device, config, shape) and then only read.
struct RnnDescriptors {
  RnnConfig config;  // what they were built for
  RnnShape shape;
  DropoutDescriptor dropout;  // dropout 0: cuDNN wants a descriptor all the same
  RnnDescriptor rnn;
  RnnDataDescriptor x, y;  // x and dx; y and dy
  TensorDescriptor state;  // hx, hy, cx, cy and their gradients
  size_t weight_bytes = 0;
  size_t inference_workspace_bytes = 0;
  size_t training_workspace_bytes = 0;
  size_t reserve_bytes = 0;  // of a training forward
};

KeyedCache<RnnDescriptors>& DescriptorCache() {
  static auto* cache = new KeyedCache<RnnDescriptors>();
  return *cache;
}

ffi::Error ParseConfig(const char* op, Str mode, Str input_mode, Str algo, int64_t hidden_size,
                       int64_t num_layers, int64_t bidirectional, int64_t allow_tf32,
                       RnnConfig* c) {
  if (mode == "rnn_relu")
    c->cell = CUDNN_RNN_RELU;
  else if (mode == "rnn_tanh")
    c->cell = CUDNN_RNN_TANH;
  else if (mode == "lstm")
    c->cell = CUDNN_LSTM;
  else if (mode == "gru")
    c->cell = CUDNN_GRU;
  else
    return InvalidArgument(op, "unknown mode '" + std::string(mode) + "'");
  if (input_mode == "linear")
    c->input_mode = CUDNN_LINEAR_INPUT;
  else if (input_mode == "skip")
    c->input_mode = CUDNN_SKIP_INPUT;
  else
    return InvalidArgument(op, "unknown input_mode '" + std::string(input_mode) + "'");
  if (algo == "standard")
    c->algo = CUDNN_RNN_ALGO_STANDARD;
  else if (algo == "persist_static")
    c->algo = CUDNN_RNN_ALGO_PERSIST_STATIC;
  else if (algo == "persist_static_small_h")
    c->algo = CUDNN_RNN_ALGO_PERSIST_STATIC_SMALL_H;
  else if (algo == "persist_dynamic")
    c->algo = CUDNN_RNN_ALGO_PERSIST_DYNAMIC;
  else
    return InvalidArgument(op, "unknown algo '" + std::string(algo) + "'");
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  if (hidden_size < 1 || hidden_size > kIntMax || num_layers < 1 || num_layers > kIntMax)
    return InvalidArgument(op, "hidden_size and num_layers must be positive ints");
  c->hidden_size = static_cast<int>(hidden_size);
  c->num_layers = static_cast<int>(num_layers);
  c->bidirectional = bidirectional != 0;
  c->allow_tf32 = allow_tf32 != 0;
  return ffi::Error::Success();
}

int Directions(const RnnConfig& c) { return c.bidirectional ? 2 : 1; }

// Half and bfloat16 data run on tensor cores with float32 math; float32 may use TF32
// tensor cores (CUDNN_DEFAULT_MATH) unless allow_tf32 forbids it (CUDNN_FMA_MATH);
// float64 runs in float64.
void MathFor(const RnnConfig& c, cudnnDataType_t type, cudnnDataType_t* precision,
             cudnnMathType_t* math) {
  switch (type) {
    case CUDNN_DATA_HALF:
    case CUDNN_DATA_BFLOAT16:
      *precision = CUDNN_DATA_FLOAT;
      *math = CUDNN_TENSOR_OP_MATH;
      break;
    case CUDNN_DATA_DOUBLE:
      *precision = CUDNN_DATA_DOUBLE;
      *math = CUDNN_DEFAULT_MATH;
      break;
    default:
      *precision = CUDNN_DATA_FLOAT;
      *math = c.allow_tf32 ? CUDNN_DEFAULT_MATH : CUDNN_FMA_MATH;
  }
}

ffi::Error BuildDescriptors(const char* op, cudnnHandle_t handle, const RnnConfig& c,
                            const RnnShape& s, RnnDescriptors* d) {
  d->config = c;
  d->shape = s;
  JAXDNN_RETURN_IF_ERROR(CreateDescriptor(op, cudnnCreateDropoutDescriptor, &d->dropout));
  // Dropout 0 needs no random states (PyTorch's set_no_dropout does the same).
  JAXDNN_RETURN_IF_CUDNN_ERROR(
      op, cudnnSetDropoutDescriptor(d->dropout.get(), handle, 0.0f, nullptr, 0, 0));
  JAXDNN_RETURN_IF_ERROR(CreateDescriptor(op, cudnnCreateRNNDescriptor, &d->rnn));
  cudnnDataType_t precision;
  cudnnMathType_t math;
  MathFor(c, s.type, &precision, &math);
  JAXDNN_RETURN_IF_CUDNN_ERROR(
      op, cudnnSetRNNDescriptor_v8(d->rnn.get(), c.algo, c.cell, CUDNN_RNN_DOUBLE_BIAS,
                                   c.bidirectional ? CUDNN_BIDIRECTIONAL : CUDNN_UNIDIRECTIONAL,
                                   c.input_mode, s.type, precision, math, s.input_size,
                                   c.hidden_size, /*projSize=*/c.hidden_size, c.num_layers,
                                   d->dropout.get(), CUDNN_RNN_PADDED_IO_ENABLED));
  if (c.algo == CUDNN_RNN_ALGO_PERSIST_DYNAMIC)  // compiles kernels for this batch size
    JAXDNN_RETURN_IF_CUDNN_ERROR(op, cudnnBuildRNNDynamic(handle, d->rnn.get(), s.batch));

  // The lengths the descriptors describe (see the top of the file); zero written past
  // each end.
  std::vector<int> lengths = s.lengths.empty() ? std::vector<int>(s.batch, s.steps) : s.lengths;
  double zero = 0.0;  // paddingFill is read in the data's type: zero bytes are zero in all
  JAXDNN_RETURN_IF_ERROR(CreateDescriptor(op, cudnnCreateRNNDataDescriptor, &d->x));
  JAXDNN_RETURN_IF_CUDNN_ERROR(
      op, cudnnSetRNNDataDescriptor(d->x.get(), s.type, CUDNN_RNN_DATA_LAYOUT_SEQ_MAJOR_UNPACKED,
                                    s.steps, s.batch, s.input_size, lengths.data(), &zero));
  JAXDNN_RETURN_IF_ERROR(CreateDescriptor(op, cudnnCreateRNNDataDescriptor, &d->y));
  JAXDNN_RETURN_IF_CUDNN_ERROR(
      op, cudnnSetRNNDataDescriptor(d->y.get(), s.type, CUDNN_RNN_DATA_LAYOUT_SEQ_MAJOR_UNPACKED,
                                    s.steps, s.batch, Directions(c) * c.hidden_size, lengths.data(),
                                    &zero));
  JAXDNN_RETURN_IF_ERROR(CreateDescriptor(op, cudnnCreateTensorDescriptor, &d->state));
  const int dims[3] = {c.num_layers * Directions(c), s.batch, c.hidden_size};
  const int strides[3] = {s.batch * c.hidden_size, c.hidden_size, 1};
  JAXDNN_RETURN_IF_CUDNN_ERROR(
      op, cudnnSetTensorNdDescriptor(d->state.get(), s.type, 3, dims, strides));

  JAXDNN_RETURN_IF_CUDNN_ERROR(op,
                               cudnnGetRNNWeightSpaceSize(handle, d->rnn.get(), &d->weight_bytes));
  size_t unused_reserve = 0;
  JAXDNN_RETURN_IF_CUDNN_ERROR(
      op, cudnnGetRNNTempSpaceSizes(handle, d->rnn.get(), CUDNN_FWD_MODE_INFERENCE, d->x.get(),
                                    &d->inference_workspace_bytes, &unused_reserve));
  JAXDNN_RETURN_IF_CUDNN_ERROR(
      op, cudnnGetRNNTempSpaceSizes(handle, d->rnn.get(), CUDNN_FWD_MODE_TRAINING, d->x.get(),
                                    &d->training_workspace_bytes, &d->reserve_bytes));
  return ffi::Error::Success();
}

// The cached descriptors of (device, config, shape), built with `handle` on a miss.
ffi::Error CachedDescriptors(const char* op, cudnnHandle_t handle, int device, const RnnConfig& c,
                             const RnnShape& s, std::shared_ptr<const RnnDescriptors>* out) {
  CacheKey key;
  key.Add(device)
      .Add(static_cast<int64_t>(s.type))
      .Add(static_cast<int64_t>(c.cell))
      .Add(static_cast<int64_t>(c.input_mode))
      .Add(static_cast<int64_t>(c.algo))
      .Add(c.hidden_size)
      .Add(c.num_layers)
      .Add(static_cast<int64_t>(c.bidirectional))
      .Add(static_cast<int64_t>(c.allow_tf32))
      .Add(s.steps)
      .Add(s.batch)
      .Add(s.input_size)
      .AddAll(s.lengths);
  return DescriptorCache().GetOrBuild(
      key, [&](RnnDescriptors* d) { return BuildDescriptors(op, handle, c, s, d); }, out);
}

ffi::Error DataTypeNamed(const char* op, Str name, cudnnDataType_t* type) {
  if (name == "float16")
    *type = CUDNN_DATA_HALF;
  else if (name == "bfloat16")
    *type = CUDNN_DATA_BFLOAT16;
  else if (name == "float32")
    *type = CUDNN_DATA_FLOAT;
  else if (name == "float64")
    *type = CUDNN_DATA_DOUBLE;
  else
    return InvalidArgument(op, "unsupported dtype '" + std::string(name) + "'");
  return ffi::Error::Success();
}

size_t ElementBytes(cudnnDataType_t type) {
  return type == CUDNN_DATA_DOUBLE ? 8 : type == CUDNN_DATA_FLOAT ? 4 : 2;
}

// Every length in [1, steps]: cuDNN's variable-length calls take no other.
ffi::Error CheckLengths(const char* op, const int32_t* lengths, size_t count, int steps) {
  for (size_t n = 0; n < count; ++n)
    if (lengths[n] < 1 || lengths[n] > steps)
      return InvalidArgument(op, "seq_lengths[" + std::to_string(n) +
                                     "] = " + std::to_string(lengths[n]) + " is outside [1, " +
                                     std::to_string(steps) + "]");
  return ffi::Error::Success();
}

// ---- the handlers -------------------------------------------------------------------------

// Pinned host memory for the lengths of the host-lengths targets, freed with the state.
struct PinnedLengths {
  int32_t* data = nullptr;
  size_t size = 0;
  ~PinnedLengths() {
    if (data != nullptr) cudaFreeHost(data);
  }
};

struct RnnState {
  static ffi::TypeId id;
  RnnConfig config;
  bool training = true;                 // rnn_fwd: cuDNN's training mode (writes the reserve space)
  bool host_lengths = false;            // a *_host_lengths target
  std::vector<int32_t> static_lengths;  // known at trace time (empty: all T, or dynamic)
  DescriptorSlot<RnnDescriptors> descriptors;
  PinnedLengths lengths;  // dynamic lengths: allocated at initialize (N entries)
  // Dynamic lengths: x's and y's data descriptors, created at initialize and set to each
  // call's lengths (cuDNN reads them on the host during the call, which returns before
  // the next call of this state re-sets them).
  RnnDataDescriptor call_x, call_y;

  // Lengths only the device knows: copied to the host at every execute.
  bool dynamic_lengths() const { return host_lengths && static_lengths.empty(); }
};
ffi::TypeId RnnState::id = {};
const XLA_FFI_TypeInfo kRnnStateInfo = ffi::MakeTypeInfo<RnnState>();

using Buffer = ffi::AnyBuffer;
using Out = ffi::Result<ffi::AnyBuffer>;
using Int32s = ffi::Span<const int32_t>;

template <typename Binding>
auto WithConfigAttributes(Binding&& binding) {
  return std::move(binding)
      .template Attr<Str>("mode")
      .template Attr<Str>("input_mode")
      .template Attr<Str>("algo")
      .template Attr<int64_t>("hidden_size")
      .template Attr<int64_t>("num_layers")
      .template Attr<int64_t>("bidirectional")
      .template Attr<int64_t>("variable_lengths")
      .template Attr<int64_t>("allow_tf32")
      .template Attr<Int32s>("static_lengths");
}

template <bool kForward, typename Binding>
auto WithAttributes(Binding&& binding) {
  if constexpr (kForward) {
    return WithConfigAttributes(std::move(binding)).template Attr<int64_t>("training");
  } else {
    return WithConfigAttributes(std::move(binding));
  }
}

ffi::ErrorOr<std::unique_ptr<RnnState>> Instantiate(const char* op, bool host_lengths, Str mode,
                                                    Str input_mode, Str algo, int64_t hidden_size,
                                                    int64_t num_layers, int64_t bidirectional,
                                                    int64_t variable_lengths, int64_t allow_tf32,
                                                    Int32s static_lengths, int64_t training) {
  return Guarded(op, [&]() -> ffi::ErrorOr<std::unique_ptr<RnnState>> {
    auto state = std::make_unique<RnnState>();
    ffi::Error error = ParseConfig(op, mode, input_mode, algo, hidden_size, num_layers,
                                   bidirectional, allow_tf32, &state->config);
    if (error.failure()) return ffi::Unexpected(std::move(error));
    // Lengths other than T need the host-lengths targets (see the top of the file).
    if ((variable_lengths != 0) != host_lengths)
      return ffi::Unexpected(InvalidArgument(
          op, "variable_lengths=1 goes with the *_host_lengths targets, and only it"));
    if (static_lengths.size() != 0 && variable_lengths == 0)
      return ffi::Unexpected(InvalidArgument(op, "static_lengths need variable_lengths=1"));
    state->static_lengths.assign(static_lengths.begin(), static_lengths.end());
    state->host_lengths = host_lengths;
    state->training = training != 0;
    return state;
  });
}

template <bool kHostLengths>
ffi::ErrorOr<std::unique_ptr<RnnState>> InstantiateFwd(Str mode, Str input_mode, Str algo,
                                                       int64_t hidden_size, int64_t num_layers,
                                                       int64_t bidirectional,
                                                       int64_t variable_lengths, int64_t allow_tf32,
                                                       Int32s static_lengths, int64_t training) {
  return Instantiate(kFwd, kHostLengths, mode, input_mode, algo, hidden_size, num_layers,
                     bidirectional, variable_lengths, allow_tf32, static_lengths, training);
}

template <const char* kOp, bool kHostLengths>
ffi::ErrorOr<std::unique_ptr<RnnState>> InstantiateBwd(Str mode, Str input_mode, Str algo,
                                                       int64_t hidden_size, int64_t num_layers,
                                                       int64_t bidirectional,
                                                       int64_t variable_lengths, int64_t allow_tf32,
                                                       Int32s static_lengths) {
  return Instantiate(kOp, kHostLengths, mode, input_mode, algo, hidden_size, num_layers,
                     bidirectional, variable_lengths, allow_tf32, static_lengths,
                     /*training=*/1);
}

bool HasDims(const Buffer& buffer, std::initializer_list<int64_t> dims) {
  return buffer.dimensions() == ffi::Span<const int64_t>(dims.begin(), dims.size());
}

// The operands every target shares, checked against each other and the configuration.
struct CallOperands {
  Buffer x, hx, cx, w, seq_lengths;
};

ffi::Error CheckOperands(const char* op, const RnnConfig& c, const CallOperands& in,
                         RnnShape* shape) {
  ffi::Span<const int64_t> x = in.x.dimensions();
  if (x.size() != 3) return InvalidArgument(op, "x must be 3-D (T, N, input_size)");
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  for (int64_t d : x)
    if (d < 1 || d > kIntMax) return InvalidArgument(op, "x's dims must lie in [1, INT_MAX]");
  JAXDNN_RETURN_IF_ERROR(CudnnDataType(op, in.x.element_type(), &shape->type));
  for (const Buffer* b : {&in.hx, &in.cx, &in.w})
    if (b->element_type() != in.x.element_type())
      return InvalidArgument(op, "x, hx, cx and w must share one dtype");
  const int64_t states = c.num_layers * Directions(c);
  if (!HasDims(in.hx, {states, x[1], c.hidden_size}))
    return InvalidArgument(op, "hx must have shape (num_layers * directions, N, hidden_size)");
  const int64_t cell_size = c.cell == CUDNN_LSTM ? c.hidden_size : 0;
  if (!HasDims(in.cx, {states, x[1], cell_size}))
    return InvalidArgument(op,
                           "cx must have shape (num_layers * directions, N, hidden_size) "
                           "for lstm and (num_layers * directions, N, 0) otherwise");
  if (in.seq_lengths.element_type() != ffi::DataType::S32 || !HasDims(in.seq_lengths, {x[1]}))
    return InvalidArgument(op, "seq_lengths must be int32 of shape (N,)");
  shape->steps = static_cast<int>(x[0]);
  shape->batch = static_cast<int>(x[1]);
  shape->input_size = static_cast<int>(x[2]);
  return ffi::Error::Success();
}

// Checks a buffer's byte size against what cuDNN asked for.
ffi::Error CheckBytes(const char* op, const char* what, const Buffer& buffer, size_t needed,
                      bool exact) {
  size_t have = buffer.size_bytes();
  if (exact ? have == needed : have >= needed) return ffi::Error::Success();
  return InvalidArgument(op, std::string(what) + " holds " + std::to_string(have) +
                                 " bytes where cuDNN needs " + std::to_string(needed));
}

// Reserves a handle and fetches the descriptors for this call's operands, checking every
// buffer the call passes to cuDNN: y-like buffers of (T, N, directions * hidden), hx-like
// buffers of hx's shape, cx-like buffers of cx's, and the weight, workspace and reserve
// bytes against cuDNN's sizes.
struct ExtraBuffers {
  std::vector<const Buffer*> y_like, h_like, c_like;
  const Buffer* weights = nullptr;  // w (always) and dw
  const Buffer* workspace = nullptr;
  const Buffer* reserve = nullptr;  // the reserve the call reads or writes, if any
  bool training = true;
};

ffi::Error Initialize(const char* op, cudaStream_t stream, int device, RnnState* state,
                      const CallOperands& in, const ExtraBuffers& extra) {
  return Guarded(op, [&]() -> ffi::Error {
    JAXDNN_RETURN_IF_ERROR(ReserveCudnnHandle(op, device));
    if (!state->descriptors.empty()) return ffi::Error::Success();
    const RnnConfig& c = state->config;
    RnnShape shape;
    JAXDNN_RETURN_IF_ERROR(CheckOperands(op, c, in, &shape));
    const int64_t steps = shape.steps, batch = shape.batch;
    if (!state->static_lengths.empty()) {
      if (state->static_lengths.size() != static_cast<size_t>(batch))
        return InvalidArgument(op, "static_lengths must hold one length per sequence (N)");
      JAXDNN_RETURN_IF_ERROR(CheckLengths(op, state->static_lengths.data(),
                                          state->static_lengths.size(), shape.steps));
      shape.lengths.assign(state->static_lengths.begin(), state->static_lengths.end());
    }
    for (const Buffer* b : extra.y_like)
      if (b->element_type() != in.x.element_type() ||
          !HasDims(*b, {steps, batch, Directions(c) * c.hidden_size}))
        return InvalidArgument(op,
                               "y and dy must have shape (T, N, directions * hidden_size) "
                               "and x's dtype");
    for (const Buffer* b : extra.h_like)
      if (b->element_type() != in.x.element_type() || !(b->dimensions() == in.hx.dimensions()))
        return InvalidArgument(op, "hy, dhy and dhx must have hx's shape and dtype");
    for (const Buffer* b : extra.c_like)
      if (b->element_type() != in.x.element_type() || !(b->dimensions() == in.cx.dimensions()))
        return InvalidArgument(op, "cy, dcy and dcx must have cx's shape and dtype");

    BorrowedCudnnHandle handle(op, device, stream);
    JAXDNN_RETURN_IF_ERROR(handle.error());
    std::shared_ptr<const RnnDescriptors> d;
    JAXDNN_RETURN_IF_ERROR(CachedDescriptors(op, handle.get(), device, c, shape, &d));
    JAXDNN_RETURN_IF_ERROR(CheckBytes(op, "w", in.w, d->weight_bytes, true));
    if (extra.weights != nullptr)
      JAXDNN_RETURN_IF_ERROR(CheckBytes(op, "dw", *extra.weights, d->weight_bytes, true));
    JAXDNN_RETURN_IF_ERROR(CheckBytes(
        op, "the workspace", *extra.workspace,
        extra.training ? d->training_workspace_bytes : d->inference_workspace_bytes, false));
    // Python sizes the reserve for full-length sequences: at least what these lengths need.
    if (extra.reserve != nullptr)
      JAXDNN_RETURN_IF_ERROR(CheckBytes(op, "the reserve space", *extra.reserve,
                                        extra.training ? d->reserve_bytes : 0, false));
    if (state->dynamic_lengths() && state->lengths.data == nullptr) {
      void* pinned = nullptr;
      JAXDNN_RETURN_IF_CUDA_ERROR(op, cudaMallocHost(&pinned, sizeof(int32_t) * shape.batch));
      state->lengths.data = static_cast<int32_t*>(pinned);
      state->lengths.size = static_cast<size_t>(shape.batch);
      JAXDNN_RETURN_IF_ERROR(CreateDescriptor(op, cudnnCreateRNNDataDescriptor, &state->call_x));
      JAXDNN_RETURN_IF_ERROR(CreateDescriptor(op, cudnnCreateRNNDataDescriptor, &state->call_y));
    }
    state->descriptors.Set(std::move(d));
    return ffi::Error::Success();
  });
}

// The data descriptors of one call: the shared ones, or for dynamic lengths the state's
// own, set to this call's lengths.
struct CallData {
  cudnnRNNDataDescriptor_t x = nullptr, y = nullptr;
};

ffi::Error HostLengthsData(const char* op, cudaStream_t stream, RnnState* state,
                           const RnnDescriptors& d, const Buffer& seq_lengths, CallData* call) {
  const RnnShape& s = d.shape;
  if (state->lengths.data == nullptr || state->lengths.size != static_cast<size_t>(s.batch) ||
      state->call_x.get() == nullptr || state->call_y.get() == nullptr)
    return ffi::Error::Internal(std::string("jaxdnn ") + op + ": host lengths buffers missing");
  // The one synchronization of these targets: cuDNN plans the call from host lengths.
  JAXDNN_RETURN_IF_CUDA_ERROR(
      op, cudaMemcpyAsync(state->lengths.data, seq_lengths.untyped_data(),
                          sizeof(int32_t) * s.batch, cudaMemcpyDeviceToHost, stream));
  JAXDNN_RETURN_IF_CUDA_ERROR(op, cudaStreamSynchronize(stream));
  JAXDNN_RETURN_IF_ERROR(CheckLengths(op, state->lengths.data, state->lengths.size, s.steps));
  double zero = 0.0;
  const int output_size = Directions(d.config) * d.config.hidden_size;
  for (auto [data, size] : {std::pair{state->call_x.get(), s.input_size},
                            std::pair{state->call_y.get(), output_size}}) {
    JAXDNN_RETURN_IF_CUDNN_ERROR(
        op, cudnnSetRNNDataDescriptor(data, s.type, CUDNN_RNN_DATA_LAYOUT_SEQ_MAJOR_UNPACKED,
                                      s.steps, s.batch, size, state->lengths.data, &zero));
  }
  call->x = state->call_x.get();
  call->y = state->call_y.get();
  return ffi::Error::Success();
}

// Borrows a handle and runs `launch(handle, descriptors, data descriptors)`.
template <typename Launch>
ffi::Error Execute(const char* op, cudaStream_t stream, int device, RnnState* state,
                   const Buffer& seq_lengths, Launch launch) {
  return Guarded(op, [&]() -> ffi::Error {
    const RnnDescriptors* d;
    JAXDNN_RETURN_IF_ERROR(InitializedDescriptors(op, state->descriptors, &d));
    CallData call;
    if (state->dynamic_lengths()) {
      JAXDNN_RETURN_IF_ERROR(HostLengthsData(op, stream, state, *d, seq_lengths, &call));
    } else {
      call.x = d->x.get();
      call.y = d->y.get();
    }
    BorrowedCudnnHandle handle(op, device, stream);
    JAXDNN_RETURN_IF_ERROR(handle.error());
    return launch(handle.get(), *d, call);
  });
}

// The cell state's pointer, or null for cells without one (their cx buffers are empty).
const void* CellData(const RnnState* state, const Buffer& b) {
  return state->config.cell == CUDNN_LSTM ? b.untyped_data() : nullptr;
}
void* CellData(const RnnState* state, Out& b) {
  return state->config.cell == CUDNN_LSTM ? b->untyped_data() : nullptr;
}

const int32_t* Lengths(const Buffer& seq_lengths) {
  return static_cast<const int32_t*>(seq_lengths.untyped_data());
}

// ---- jaxdnn_rnn_fwd: x, hx, cx, w, seq_lengths -> y, hy, cy, reserve (, workspace) ----

ffi::Error InitializeFwd(cudaStream_t stream, int device, RnnState* state, Buffer x, Buffer hx,
                         Buffer cx, Buffer w, Buffer seq_lengths, Out y, Out hy, Out cy,
                         Out reserve, Out workspace, Str, Str, Str, int64_t, int64_t, int64_t,
                         int64_t, int64_t, Int32s, int64_t) {
  ExtraBuffers extra{{&*y}, {&*hy}, {&*cy}, nullptr, &*workspace, &*reserve, state->training};
  return Initialize(kFwd, stream, device, state, {x, hx, cx, w, seq_lengths}, extra);
}

ffi::Error ExecuteFwd(cudaStream_t stream, int device, RnnState* state, Buffer x, Buffer hx,
                      Buffer cx, Buffer w, Buffer seq_lengths, Out y, Out hy, Out cy, Out reserve,
                      Out workspace, Str, Str, Str, int64_t, int64_t, int64_t, int64_t, int64_t,
                      Int32s, int64_t) {
  return Execute(
      kFwd, stream, device, state, seq_lengths,
      [&](cudnnHandle_t handle, const RnnDescriptors& d, const CallData& c) -> ffi::Error {
        const size_t reserve_bytes = reserve->size_bytes();
        JAXDNN_RETURN_IF_CUDNN_ERROR(
            kFwd,
            cudnnRNNForward(handle, d.rnn.get(),
                            state->training ? CUDNN_FWD_MODE_TRAINING : CUDNN_FWD_MODE_INFERENCE,
                            Lengths(seq_lengths), c.x, x.untyped_data(), c.y, y->untyped_data(),
                            d.state.get(), hx.untyped_data(), hy->untyped_data(), d.state.get(),
                            CellData(state, cx), CellData(state, cy), w.size_bytes(),
                            w.untyped_data(), workspace->size_bytes(), workspace->untyped_data(),
                            reserve_bytes, reserve_bytes > 0 ? reserve->untyped_data() : nullptr));
        return ffi::Error::Success();
      });
}

// ---- jaxdnn_rnn_bwd_data: ... -> dx, dhx, dcx, reserve (, workspace) ----

ffi::Error InitializeBwdData(cudaStream_t stream, int device, RnnState* state, Buffer x, Buffer hx,
                             Buffer cx, Buffer w, Buffer seq_lengths, Buffer y, Buffer dy,
                             Buffer dhy, Buffer dcy, Buffer reserve, Out dx, Out dhx, Out dcx,
                             Out reserve_out, Out workspace, Str, Str, Str, int64_t, int64_t,
                             int64_t, int64_t, int64_t, Int32s) {
  if (reserve_out->size_bytes() != reserve.size_bytes())
    return InvalidArgument(kBwdData, "the reserve result must have the reserve operand's size");
  if (dx->element_type() != x.element_type() || !(dx->dimensions() == x.dimensions()))
    return InvalidArgument(kBwdData, "dx must have x's shape and dtype");
  ExtraBuffers extra{{&y, &dy}, {&dhy, &*dhx}, {&dcy, &*dcx}, nullptr, &*workspace, &reserve, true};
  return Initialize(kBwdData, stream, device, state, {x, hx, cx, w, seq_lengths}, extra);
}

ffi::Error ExecuteBwdData(cudaStream_t stream, int device, RnnState* state, Buffer x, Buffer hx,
                          Buffer cx, Buffer w, Buffer seq_lengths, Buffer y, Buffer dy, Buffer dhy,
                          Buffer dcy, Buffer reserve, Out dx, Out dhx, Out dcx, Out reserve_out,
                          Out workspace, Str, Str, Str, int64_t, int64_t, int64_t, int64_t, int64_t,
                          Int32s) {
  // cuDNN reads and updates the reserve space here; the operand is XLA's and must stay as
  // it is, so the call works on the result, a copy (a capture-safe async copy).
  if (reserve_out->untyped_data() != reserve.untyped_data() && reserve.size_bytes() > 0)
    JAXDNN_RETURN_IF_CUDA_ERROR(
        kBwdData, cudaMemcpyAsync(reserve_out->untyped_data(), reserve.untyped_data(),
                                  reserve.size_bytes(), cudaMemcpyDeviceToDevice, stream));
  return Execute(
      kBwdData, stream, device, state, seq_lengths,
      [&](cudnnHandle_t handle, const RnnDescriptors& d, const CallData& c) -> ffi::Error {
        JAXDNN_RETURN_IF_CUDNN_ERROR(
            kBwdData,
            cudnnRNNBackwardData_v8(
                handle, d.rnn.get(), Lengths(seq_lengths), c.y, y.untyped_data(), dy.untyped_data(),
                c.x, dx->untyped_data(), d.state.get(), hx.untyped_data(), dhy.untyped_data(),
                dhx->untyped_data(), d.state.get(), CellData(state, cx), CellData(state, dcy),
                CellData(state, dcx), w.size_bytes(), w.untyped_data(), workspace->size_bytes(),
                workspace->untyped_data(), reserve_out->size_bytes(), reserve_out->untyped_data()));
        return ffi::Error::Success();
      });
}

// ---- jaxdnn_rnn_bwd_weights: ... -> dw (, workspace) ----

ffi::Error InitializeBwdWeights(cudaStream_t stream, int device, RnnState* state, Buffer x,
                                Buffer hx, Buffer cx, Buffer w, Buffer seq_lengths, Buffer y,
                                Buffer dy, Buffer dhy, Buffer dcy, Buffer reserve, Out dw,
                                Out workspace, Str, Str, Str, int64_t, int64_t, int64_t, int64_t,
                                int64_t, Int32s) {
  if (dw->element_type() != w.element_type())
    return InvalidArgument(kBwdWeights, "dw must have w's dtype");
  ExtraBuffers extra{{&y, &dy}, {&dhy}, {&dcy}, &*dw, &*workspace, &reserve, true};
  return Initialize(kBwdWeights, stream, device, state, {x, hx, cx, w, seq_lengths}, extra);
}

ffi::Error ExecuteBwdWeights(cudaStream_t stream, int device, RnnState* state, Buffer x, Buffer hx,
                             Buffer cx, Buffer w, Buffer seq_lengths, Buffer y, Buffer dy,
                             Buffer dhy, Buffer dcy, Buffer reserve, Out dw, Out workspace, Str,
                             Str, Str, int64_t, int64_t, int64_t, int64_t, int64_t, Int32s) {
  // cuDNN adds the weight gradient into dw (CUDNN_WGRAD_MODE_ADD): start from zero.
  JAXDNN_RETURN_IF_CUDA_ERROR(kBwdWeights,
                              cudaMemsetAsync(dw->untyped_data(), 0, dw->size_bytes(), stream));
  return Execute(
      kBwdWeights, stream, device, state, seq_lengths,
      [&](cudnnHandle_t handle, const RnnDescriptors& d, const CallData& c) -> ffi::Error {
        JAXDNN_RETURN_IF_CUDNN_ERROR(
            kBwdWeights, cudnnRNNBackwardWeights_v8(
                             handle, d.rnn.get(), CUDNN_WGRAD_MODE_ADD, Lengths(seq_lengths), c.x,
                             x.untyped_data(), d.state.get(), hx.untyped_data(), c.y,
                             y.untyped_data(), dw->size_bytes(), dw->untyped_data(),
                             workspace->size_bytes(), workspace->untyped_data(),
                             reserve.size_bytes(), const_cast<void*>(reserve.untyped_data())));
        return ffi::Error::Success();
      });
}

template <bool kForward, ffi::ExecutionStage stage, size_t kOperands, size_t kResults>
auto Binding() {
  return WithAttributes<kForward>(LegacyOpBinding<RnnState, stage, kOperands, kResults>());
}

// Instantiate and initialize are shared by both kinds of target; execute differs only in
// its traits (see the top of the file).
XLA_FFI_DEFINE_HANDLER(kFwdInstantiate, InstantiateFwd<false>,
                       WithAttributes<true>(ffi::Ffi::BindInstantiate()));
XLA_FFI_DEFINE_HANDLER(kFwdHostLengthsInstantiate, InstantiateFwd<true>,
                       WithAttributes<true>(ffi::Ffi::BindInstantiate()));
XLA_FFI_DEFINE_HANDLER(kFwdInitialize, InitializeFwd, (Binding<true, kInitializeStage, 5, 5>()));
XLA_FFI_DEFINE_HANDLER(kFwdExecute, ExecuteFwd, (Binding<true, kExecuteStage, 5, 5>()),
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kFwdHostLengthsExecute, ExecuteFwd, (Binding<true, kExecuteStage, 5, 5>()));

XLA_FFI_DEFINE_HANDLER(kBwdDataInstantiate, (InstantiateBwd<kBwdData, false>),
                       WithAttributes<false>(ffi::Ffi::BindInstantiate()));
XLA_FFI_DEFINE_HANDLER(kBwdDataHostLengthsInstantiate, (InstantiateBwd<kBwdData, true>),
                       WithAttributes<false>(ffi::Ffi::BindInstantiate()));
XLA_FFI_DEFINE_HANDLER(kBwdDataInitialize, InitializeBwdData,
                       (Binding<false, kInitializeStage, 10, 5>()));
XLA_FFI_DEFINE_HANDLER(kBwdDataExecute, ExecuteBwdData, (Binding<false, kExecuteStage, 10, 5>()),
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kBwdDataHostLengthsExecute, ExecuteBwdData,
                       (Binding<false, kExecuteStage, 10, 5>()));

XLA_FFI_DEFINE_HANDLER(kBwdWeightsInstantiate, (InstantiateBwd<kBwdWeights, false>),
                       WithAttributes<false>(ffi::Ffi::BindInstantiate()));
XLA_FFI_DEFINE_HANDLER(kBwdWeightsHostLengthsInstantiate, (InstantiateBwd<kBwdWeights, true>),
                       WithAttributes<false>(ffi::Ffi::BindInstantiate()));
XLA_FFI_DEFINE_HANDLER(kBwdWeightsInitialize, InitializeBwdWeights,
                       (Binding<false, kInitializeStage, 10, 2>()));
XLA_FFI_DEFINE_HANDLER(kBwdWeightsExecute, ExecuteBwdWeights,
                       (Binding<false, kExecuteStage, 10, 2>()),
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kBwdWeightsHostLengthsExecute, ExecuteBwdWeights,
                       (Binding<false, kExecuteStage, 10, 2>()));

// ---- trace-time queries -------------------------------------------------------------------

// The descriptors of a configuration on the current device, for the queries below.
ffi::Error QueryDescriptors(const char* op, const RnnQuery& q, int steps, int batch,
                            std::shared_ptr<const RnnDescriptors>* out) {
  RnnConfig c;
  JAXDNN_RETURN_IF_ERROR(ParseConfig(op, q.mode, q.input_mode, q.algo, q.hidden_size, q.num_layers,
                                     q.bidirectional, q.allow_tf32, &c));
  RnnShape s;
  JAXDNN_RETURN_IF_ERROR(DataTypeNamed(op, q.dtype, &s.type));
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  if (steps < 1 || batch < 1 || q.input_dim < 1 || q.input_dim > kIntMax)
    return InvalidArgument(op, "max_seq_length, batch_size and input_dim must be positive ints");
  s.steps = steps;
  s.batch = batch;
  s.input_size = static_cast<int>(q.input_dim);
  int device = 0;
  JAXDNN_RETURN_IF_CUDA_ERROR(op, cudaGetDevice(&device));
  JAXDNN_RETURN_IF_ERROR(ReserveCudnnHandle(op, device));
  BorrowedCudnnHandle handle(op, device, /*stream=*/nullptr);
  JAXDNN_RETURN_IF_ERROR(handle.error());
  return CachedDescriptors(op, handle.get(), device, c, s, out);
}

// Frees a cudaMalloc'd buffer when it goes out of scope.
struct DeviceBuffer {
  void* data = nullptr;
  ~DeviceBuffer() {
    if (data != nullptr) cudaFree(data);
  }
};

ffi::Error AppendWeightParams(const char* op, cudnnHandle_t handle, const RnnDescriptors& d,
                              int pseudo_layers, int lin_ids, size_t element_bytes,
                              std::vector<RnnWeightParam>* out) {
  DeviceBuffer space;  // cuDNN returns addresses inside a real weight space
  JAXDNN_RETURN_IF_CUDA_ERROR(op, cudaMalloc(&space.data, d.weight_bytes));
  TensorDescriptor matrix, bias;
  JAXDNN_RETURN_IF_ERROR(CreateDescriptor(op, cudnnCreateTensorDescriptor, &matrix));
  JAXDNN_RETURN_IF_ERROR(CreateDescriptor(op, cudnnCreateTensorDescriptor, &bias));
  const char* base = static_cast<const char*>(space.data);
  for (int layer = 0; layer < pseudo_layers; ++layer) {
    for (int lin_id = 0; lin_id < lin_ids; ++lin_id) {
      void* matrix_address = nullptr;
      void* bias_address = nullptr;
      JAXDNN_RETURN_IF_CUDNN_ERROR(
          op,
          cudnnGetRNNWeightParams(handle, d.rnn.get(), layer, d.weight_bytes, space.data, lin_id,
                                  matrix.get(), &matrix_address, bias.get(), &bias_address));
      for (auto [address, descriptor, kind] : {std::tuple{matrix_address, matrix.get(), "matrix"},
                                               std::tuple{bias_address, bias.get(), "bias"}}) {
        if (address == nullptr) continue;  // absent (skip input's input matrices)
        cudnnDataType_t type;
        int rank = 0, dims[8], strides[8];
        JAXDNN_RETURN_IF_CUDNN_ERROR(
            op, cudnnGetTensorNdDescriptor(descriptor, 8, &type, &rank, dims, strides));
        RnnWeightParam param{
            layer, lin_id, kind,
            static_cast<int64_t>((static_cast<const char*>(address) - base) / element_bytes),
            std::vector<int64_t>(dims, dims + rank)};
        out->push_back(std::move(param));
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

ffi::ErrorOr<std::pair<int64_t, int64_t>> RnnTempSpaceSizes(const RnnQuery& query,
                                                            int64_t max_seq_length,
                                                            int64_t batch_size, bool training) {
  return Guarded(kQuery, [&]() -> ffi::ErrorOr<std::pair<int64_t, int64_t>> {
    constexpr int64_t kIntMax = std::numeric_limits<int>::max();
    if (max_seq_length > kIntMax || batch_size > kIntMax)
      return ffi::Unexpected(
          InvalidArgument(kQuery, "max_seq_length and batch_size must fit an int"));
    std::shared_ptr<const RnnDescriptors> d;
    ffi::Error error = QueryDescriptors(kQuery, query, static_cast<int>(max_seq_length),
                                        static_cast<int>(batch_size), &d);
    if (error.failure()) return ffi::Unexpected(std::move(error));
    if (!training) return std::pair<int64_t, int64_t>(d->inference_workspace_bytes, 0);
    return std::pair<int64_t, int64_t>(d->training_workspace_bytes, d->reserve_bytes);
  });
}

ffi::ErrorOr<RnnWeightLayout> RnnWeightParams(const RnnQuery& query) {
  constexpr char op[] = "rnn_weight_params";
  return Guarded(op, [&]() -> ffi::ErrorOr<RnnWeightLayout> {
    std::shared_ptr<const RnnDescriptors> d;
    ffi::Error error = QueryDescriptors(op, query, 1, 1, &d);
    if (error.failure()) return ffi::Unexpected(std::move(error));
    const RnnConfig& c = d->config;
    const int gates = c.cell == CUDNN_LSTM ? 4 : c.cell == CUDNN_GRU ? 3 : 1;
    int device = 0;
    cudaError_t status = cudaGetDevice(&device);
    if (status != cudaSuccess) return ffi::Unexpected(CudaError(op, "cudaGetDevice", status));
    BorrowedCudnnHandle handle(op, device, nullptr);  // QueryDescriptors reserved one
    if (handle.error().failure()) return ffi::Unexpected(handle.error());
    RnnWeightLayout layout;
    layout.weight_bytes = static_cast<int64_t>(d->weight_bytes);
    error = AppendWeightParams(op, handle.get(), *d, c.num_layers * Directions(c), 2 * gates,
                               ElementBytes(d->shape.type), &layout.params);
    if (error.failure()) return ffi::Unexpected(std::move(error));
    return layout;
  });
}

void AddRnnHandlers(Registry& registry) {
  registry.state_types.push_back({"jaxdnn_rnn_state", &RnnState::id, &kRnnStateInfo});
  registry.handlers.push_back({"jaxdnn_rnn_fwd", kFwdInstantiate, kFwdInitialize, kFwdExecute});
  registry.handlers.push_back({"jaxdnn_rnn_fwd_host_lengths", kFwdHostLengthsInstantiate,
                               kFwdInitialize, kFwdHostLengthsExecute});
  registry.handlers.push_back(
      {"jaxdnn_rnn_bwd_data", kBwdDataInstantiate, kBwdDataInitialize, kBwdDataExecute});
  registry.handlers.push_back({"jaxdnn_rnn_bwd_data_host_lengths", kBwdDataHostLengthsInstantiate,
                               kBwdDataInitialize, kBwdDataHostLengthsExecute});
  registry.handlers.push_back({"jaxdnn_rnn_bwd_weights", kBwdWeightsInstantiate,
                               kBwdWeightsInitialize, kBwdWeightsExecute});
  registry.handlers.push_back({"jaxdnn_rnn_bwd_weights_host_lengths",
                               kBwdWeightsHostLengthsInstantiate, kBwdWeightsInitialize,
                               kBwdWeightsHostLengthsExecute});
}

}  // namespace jaxdnn
