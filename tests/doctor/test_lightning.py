"""NNVitalsCallback: a Monitor inside Lightning's Trainer.fit, findings in the callback and the loggers."""

import csv
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

from nnvitals.examples import EXAMPLES  # noqa: E402
from nnvitals.integrations.lightning import NNVitalsCallback  # noqa: E402


class Classifier(pl.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(n=320, vocab=27, context=3):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, vocab, (n, context), generator=g), torch.randint(0, vocab, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=32)


def fit(module, callback, tmp_path, loggers=False, ckpt_path=None, **kw):
    kw.setdefault("max_epochs", 1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=loggers, callbacks=[callback],
                         enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path, **kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(num_workers|does not have many workers|Found \d+ module).*")
        trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer


def test_findings_in_the_callback_and_the_loggers(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    model, _, _ = EXAMPLES["makemore-naive"]()  # unit-normal weights: over-confident and saturated
    callback = NNVitalsCallback(every=3, plots=tmp_path / "pictures")
    tb, csv_logger = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")
    trainer = fit(Classifier(model), callback, tmp_path, loggers=[tb, csv_logger])
    assert trainer.global_step == 10
    assert [row["step"] for row in callback.monitor.history] == [0, 3, 6, 9]  # sampled by the global step
    codes = [f.code for f in callback.findings]
    assert "saturated-activations" in codes and "start-loss-high" in codes

    rows = list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()))
    assert float(rows[-1]["nnvitals/saturated-activations"]) >= 1 and float(rows[-1]["nnvitals/errors"]) >= 1
    assert float(rows[-1]["nnvitals/dead-units"]) == codes.count("dead-units")

    acc = event_accumulator.EventAccumulator(tb.log_dir, size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("layers/net.tanh()/saturated")] == [0, 3, 6, 9]  # the Monitor's scalars
    text = acc.Tensors("nnvitals/findings/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "saturated-activations" in text
    assert acc.Scalars("nnvitals/saturated-activations")[-1].value >= 1
    assert len(list((tmp_path / "pictures").glob("*.png"))) >= 3
    assert any(tag.startswith("nnvitals/") for tag in acc.Tags()["images"])


def test_module_left_in_eval_mode_is_warned_about(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(27, 10), nn.Flatten(), nn.Linear(30, 64, bias=False), nn.BatchNorm1d(64),
                        nn.Tanh(), nn.Linear(64, 27))
    net[3].eval()  # e.g. frozen by hand before fitting; Lightning keeps the mode
    callback = NNVitalsCallback(every=5)
    with pytest.warns(UserWarning, match="train-eval-mode.*`net.3`"):
        fit(Classifier(net), callback, tmp_path)
    assert [(f.code, f.where) for f in callback.start_findings] == [("train-eval-mode", "net.3")]
    assert "call model.train()" in callback.start_findings[0].fix
    assert "train-eval-mode" in [f.code for f in callback.findings]


def test_no_warning_when_every_module_trains(tmp_path):
    model, _, _ = EXAMPLES["deep-tanh-batchnorm"]()
    callback = NNVitalsCallback(every=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        fit(Classifier(model), callback, tmp_path)
    assert callback.start_findings == [] and "train-eval-mode" not in [f.code for f in callback.findings]


def test_samples_by_optimizer_step_when_accumulating(tmp_path):
    model, _, _ = EXAMPLES["makemore-fixed"]()
    callback = NNVitalsCallback(every=2)
    trainer = fit(Classifier(model), callback, tmp_path, accumulate_grad_batches=2)  # 10 batches, 5 steps
    assert trainer.global_step == 5 and callback.monitor.steps == 5
    assert [row["step"] for row in callback.monitor.history] == [0, 2, 4]
    # the loss is taken back from Lightning's division by 2: no start-loss-low; one micro-batch is recorded
    assert callback.findings == []
    assert not [name for row in callback.monitor.history for name in row["layers"] if "#" in name]


class TwoOptimizers(Classifier):
    """Manual optimization with two optimizers: the global step advances by two a batch."""

    def __init__(self, net):
        super().__init__(net)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        first, second = self.optimizers()
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()
        return loss

    def configure_optimizers(self):
        params = list(self.parameters())
        return torch.optim.SGD(params[:1], lr=0.1), torch.optim.SGD(params[1:], lr=0.1)


def test_several_optimizers_one_sample_per_batch(tmp_path):
    model, _, _ = EXAMPLES["makemore-naive"]()
    callback = NNVitalsCallback(every=3)
    trainer = fit(TwoOptimizers(model), callback, tmp_path)  # 10 batches, 20 optimizer steps
    assert trainer.global_step == 20
    history = callback.monitor.history
    assert [row["step"] for row in history] == [0, 3, 6, 9, 12, 15, 18]  # batches covering [0,2), [2,4), ...
    assert all(row["layers"] for row in history)
    assert "saturated-activations" in [f.code for f in callback.findings]


def test_resuming_with_another_every_starts_afresh(tmp_path):
    model, _, _ = EXAMPLES["makemore-naive"]()
    module = Classifier(model)
    first = fit(module, NNVitalsCallback(every=3), tmp_path)
    first.save_checkpoint(tmp_path / "run.ckpt")
    callback = NNVitalsCallback(every=4)
    with pytest.warns(UserWarning, match="every 3 steps, this one every 4.*fresh"):
        fit(module, callback, tmp_path, max_epochs=2, ckpt_path=tmp_path / "run.ckpt")
    assert [row["step"] for row in callback.monitor.history] == [12, 16]


class CallsTheNet(Classifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)  # not self(x): the module's own hooks never fire


def test_warns_when_training_step_does_not_call_the_module(tmp_path):
    model, _, _ = EXAMPLES["makemore-fixed"]()
    with pytest.warns(UserWarning, match=r"did not call the module itself \(self\(x\)\)") as caught:
        fit(CallsTheNet(model), NNVitalsCallback(every=3), tmp_path)
    assert sum("did not call the module" in str(w.message) for w in caught) == 1


def test_calling_the_module_gives_no_such_warning(tmp_path):
    model, _, _ = EXAMPLES["makemore-fixed"]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(Classifier(model), NNVitalsCallback(every=3), tmp_path)
    assert not [w for w in caught if "did not call the module" in str(w.message)]


def test_findings_text_written_once_at_the_global_step(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    model, _, _ = EXAMPLES["makemore-naive"]()
    tb = TensorBoardLogger(tmp_path, name="tb")
    fit(Classifier(model), NNVitalsCallback(every=3), tmp_path, loggers=[tb])
    acc = event_accumulator.EventAccumulator(tb.log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Tensors("nnvitals/findings/text_summary")] == [10]


class LeaveProcessGroup(pl.Callback):
    """Lightning's ddp_spawn leaves a gloo process group standing when its worker exits; gloo's threads torn down
    with the interpreter then abort the process now and again (SIGABRT, "terminate called without an active
    exception"). Each worker meets the other and leaves the group itself, after every other teardown hook."""

    def teardown(self, trainer, pl_module, stage):
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def fit_on_two_processes(callback, tmp_path, logger=False):
    model, _, _ = EXAMPLES["makemore-naive"]()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=logger,
                         callbacks=[callback, LeaveProcessGroup()], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Classifier(model), loader())


def test_under_lightning_ddp_rank_zero_logs_the_findings(tmp_path):
    """Two CPU processes (ddp_spawn, gloo): Lightning runs training_step as the module's forward, and the
    starting loss is still judged against ln(V); rank zero's logger gets the findings."""
    from lightning.pytorch.loggers import CSVLogger

    fit_on_two_processes(NNVitalsCallback(every=2), tmp_path, logger=CSVLogger(tmp_path, name="csv"))
    rows = list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()))
    last = rows[-1]
    assert last["step"] == "5"  # 320 examples, 32 a batch on each of 2 processes
    assert float(last["nnvitals/start-loss-high"]) == 1 and float(last["nnvitals/saturated-activations"]) == 1
    assert float(last["nnvitals/errors"]) >= 2


def test_plots_under_lightning_ddp(tmp_path):
    """trainer.log_dir broadcasts: every rank must ask for it, not only rank zero (gloo would fail)."""
    fit_on_two_processes(NNVitalsCallback(every=2, plots=True), tmp_path)
    assert len(list((tmp_path / "nnvitals").glob("*.png"))) >= 3
