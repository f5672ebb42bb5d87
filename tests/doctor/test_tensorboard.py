"""Monitor(tensorboard=...): event files that TensorBoard's own reader understands."""

import pytest
import torch
from torch import nn

import nnvitals
from nnvitals.examples import EXAMPLES

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def test_scalars_histograms_and_findings_read_back(tmp_path):
    model, x, y = EXAMPLES["makemore-naive"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with nnvitals.Monitor(model, every=5, tensorboard=tmp_path / "tb") as mon:
        for _ in range(12):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss)
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"loss", "layers/tanh()/saturated", "layers/tanh()/std", "update_ratio/W1"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("layers/tanh()/saturated")] == [0, 5, 10]
    first = acc.Scalars("layers/tanh()/saturated")[0].value
    assert first == pytest.approx(mon.history[0]["layers"]["tanh()"]["saturated"], rel=1e-6)
    hist = acc.Histograms("layers/tanh()/activations")
    assert [h.step for h in hist] == [0, 5, 10]
    assert hist[0].histogram_value.num == x.shape[0] * 200
    text = acc.Tensors("nnvitals/findings/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "saturated-activations" in text and "start-loss-high" in text


def test_bad_tensorboard_target():
    with pytest.raises(TypeError):
        nnvitals.Monitor(nn.Linear(2, 2), tensorboard=42)
