"""The examples run (short versions) and learn."""
import io
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import sequence_model  # noqa: E402


def test_sequence_model_loss_goes_down():
    out = io.StringIO()
    losses = sequence_model.train(steps=250, out=out)
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    # predicting the mean gives about 0.17; remembering the flagged values, far less
    assert last < 0.05 < first, (first, last)
    assert "step 250/250" in out.getvalue()


def test_stn_digits_learns_the_digits():
    import stn_digits
    out = io.StringIO()
    _, variables, accuracy, _ = stn_digits.train(epochs=4, out=out)
    assert accuracy >= 0.9, accuracy  # the full 30 epochs reach about 99%
    assert "epoch 4/4" in out.getvalue()
    # the transformer's localization network learned something beyond the identity
    kernel = variables["params"]["Localization_0"]["Dense_1"]["kernel"]  # starts at zero
    assert np.abs(np.asarray(kernel)).max() > 0
