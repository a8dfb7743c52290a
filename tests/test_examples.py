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
