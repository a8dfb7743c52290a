"""NumPy float64 references for RNNBlock: one cell step at a time, in plain Python loops over
layers, directions, sequences and time steps, on the split_params view of the parameters
(per layer `[W0, b0, W1, b1, ...]`, W applied as `x @ W`). Independent of jaxdnn's code.

The formulas are cuDNN's (and Theano's): every gate has an input bias and a recurrent
bias; lstm gates in the order input, forget, new memory, output; gru gates reset, update,
new memory, with the reset gate applied after the recurrent product.

An lstm with a projection (PyTorch's `nn.LSTM(proj_size=...)`, cuDNN's projSize) ends each
layer's list with one more matrix P (hidden, proj), without a bias: the hidden state is
h = (o * tanh(c)) @ P, of proj features, while the cell state c keeps hidden features.
"""
from __future__ import annotations

import numpy as np

GATES = {"rnn_relu": 1, "rnn_tanh": 1, "lstm": 4, "gru": 3}


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def step(mode, x, h, c, params):
    """One time step of one sequence: x (in,), h and c (hidden,) (c None but for lstm) ->
    (h', c'). A missing input matrix (input_mode='skip') stands for the identity. An lstm
    list of 4 * 4 + 1 entries ends with the projection: h (proj,), h' = (o tanh c') @ P."""
    gates = GATES[mode]
    projection = params[4 * gates] if len(params) > 4 * gates else None
    matrices, biases = params[0:4 * gates:2], params[1:4 * gates:2]
    from_input = [(x if W is None else x @ W) + b
                  for W, b in zip(matrices[:gates], biases[:gates])]
    from_state = [h @ R + b for R, b in zip(matrices[gates:], biases[gates:])]
    if mode == "rnn_relu":
        return np.maximum(from_input[0] + from_state[0], 0.0), c
    if mode == "rnn_tanh":
        return np.tanh(from_input[0] + from_state[0]), c
    if mode == "lstm":
        i, f, g, o = (a + b for a, b in zip(from_input, from_state))
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        return (h if projection is None else h @ projection), c
    r = sigmoid(from_input[0] + from_state[0])
    z = sigmoid(from_input[1] + from_state[1])
    n = np.tanh(from_input[2] + r * from_state[2])
    return (1.0 - z) * n + z * h, c


def rnn(layers, x, hx, cx=None, seq_lengths=None, *, mode, bidirectional=False):
    """x (T, N, I), hx (and cx for lstm) (L*D, N, H), layers[p] the split_params list of
    pseudo-layer p = depth * D + direction -> (y (T, N, D*H), hy, cy or None). With a
    projection, H is hx's (and y's) width, proj; cx and cy keep the cell's hidden size.

    Sequence n runs over its first seq_lengths[n] steps (forward: 0, 1, ...; backward:
    from its last valid step down to 0); y is zero past them and hy/cy hold the state
    after the last step taken."""
    x, hx = np.asarray(x, np.float64), np.asarray(hx, np.float64)
    steps, batch, _ = x.shape
    directions = 2 if bidirectional else 1
    hidden = hx.shape[-1]
    lengths = [steps] * batch if seq_lengths is None else [int(v) for v in seq_lengths]
    lstm = mode == "lstm"
    hy = np.zeros_like(hx)
    cy = np.zeros(np.shape(cx)) if lstm else None
    layer_input = x
    for depth in range(len(layers) // directions):
        out = np.zeros((steps, batch, directions * hidden))
        for direction in range(directions):
            p = depth * directions + direction
            for n in range(batch):
                h = hx[p, n].copy()
                c = np.asarray(cx, np.float64)[p, n].copy() if lstm else None
                order = range(lengths[n])
                for t in (order if direction == 0 else reversed(order)):
                    h, c = step(mode, layer_input[t, n], h, c, layers[p])
                    out[t, n, direction * hidden:(direction + 1) * hidden] = h
                hy[p, n] = h
                if lstm:
                    cy[p, n] = c
        layer_input = out
    return layer_input, hy, cy


def param_count(mode, hidden, num_layers, input_dim, skip=False, bidirectional=False, proj=0):
    """The number of parameters: per pseudo-layer, G input matrices (none in the first
    layer with skip input), G recurrent matrices, 2G bias vectors and, with a projection
    (proj > 0), one proj x hidden matrix; the recurrence and the layers above the first
    then read proj features per direction."""
    gates, directions = GATES[mode], 2 if bidirectional else 1
    out = proj or hidden
    total = 0
    for depth in range(num_layers):
        in_dim = input_dim if depth == 0 else directions * out
        input_matrices = 0 if (skip and depth == 0) else gates * hidden * in_dim
        total += directions * (input_matrices + gates * hidden * out + 2 * gates * hidden
                               + proj * hidden)
    return total


def rnn_with_dropout(layers, x, hx, cx=None, seq_lengths=None, *, mode, bidirectional=False,
                     masks, rate):
    """`rnn` one layer at a time, the output of layer d (every layer but the last) replaced
    by out * masks[d] / (1 - rate) before layer d + 1 reads it (inverted dropout, as
    PyTorch's nn.LSTM(dropout=rate)); masks[d] of 0s and 1s, out's shape. Returns what
    `rnn` returns: the last layer's output, hy and cy of every layer in order."""
    directions = 2 if bidirectional else 1
    hx = np.asarray(hx, np.float64)
    cx = None if cx is None else np.asarray(cx, np.float64)
    depth_count = len(layers) // directions
    layer_input, hy, cy = np.asarray(x, np.float64), [], []
    for depth in range(depth_count):
        own = slice(depth * directions, (depth + 1) * directions)
        out, h, c = rnn(layers[own], layer_input, hx[own], None if cx is None else cx[own],
                        seq_lengths, mode=mode, bidirectional=bidirectional)
        hy.append(h)
        cy.append(c)
        if depth < depth_count - 1:
            out = out * np.asarray(masks[depth], np.float64) / (1.0 - rate)
        layer_input = out
    return layer_input, np.concatenate(hy), None if cx is None else np.concatenate(cy)
