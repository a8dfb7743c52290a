// Recurrent networks through cuDNN's RNN v8 API: cudnnRNNForward, cudnnRNNBackwardData_v8
// and cudnnRNNBackwardWeights_v8 (rnn_relu, rnn_tanh, lstm, gru; linear or skip input; uni-
// or bidirectional; any depth; CUDNN_RNN_DOUBLE_BIAS; lstm projections (projSize); no dropout).
// Targets: jaxdnn_rnn_fwd, jaxdnn_rnn_bwd_data, jaxdnn_rnn_bwd_weights, and the same three
// with the suffix _host_lengths for variable lengths. jaxdnn/rnn.py's docstring is the
// contract (buffers, dtypes, sequence lengths and why the _host_lengths targets exist);
// initialize checks every buffer's shape and byte size against cuDNN's.
//
// Trace time: rnn_temp_space_sizes (workspace and reserve bytes) and rnn_weight_params
// (cudnnGetRNNWeightParams's layout, which the GPU tests compare with jaxdnn/rnn.py's)
// build the same descriptors, on the current device, through the same cache.
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>

#include <mutex>
#include <stdexcept>
#include <tuple>
#include <type_traits>

#include "common/descriptors.h"
#include "common/graph_capture.h"
#include "common/staged_op.h"

#define JAXDNN_RNN_ATTRS(X)                                                                   \
  X(std::string_view, mode)       /* rnn_relu | rnn_tanh | lstm | gru */                      \
  X(std::string_view, input_mode) /* linear | skip */                                         \
  X(std::string_view, algo)       /* standard | persist_static[_small_h] | persist_dynamic */ \
  X(int64_t, hidden_size)                                                                     \
  X(int64_t, num_layers)                                                                      \
  X(int64_t, bidirectional)                                                                   \
  X(int64_t, variable_lengths) /* 1 exactly for the _host_lengths targets */                  \
  X(int64_t, allow_tf32)                                                                      \
  X(xla::ffi::Span<const int32_t>, static_lengths) /* known at trace time, or empty */        \
  X(int64_t, proj_size) /* lstm: h's and y's features per direction; 0: no projection */
#define JAXDNN_RNN_FWD_ATTRS(X)                                                         \
  JAXDNN_RNN_ATTRS(X)                                                                   \
  X(int64_t, training)   /* 0: cuDNN's inference mode, which writes no reserve space */ \
  X(int64_t, cuda_graph) /* 1: outside XLA's graphs, replay the call as our own graph */
JAXDNN_DEFINE_ATTRS(RnnAttrs, JAXDNN_RNN_ATTRS);
JAXDNN_DEFINE_ATTRS(RnnFwdAttrs, JAXDNN_RNN_FWD_ATTRS);

namespace jaxdnn {
namespace {

namespace nb = nanobind;

constexpr char kFwd[] = "rnn_fwd";
constexpr char kBwdData[] = "rnn_bwd_data";
constexpr char kBwdWeights[] = "rnn_bwd_weights";

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
  int proj_size = 0;  // 0: none (cuDNN's projSize is then hidden_size)
};

// One call's data: its type and the sizes of x.
struct RnnShape {
  cudnnDataType_t type = CUDNN_DATA_FLOAT;
  int steps = 0, batch = 0, input_size = 0;
  std::vector<int> lengths;  // of each sequence; empty: every one `steps` long
  // A target without lengths (every sequence `steps` long): x and y described in cuDNN's
  // packed layout with padded IO off, which spares cuDNN the padding; the *_host_lengths
  // targets' lengths need the unpacked layout and padded IO. The same bytes either way.
  bool packed = false;
};

// Everything a call needs, built once per (device, config, shape) and then only read.
struct RnnDescriptors {
  RnnConfig config;  // what they were built for
  RnnShape shape;
  DropoutDescriptor dropout;  // dropout 0: cuDNN wants a descriptor all the same
  RnnDescriptor rnn;
  RnnDataDescriptor x, y;  // x and dx; y and dy
  TensorDescriptor state;  // hx, hy and their gradients
  TensorDescriptor cell;   // cx, cy and their gradients (hidden_size wide; state's shape
                           // without a projection)
  size_t weight_bytes = 0;
  size_t inference_workspace_bytes = 0;
  size_t training_workspace_bytes = 0;
  size_t reserve_bytes = 0;  // of a training forward
};

// The RnnConfig of a target's attributes (RnnAttrs or RnnFwdAttrs, which holds them all) or
// of a trace-time query's keywords (AttrsOfKeywords).
template <typename Attrs>
ffi::Error ParseConfig(const char* op, const Attrs& a, RnnConfig* c) {
  JAXDNN_RETURN_IF_ERROR(ParseChoice<cudnnRNNMode_t>(op, "mode", a.mode,
                                                     {{"rnn_relu", CUDNN_RNN_RELU},
                                                      {"rnn_tanh", CUDNN_RNN_TANH},
                                                      {"lstm", CUDNN_LSTM},
                                                      {"gru", CUDNN_GRU}},
                                                     &c->cell));
  JAXDNN_RETURN_IF_ERROR(ParseChoice<cudnnRNNInputMode_t>(
      op, "input_mode", a.input_mode, {{"linear", CUDNN_LINEAR_INPUT}, {"skip", CUDNN_SKIP_INPUT}},
      &c->input_mode));
  JAXDNN_RETURN_IF_ERROR(ParseChoice<cudnnRNNAlgo_t>(
      op, "algo", a.algo,
      {{"standard", CUDNN_RNN_ALGO_STANDARD},
       {"persist_static", CUDNN_RNN_ALGO_PERSIST_STATIC},
       {"persist_static_small_h", CUDNN_RNN_ALGO_PERSIST_STATIC_SMALL_H},
       {"persist_dynamic", CUDNN_RNN_ALGO_PERSIST_DYNAMIC}},
      &c->algo));
  if (a.hidden_size < 1 || !FitsInt(a.hidden_size) || a.num_layers < 1 || !FitsInt(a.num_layers))
    return InvalidArgument(op, "hidden_size and num_layers must be positive ints");
  // cuDNN projects only lstm's hidden state, to fewer features, on the standard algorithm.
  if (a.proj_size < 0 || a.proj_size >= a.hidden_size)
    return InvalidArgument(op, "proj_size must lie in [0, hidden_size)");
  if (a.proj_size != 0 && c->cell != CUDNN_LSTM)
    return InvalidArgument(op, "proj_size needs mode lstm");
  if (a.proj_size != 0 && c->algo != CUDNN_RNN_ALGO_STANDARD)
    return InvalidArgument(op, "proj_size needs algo standard");
  c->proj_size = static_cast<int>(a.proj_size);
  c->hidden_size = static_cast<int>(a.hidden_size);
  c->num_layers = static_cast<int>(a.num_layers);
  c->bidirectional = a.bidirectional != 0;
  c->allow_tf32 = a.allow_tf32 != 0;
  return ffi::Error::Success();
}

int Directions(const RnnConfig& c) { return c.bidirectional ? 2 : 1; }

// The features per direction of h and y: cuDNN's projSize (hidden_size without a projection).
int OutputSize(const RnnConfig& c) { return c.proj_size != 0 ? c.proj_size : c.hidden_size; }

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

// Sets x's and y's data descriptors to `lengths` in the shape's layout (see RnnShape).
ffi::Error SetDataDescriptors(const char* op, const RnnConfig& c, const RnnShape& s,
                              const int* lengths, cudnnRNNDataDescriptor_t x,
                              cudnnRNNDataDescriptor_t y) {
  const cudnnRNNDataLayout_t layout =
      s.packed ? CUDNN_RNN_DATA_LAYOUT_SEQ_MAJOR_PACKED : CUDNN_RNN_DATA_LAYOUT_SEQ_MAJOR_UNPACKED;
  double zero = 0.0;  // paddingFill is read in the data's type: zero bytes are zero in all
  void* fill = s.packed ? nullptr : &zero;  // packed data has no padding to fill
  for (auto [data, size] :
       {std::pair{x, s.input_size}, std::pair{y, Directions(c) * OutputSize(c)}})
    JAXDNN_RETURN_IF_CUDNN_ERROR(
        op, cudnnSetRNNDataDescriptor(data, s.type, layout, s.steps, s.batch, size, lengths, fill));
  return ffi::Error::Success();
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
      op,
      cudnnSetRNNDescriptor_v8(
          d->rnn.get(), c.algo, c.cell, CUDNN_RNN_DOUBLE_BIAS,
          c.bidirectional ? CUDNN_BIDIRECTIONAL : CUDNN_UNIDIRECTIONAL, c.input_mode, s.type,
          precision, math, s.input_size, c.hidden_size, /*projSize=*/OutputSize(c), c.num_layers,
          d->dropout.get(), s.packed ? CUDNN_RNN_PADDED_IO_DISABLED : CUDNN_RNN_PADDED_IO_ENABLED));
  if (c.algo == CUDNN_RNN_ALGO_PERSIST_DYNAMIC)  // compiles kernels for this batch size
    JAXDNN_RETURN_IF_CUDNN_ERROR(op, cudnnBuildRNNDynamic(handle, d->rnn.get(), s.batch));

  // The lengths the descriptors describe (see the top of the file); unpacked, zero is
  // written past each end.
  std::vector<int> lengths = s.lengths.empty() ? std::vector<int>(s.batch, s.steps) : s.lengths;
  JAXDNN_RETURN_IF_ERROR(CreateDescriptor(op, cudnnCreateRNNDataDescriptor, &d->x));
  JAXDNN_RETURN_IF_ERROR(CreateDescriptor(op, cudnnCreateRNNDataDescriptor, &d->y));
  JAXDNN_RETURN_IF_ERROR(SetDataDescriptors(op, c, s, lengths.data(), d->x.get(), d->y.get()));
  // h (hx, hy) has OutputSize(c) features, c (cx, cy) hidden_size: different shapes with a
  // projection.
  for (auto [descriptor, size] :
       {std::pair{&d->state, OutputSize(c)}, std::pair{&d->cell, c.hidden_size}}) {
    JAXDNN_RETURN_IF_ERROR(CreateDescriptor(op, cudnnCreateTensorDescriptor, descriptor));
    const int dims[3] = {c.num_layers * Directions(c), s.batch, size};
    const int strides[3] = {s.batch * size, size, 1};
    JAXDNN_RETURN_IF_CUDNN_ERROR(
        op, cudnnSetTensorNdDescriptor(descriptor->get(), s.type, 3, dims, strides));
  }

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
      .Add(c.proj_size)
      .Add(s.steps)
      .Add(s.batch)
      .Add(s.input_size)
      .Add(static_cast<int64_t>(s.packed))
      .AddAll(s.lengths);
  return ProcessCache<RnnDescriptors>().GetOrBuild(
      key, [&](RnnDescriptors* d) { return BuildDescriptors(op, handle, c, s, d); }, out);
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

// What a target's attributes say.
struct RnnCallConfig {
  RnnConfig rnn;
  bool training = true;                 // rnn_fwd: cuDNN's training mode (writes the reserve space)
  bool host_lengths = false;            // a *_host_lengths target
  bool cuda_graph = false;              // rnn_fwd: the cuda_graph attribute
  std::vector<int32_t> static_lengths;  // known at trace time (empty: all T, or dynamic)
};

// Pinned host memory for the lengths of the host-lengths targets, freed with the state.
struct PinnedLengths {
  int32_t* data = nullptr;
  size_t size = 0;
  ~PinnedLengths() {
    if (data != nullptr) cudaFreeHost(data);
  }
};

struct RnnState : StagedState<RnnCallConfig, RnnDescriptors> {
  PinnedLengths lengths;  // dynamic lengths: allocated at initialize (N entries)
  // Dynamic lengths: x's and y's data descriptors, created at initialize and set to each
  // call's lengths, which cuDNN reads on the host during the call. XLA runs one executable
  // from several threads at once, so a call holds `call_mutex` from setting them to the
  // end of its cuDNN call (these calls synchronize anyway).
  RnnDataDescriptor call_x, call_y;
  std::mutex call_mutex;

  // Lengths only the device knows: copied to the host at every execute.
  bool dynamic_lengths() const { return config.host_lengths && config.static_lengths.empty(); }

  // rnn_fwd outside XLA's CUDA graphs: cudnnRNNForward's per-step kernels replayed as one
  // graph (common/graph_capture.h). Only where the target is graph-safe (no host lengths:
  // those targets synchronize, and cuDNN's variable-length calls failed inside graphs).
  GraphCache graphs;
  bool captures_graph() const { return config.cuda_graph && !config.host_lengths; }
};

using Buffer = ffi::AnyBuffer;
using Out = ffi::Result<ffi::AnyBuffer>;

template <const char* kOp, bool kHostLengths, typename Attrs>
ffi::Error ParseCall(const Attrs& a, bool training, RnnCallConfig* c) {
  JAXDNN_RETURN_IF_ERROR(ParseConfig(kOp, a, &c->rnn));
  // Lengths other than T need the host-lengths targets.
  if ((a.variable_lengths != 0) != kHostLengths)
    return InvalidArgument(kOp,
                           "variable_lengths=1 goes with the *_host_lengths targets, and only it");
  if (a.static_lengths.size() != 0 && a.variable_lengths == 0)
    return InvalidArgument(kOp, "static_lengths need variable_lengths=1");
  c->static_lengths.assign(a.static_lengths.begin(), a.static_lengths.end());
  c->host_lengths = kHostLengths;
  c->training = training;
  return ffi::Error::Success();
}

template <bool kHostLengths>
ffi::Error ParseFwd(const RnnFwdAttrs& a, RnnCallConfig* c) {
  c->cuda_graph = a.cuda_graph != 0;
  return ParseCall<kFwd, kHostLengths>(a, a.training != 0, c);
}

template <const char* kOp, bool kHostLengths>
ffi::Error ParseBwd(const RnnAttrs& a, RnnCallConfig* c) {
  return ParseCall<kOp, kHostLengths>(a, /*training=*/true, c);
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
  for (int64_t d : x)
    if (d < 1 || !FitsInt(d)) return InvalidArgument(op, "x's dims must lie in [1, INT_MAX]");
  JAXDNN_ASSIGN_OR_RETURN(FloatType type, FloatTypeOf(op, in.x.element_type()));
  shape->type = type.cudnn;
  for (const Buffer* b : {&in.hx, &in.cx, &in.w})
    if (b->element_type() != in.x.element_type())
      return InvalidArgument(op, "x, hx, cx and w must share one dtype");
  const int64_t states = c.num_layers * Directions(c);
  if (!HasDims(in.hx, {states, x[1], OutputSize(c)}))
    return InvalidArgument(op,
                           "hx must have shape (num_layers * directions, N, proj_size or "
                           "hidden_size)");
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

// The buffers a call passes to cuDNN besides its CallOperands, checked at initialize:
// y-like buffers of (T, N, directions * proj or hidden), hx-like buffers of hx's shape, cx-like
// buffers of cx's, and the weight, workspace and reserve bytes against cuDNN's sizes.
struct ExtraBuffers {
  std::vector<const Buffer*> y_like, h_like, c_like;
  const Buffer* weights = nullptr;  // w (always) and dw
  const Buffer* workspace = nullptr;
  const Buffer* reserve = nullptr;  // the reserve the call reads or writes, if any
  bool training = true;
};

ffi::Error Initialize(const char* op, cudaStream_t stream, int device, RnnState* state,
                      const CallOperands& in, const ExtraBuffers& extra) {
  const RnnCallConfig& config = state->config;
  const RnnConfig& c = config.rnn;
  return InitializeState(
      op, stream, device, state, [&](cudnnHandle_t handle, auto* out) -> ffi::Error {
        RnnShape shape;
        JAXDNN_RETURN_IF_ERROR(CheckOperands(op, c, in, &shape));
        const int64_t steps = shape.steps, batch = shape.batch;
        shape.packed = !config.host_lengths;
        if (!config.static_lengths.empty()) {
          if (config.static_lengths.size() != static_cast<size_t>(batch))
            return InvalidArgument(op, "static_lengths must hold one length per sequence (N)");
          JAXDNN_RETURN_IF_ERROR(CheckLengths(op, config.static_lengths.data(),
                                              config.static_lengths.size(), shape.steps));
          shape.lengths.assign(config.static_lengths.begin(), config.static_lengths.end());
        }
        for (const Buffer* b : extra.y_like)
          if (b->element_type() != in.x.element_type() ||
              !HasDims(*b, {steps, batch, Directions(c) * OutputSize(c)}))
            return InvalidArgument(op,
                                   "y and dy must have shape (T, N, directions * (proj_size or "
                                   "hidden_size)) and x's dtype");
        for (const Buffer* b : extra.h_like)
          if (b->element_type() != in.x.element_type() || !(b->dimensions() == in.hx.dimensions()))
            return InvalidArgument(op, "hy, dhy and dhx must have hx's shape and dtype");
        for (const Buffer* b : extra.c_like)
          if (b->element_type() != in.x.element_type() || !(b->dimensions() == in.cx.dimensions()))
            return InvalidArgument(op, "cy, dcy and dcx must have cx's shape and dtype");
        std::shared_ptr<const RnnDescriptors> d;
        JAXDNN_RETURN_IF_ERROR(CachedDescriptors(op, handle, device, c, shape, &d));
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
          JAXDNN_RETURN_IF_ERROR(
              CreateDescriptor(op, cudnnCreateRNNDataDescriptor, &state->call_x));
          JAXDNN_RETURN_IF_ERROR(
              CreateDescriptor(op, cudnnCreateRNNDataDescriptor, &state->call_y));
        }
        *out = std::move(d);
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
  JAXDNN_RETURN_IF_ERROR(SetDataDescriptors(op, d.config, s, state->lengths.data,
                                            state->call_x.get(), state->call_y.get()));
  call->x = state->call_x.get();
  call->y = state->call_y.get();
  return ffi::Error::Success();
}

// Runs `launch(handle, descriptors, data descriptors)`.
template <typename Launch>
ffi::Error Execute(const char* op, cudaStream_t stream, int device, RnnState* state,
                   const Buffer& seq_lengths, Launch launch) {
  return ExecuteState(op, stream, device, state, [&](cudnnHandle_t handle, const auto& d) {
    CallData call{d.x.get(), d.y.get()};
    std::unique_lock<std::mutex> lengths_lock(state->call_mutex, std::defer_lock);
    if (state->dynamic_lengths()) {
      lengths_lock.lock();
      JAXDNN_RETURN_IF_ERROR(HostLengthsData(op, stream, state, d, seq_lengths, &call));
    }
    return launch(handle, d, call);
  });
}

// The cell state's pointer, or null for cells without one (their cx buffers are empty).
const void* CellData(const RnnState* state, const Buffer& b) {
  return state->config.rnn.cell == CUDNN_LSTM ? b.untyped_data() : nullptr;
}
void* CellData(const RnnState* state, Out& b) {
  return state->config.rnn.cell == CUDNN_LSTM ? b->untyped_data() : nullptr;
}

const int32_t* Lengths(const Buffer& seq_lengths) {
  return static_cast<const int32_t*>(seq_lengths.untyped_data());
}

// ---- jaxdnn_rnn_fwd: x, hx, cx, w, seq_lengths -> y, hy, cy, reserve, workspace ----

ffi::Error InitializeFwd(cudaStream_t stream, int device, RnnState* state, Buffer x, Buffer hx,
                         Buffer cx, Buffer w, Buffer seq_lengths, Out y, Out hy, Out cy,
                         Out reserve, Out workspace) {
  ExtraBuffers extra{
      {&*y}, {&*hy}, {&*cy}, nullptr, &*workspace, &*reserve, state->config.training};
  JAXDNN_RETURN_IF_ERROR(
      Initialize(kFwd, stream, device, state, {x, hx, cx, w, seq_lengths}, extra));
  if (state->captures_graph()) state->graphs.Prepare(device);  // its stream, before execute
  return ffi::Error::Success();
}

ffi::Error ExecuteFwd(cudaStream_t stream, int device, RnnState* state, Buffer x, Buffer hx,
                      Buffer cx, Buffer w, Buffer seq_lengths, Out y, Out hy, Out cy, Out reserve,
                      Out workspace) {
  return Execute(
      kFwd, stream, device, state, seq_lengths,
      [&](cudnnHandle_t handle, const RnnDescriptors& d, const CallData& c) -> ffi::Error {
        const size_t reserve_bytes = reserve->size_bytes();
        void* reserve_data = reserve_bytes > 0 ? reserve->untyped_data() : nullptr;
        auto launch = [&](cudaStream_t on) -> ffi::Error {
          // The borrowed handle is bound to `stream`; a graph capture launches on a stream
          // of its own, and its fallback on `stream` again.
          JAXDNN_RETURN_IF_CUDNN_ERROR(kFwd, BindCudnnHandle(handle, on));
          return JAXDNN_CUDNN_CALL(
              kFwd,
              cudnnRNNForward(
                  handle, d.rnn.get(),
                  state->config.training ? CUDNN_FWD_MODE_TRAINING : CUDNN_FWD_MODE_INFERENCE,
                  Lengths(seq_lengths), c.x, x.untyped_data(), c.y, y->untyped_data(),
                  d.state.get(), hx.untyped_data(), hy->untyped_data(), d.cell.get(),
                  CellData(state, cx), CellData(state, cy), w.size_bytes(), w.untyped_data(),
                  workspace->size_bytes(), workspace->untyped_data(), reserve_bytes, reserve_data));
        };
        if (!state->captures_graph()) return launch(stream);
        // Everything the captured kernels were given: every pointer and size above (the
        // descriptors and the handle included; the mode is the state's).
        GraphKey key;
        key.Add(handle).Add(d.rnn.get()).Add(c.x).Add(c.y).Add(d.state.get()).Add(d.cell.get());
        key.Add(Lengths(seq_lengths)).Add(x.untyped_data()).Add(y->untyped_data());
        key.Add(hx.untyped_data()).Add(hy->untyped_data());
        key.Add(CellData(state, cx)).Add(CellData(state, cy));
        key.Add(w.untyped_data()).Add(uint64_t{w.size_bytes()});
        key.Add(workspace->untyped_data()).Add(uint64_t{workspace->size_bytes()});
        key.Add(reserve_data).Add(uint64_t{reserve_bytes});
        return state->graphs.Run(stream, device, std::move(key), launch);
      });
}

// ---- jaxdnn_rnn_bwd_data: ... -> dx, dhx, dcx, reserve, workspace ----

ffi::Error InitializeBwdData(cudaStream_t stream, int device, RnnState* state, Buffer x, Buffer hx,
                             Buffer cx, Buffer w, Buffer seq_lengths, Buffer y, Buffer dy,
                             Buffer dhy, Buffer dcy, Buffer reserve, Out dx, Out dhx, Out dcx,
                             Out reserve_out, Out workspace) {
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
                          Out workspace) {
  // cuDNN reads and updates the reserve space here; the operand is XLA's and must stay as
  // it is, so the call works on the result, a copy (a capture-safe async copy).
  if (reserve_out->untyped_data() != reserve.untyped_data() && reserve.size_bytes() > 0)
    JAXDNN_RETURN_IF_CUDA_ERROR(
        kBwdData, cudaMemcpyAsync(reserve_out->untyped_data(), reserve.untyped_data(),
                                  reserve.size_bytes(), cudaMemcpyDeviceToDevice, stream));
  return Execute(
      kBwdData, stream, device, state, seq_lengths,
      [&](cudnnHandle_t handle, const RnnDescriptors& d, const CallData& c) -> ffi::Error {
        return JAXDNN_CUDNN_CALL(
            kBwdData,
            cudnnRNNBackwardData_v8(
                handle, d.rnn.get(), Lengths(seq_lengths), c.y, y.untyped_data(), dy.untyped_data(),
                c.x, dx->untyped_data(), d.state.get(), hx.untyped_data(), dhy.untyped_data(),
                dhx->untyped_data(), d.cell.get(), CellData(state, cx), CellData(state, dcy),
                CellData(state, dcx), w.size_bytes(), w.untyped_data(), workspace->size_bytes(),
                workspace->untyped_data(), reserve_out->size_bytes(), reserve_out->untyped_data()));
      });
}

// ---- jaxdnn_rnn_bwd_weights: ... -> dw, workspace ----

ffi::Error InitializeBwdWeights(cudaStream_t stream, int device, RnnState* state, Buffer x,
                                Buffer hx, Buffer cx, Buffer w, Buffer seq_lengths, Buffer y,
                                Buffer dy, Buffer dhy, Buffer dcy, Buffer reserve, Out dw,
                                Out workspace) {
  if (dw->element_type() != w.element_type())
    return InvalidArgument(kBwdWeights, "dw must have w's dtype");
  ExtraBuffers extra{{&y, &dy}, {&dhy}, {&dcy}, &*dw, &*workspace, &reserve, true};
  return Initialize(kBwdWeights, stream, device, state, {x, hx, cx, w, seq_lengths}, extra);
}

ffi::Error ExecuteBwdWeights(cudaStream_t stream, int device, RnnState* state, Buffer x, Buffer hx,
                             Buffer cx, Buffer w, Buffer seq_lengths, Buffer y, Buffer dy,
                             Buffer dhy, Buffer dcy, Buffer reserve, Out dw, Out workspace) {
  // cuDNN adds the weight gradient into dw (CUDNN_WGRAD_MODE_ADD): start from zero.
  JAXDNN_RETURN_IF_CUDA_ERROR(kBwdWeights,
                              cudaMemsetAsync(dw->untyped_data(), 0, dw->size_bytes(), stream));
  return Execute(
      kBwdWeights, stream, device, state, seq_lengths,
      [&](cudnnHandle_t handle, const RnnDescriptors& d, const CallData& c) -> ffi::Error {
        return JAXDNN_CUDNN_CALL(
            kBwdWeights, cudnnRNNBackwardWeights_v8(
                             handle, d.rnn.get(), CUDNN_WGRAD_MODE_ADD, Lengths(seq_lengths), c.x,
                             x.untyped_data(), d.state.get(), hx.untyped_data(), c.y,
                             y.untyped_data(), dw->size_bytes(), dw->untyped_data(),
                             workspace->size_bytes(), workspace->untyped_data(),
                             reserve.size_bytes(), const_cast<void*>(reserve.untyped_data())));
      });
}

// ---- trace-time queries (the extension module's rnn_* functions) -------------------------

// An error as the Python exception nanobind raises for it (RuntimeError).
void ThrowIfError(const ffi::Error& error) {
  if (error.failure()) throw std::runtime_error(error.message());
}

// The keyword `name` of a query, if given, as the attribute it names (a string points into
// the keyword's Python str, which outlives the query).
template <typename T>
void ReadKeyword(const nb::kwargs& kw, const char* name, T* out) {
  if (!kw.contains(name)) return;
  const std::string what = std::string("jaxdnn rnn query: keyword ") + name;
  try {
    if constexpr (std::is_same_v<T, Str>)
      *out = nb::cast<const char*>(kw[name]);
    else if constexpr (std::is_same_v<T, int64_t>)
      *out = nb::cast<int64_t>(kw[name]);
    else
      throw nb::type_error((what + " is not a query keyword").c_str());
  } catch (const std::bad_cast&) {
    throw nb::type_error((what + " has the wrong type").c_str());
  }
}

// The keywords of a query that name attributes (JAXDNN_RNN_ATTRS), read as XLA decodes a
// target's, so that an attribute is one line of C++ for the queries too. One that Python
// leaves out keeps its zero (proj_size: no projection; variable_lengths: none).
RnnAttrs AttrsOfKeywords(const nb::kwargs& kw) {
  RnnAttrs a{};
#define JAXDNN_READ_KEYWORD_(type, name) ReadKeyword(kw, #name, &a.name);
  JAXDNN_RNN_ATTRS(JAXDNN_READ_KEYWORD_)
#undef JAXDNN_READ_KEYWORD_
  return a;
}

// The descriptors of the configuration the keywords name (the attributes' and dtype,
// input_dim), for data of `steps` x `batch` in the layout of the call's target (see
// RnnShape: variable_lengths names the *_host_lengths targets' unpacked one), on the
// current device.
struct Query {
  int device = 0;
  std::shared_ptr<const RnnDescriptors> descriptors;
};

Query RunQuery(const nb::kwargs& kw, int64_t steps, int64_t batch) {
  const char* op = "rnn query";
  const RnnAttrs a = AttrsOfKeywords(kw);
  RnnConfig c;
  ThrowIfError(ParseConfig(op, a, &c));
  ffi::ErrorOr<FloatType> type = FloatTypeNamed(op, nb::cast<std::string>(kw["dtype"]));
  if (type.has_error()) ThrowIfError(type.error());
  const int64_t input_dim = nb::cast<int64_t>(kw["input_dim"]);
  if (steps < 1 || batch < 1 || input_dim < 1 || !FitsInt(steps) || !FitsInt(batch) ||
      !FitsInt(input_dim))
    throw std::runtime_error(
        "jaxdnn rnn query: max_seq_length, batch_size and input_dim must "
        "be positive ints");
  RnnShape s{type.value().cudnn,
             static_cast<int>(steps),
             static_cast<int>(batch),
             static_cast<int>(input_dim),
             {},
             /*packed=*/a.variable_lengths == 0};
  Query q;
  cudaError_t status = cudaGetDevice(&q.device);
  if (status != cudaSuccess) ThrowIfError(CudaError(op, "cudaGetDevice", status));
  ThrowIfError(ReserveCudnnHandle(op, q.device));
  BorrowedCudnnHandle handle(op, q.device, /*stream=*/nullptr);
  ThrowIfError(handle.error());
  ThrowIfError(CachedDescriptors(op, handle.get(), q.device, c, s, &q.descriptors));
  return q;
}

// Frees a cudaMalloc'd buffer when it goes out of scope.
struct DeviceBuffer {
  void* data = nullptr;
  ~DeviceBuffer() {
    if (data != nullptr) cudaFree(data);
  }
};

// (pseudo_layer, lin_id, kind, offset in elements, dims) of every matrix and bias (with a
// projection, lin_id 2 * gates (8) is the projection matrix, which has no bias).
ffi::Error AppendWeightParams(const char* op, cudnnHandle_t handle, const RnnDescriptors& d,
                              nb::list* out) {
  const RnnConfig& c = d.config;
  const int pseudo_layers = c.num_layers * Directions(c);
  const int lin_ids = 2 * (c.cell == CUDNN_LSTM  ? 4
                           : c.cell == CUDNN_GRU ? 3
                                                 : 1) +
                      (c.proj_size != 0 ? 1 : 0);
  const size_t element_bytes = d.shape.type == CUDNN_DATA_DOUBLE  ? 8
                               : d.shape.type == CUDNN_DATA_FLOAT ? 4
                                                                  : 2;
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
        nb::list shape;
        for (int i = 0; i < rank; ++i) shape.append(dims[i]);
        const int64_t offset = (static_cast<const char*>(address) - base) / element_bytes;
        out->append(nb::make_tuple(layer, lin_id, kind, offset, nb::tuple(shape)));
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

void AddRnnQueries(nb::module_& m) {
  m.def(
      "rnn_temp_space_sizes",
      [](nb::kwargs kw) {
        const bool training = nb::cast<bool>(kw["training"]);
        Query q = RunQuery(kw, nb::cast<int64_t>(kw["max_seq_length"]),
                           nb::cast<int64_t>(kw["batch_size"]));
        const RnnDescriptors& d = *q.descriptors;
        return std::pair<int64_t, int64_t>(
            training ? d.training_workspace_bytes : d.inference_workspace_bytes,
            training ? d.reserve_bytes : 0);
      },
      "(workspace, reserve) bytes cudnnGetRNNTempSpaceSizes gives one RNN configuration (the "
      "attributes' keywords, proj_size and variable_lengths optional, dtype, input_dim, "
      "max_seq_length, batch_size, training) on the current device; reserve 0 unless "
      "training.");
  m.def(
      "rnn_weight_params",
      [](nb::kwargs kw) {
        constexpr char op[] = "rnn_weight_params";
        Query q = RunQuery(kw, 1, 1);  // the weights' layout has no lengths (none passed)
        BorrowedCudnnHandle handle(op, q.device, nullptr);  // RunQuery reserved one
        ThrowIfError(handle.error());
        nb::list params;
        ThrowIfError(AppendWeightParams(op, handle.get(), *q.descriptors, &params));
        return nb::make_tuple(static_cast<int64_t>(q.descriptors->weight_bytes), params);
      },
      "(weight_space_bytes, [(pseudo_layer, lin_id, kind, offset_in_elements, dims)]) from "
      "cudnnGetRNNWeightParams for one configuration (keywords as rnn_temp_space_sizes), on "
      "the current device.");
}

void AddRnnHandlers(Registry& registry) {
  // Execute of a _host_lengths target is not graph-safe: it may synchronize, and cuDNN's
  // variable-length calls failed inside CUDA graphs (jaxdnn/rnn.py).
  constexpr bool kGraphUnsafe = false;
  const std::string host_lengths = "_host_lengths";
  registry.Add<ParseFwd<false>, InitializeFwd, ExecuteFwd>(kFwd);
  registry.Add<ParseFwd<true>, InitializeFwd, ExecuteFwd, kGraphUnsafe>(kFwd + host_lengths);
  registry.Add<ParseBwd<kBwdData, false>, InitializeBwdData, ExecuteBwdData>(kBwdData);
  registry.Add<ParseBwd<kBwdData, true>, InitializeBwdData, ExecuteBwdData, kGraphUnsafe>(
      kBwdData + host_lengths);
  registry.Add<ParseBwd<kBwdWeights, false>, InitializeBwdWeights, ExecuteBwdWeights>(kBwdWeights);
  registry.Add<ParseBwd<kBwdWeights, true>, InitializeBwdWeights, ExecuteBwdWeights, kGraphUnsafe>(
      kBwdWeights + host_lengths);
}

}  // namespace jaxdnn
