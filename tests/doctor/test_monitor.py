"""Monitor in a training loop: bit-identical training, sampled statistics, findings and plots."""

import copy
import gc
import io
import pickle
import warnings
import weakref

import pytest
import torch
from torch import nn

import nnvitals
from nnvitals import probes
from nnvitals.examples import EXAMPLES

from . import models as M


def setup(make, lr=0.1):
    """A model, its optimizer, and the same 512 examples and batch draws every time."""
    model, _, _ = make()
    g = torch.Generator().manual_seed(3)
    data = torch.randint(0, 27, (512, 3), generator=g)
    targets = torch.randint(0, 27, (512,), generator=g)
    return model, torch.optim.SGD(model.parameters(), lr=lr), g, data, targets


def run(steps, model, opt, g, data, targets, mon=None, loss_arg=True):
    for _ in range(steps):
        ix = torch.randint(0, 512, (32,), generator=g)
        loss = nn.functional.cross_entropy(model(data[ix]), targets[ix])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if mon:
            mon.step(loss if loss_arg else None)


def one_step(model, opt, x, y, mon):
    """One optimizer step on (x, y) with cross-entropy, then the Monitor's step with the loss."""
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    mon.step(loss)


def train(make, steps, monitor_every=None, lr=0.1, loss_arg=True):
    model, opt, g, data, targets = setup(make, lr)
    torch.manual_seed(5)
    mon = nnvitals.Monitor(model, every=monitor_every) if monitor_every else None
    if mon:
        mon.__enter__()
    run(steps, model, opt, g, data, targets, mon, loss_arg)
    if mon:
        mon.__exit__(None, None, None)
    return model, mon


@pytest.mark.parametrize("name", ["deep-tanh-batchnorm", "makemore-naive"])
@pytest.mark.parametrize("every", [1, 3])
def test_training_is_bit_identical_with_a_monitor(name, every):
    plain, _ = train(EXAMPLES[name], 12)
    watched, mon = train(EXAMPLES[name], 12, monitor_every=every)
    for (n, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items(), strict=False):
        assert torch.equal(a, b), n
    assert [row["step"] for row in mon.history] == list(range(0, 12, every))


def test_monitor_detaches_between_samples_and_after():
    model, _ = train(EXAMPLES["deep-tanh-batchnorm"], 5, monitor_every=100)
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert not torch.nn.modules.module._global_forward_hooks  # the process-wide ones that hand calls on
    assert not torch.nn.modules.module._global_forward_pre_hooks


def test_every_step_keeps_watching_activation_functions_and_only_them():
    """Watching activations called as functions costs on every op: after the first sampled step it stays on
    for a model that has them (every step's history still shows `tanh()`) and is dropped, with the hooks
    that tracked which module called a function, for a model that has none."""
    model = M.FunctionalTanh()
    g = torch.Generator().manual_seed(0)
    with nnvitals.Monitor(model, every=1) as mon:
        for _ in range(3):
            loss = nn.functional.cross_entropy(model(torch.randn(16, 20, generator=g)), torch.randint(0, 10, (16,)))
            loss.backward()
            mon.step(loss)
    assert [("tanh()" in row["layers"]) for row in mon.history] == [True, True, True]

    model, opt, g, data, targets = setup(EXAMPLES["deep-tanh-batchnorm"])
    with nnvitals.Monitor(model, every=1) as mon:
        run(2, model, opt, g, data, targets, mon)
        assert not any(m._forward_pre_hooks for m in model.modules() if m is not model)
        assert len(mon.history) == 2


def test_monitor_findings_and_update_ratio_history(tmp_path):
    _, mon = train(EXAMPLES["makemore-naive"], 30, monitor_every=5)
    codes = {f.code for f in mon.findings()}
    assert "start-loss-high" in codes  # judged on step 0's loss
    assert "saturated-activations" in codes
    rows = mon.history
    assert len(rows) == 6 and rows[0]["loss"] > 15
    assert all(rows[i]["params"]["W1"]["update_ratio"] is not None for i in range(len(rows)))
    names = {p.name for p in mon.save_plots(tmp_path)}
    assert "update_ratio.png" in names and "activations.png" in names


def test_monitor_update_ratio_finding_for_a_huge_learning_rate():
    _, mon = train(EXAMPLES["deep-tanh-batchnorm"], 12, monitor_every=2, lr=20.0, loss_arg=False)
    assert any(f.code == "update-ratio" and "too large" in f.message for f in mon.findings())


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("called", ["the model", "a BatchNorm on its own"])
def test_monitor_sees_inference_with_batchnorm_in_train_mode(called, steps):
    """On the first sample and on later ones, watched module by module or by the process-wide hook: an inference
    call with a BatchNorm in train mode is reported, through the model or straight to the layer."""
    model, x, y = M.healthy_deep_tanh()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with nnvitals.Monitor(model, every=1) as mon:
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():  # evaluation forgot model.eval()
                model(x) if called == "the model" else bn(torch.randn(8, bn.num_features))
            mon.step(loss)
    f = next(f for f in mon.findings() if f.code == "train-eval-mode")
    assert "no_grad" in f.message and "model.eval()" in f.fix


def test_monitor_bad_arguments():
    model = M.mlp([4, 4])
    with pytest.raises(ValueError):
        nnvitals.Monitor(model, every=0)
    with pytest.raises(TypeError):
        nnvitals.Monitor("not a model")  # type: ignore[arg-type]
    mon = nnvitals.Monitor(model)
    with pytest.raises(RuntimeError):
        mon.step()
    with nnvitals.Monitor(model) as mon, pytest.raises(RuntimeError):
        mon.report()


@pytest.mark.parametrize("stack_limit", [probes.STACK_LIMIT, 1], ids=["small-layers-stacked", "one-by-one"])
def test_statistics_match_torch_on_the_same_pass(stack_limit, monkeypatch):
    """The batched reductions agree with torch's own mean/std on every layer, gradient and weight, both
    for layers stacked with their likes and for large ones reduced one by one as they come."""
    monkeypatch.setattr(probes, "STACK_LIMIT", stack_limit)
    model, x, y = M.healthy_deep_tanh()
    outputs, grads = {}, {}

    def keep(name):
        def hook(module, args, out):
            outputs[name] = out.detach().clone()
            out.register_hook(lambda g: grads.__setitem__(name, g.detach().clone()))
        return hook

    for name, module in model.named_modules():
        if name and not isinstance(module, nn.Flatten):
            module.register_forward_hook(keep(name))
    report = nnvitals.check(model, x, y)
    for lay in report.layers:
        assert lay.mean == pytest.approx(outputs[lay.name].mean().item(), abs=1e-5)
        assert lay.std == pytest.approx(outputs[lay.name].std().item(), rel=1e-4)
        assert lay.grad_std == pytest.approx(grads[lay.name].std().item(), rel=1e-3)
        if lay.kind == "tanh":
            assert lay.saturated == pytest.approx((outputs[lay.name].abs() > 0.97).float().mean().item())
            assert sum(lay.hist) + sum(lay.hist_outside) == outputs[lay.name].numel()
    nn.functional.cross_entropy(model(x), y).backward()
    for p in report.params:
        if p.std is not None:
            param = dict(model.named_parameters())[p.name]
            assert p.std == pytest.approx(param.std().item(), rel=1e-4)
            assert p.grad_std == pytest.approx(param.grad.std().item(), rel=1e-3)


@pytest.fixture(params=[True, False], ids=["c++-hooks", "python-hooks"])
def lender(request, monkeypatch):
    """Gradient hooks (and, in the kernel, tensor addresses) by nnvitals._autograd's C++ or torch's Python API."""
    if request.param and probes._keep_grad is None:
        pytest.skip("nnvitals._autograd is not built")
    if not request.param:
        monkeypatch.setattr(probes, "_keep_grad", None)
    kernel = probes._kernel
    if kernel is not None:
        kernel.borrow(request.param)
    yield request.param
    if kernel is not None:
        kernel.borrow(True)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch-ops"])
def test_a_gradient_that_came_twice_is_their_sum_and_outputs_keep_no_grad(kernel, lender, monkeypatch):
    """Backward run twice through a recorded pass (retain_graph): each layer's gradient is the sum of the two, as
    autograd adds them up, with the Replay in C or in Python, the hooks in C++ or Python; hooks the user adds to an
    output afterwards still run; and no output is left with a `.grad` it did not have."""
    if kernel and probes._kernel is None:
        pytest.skip("the compiled kernel is not built")
    monkeypatch.setattr(probes, "_kernel", probes._kernel if kernel else None)
    model, x, y = M.healthy_deep_tanh()
    rec = probes.Recorder(model)
    outputs: dict[str, torch.Tensor] = {}
    seen: dict[str, list[torch.Tensor]] = {}

    def keep(name):
        def hook(module, args, out):
            outputs[name] = out
            out.register_hook(lambda g: seen.setdefault(name, []).append(g.detach().clone()))
        return hook

    for name, module in model.named_modules():
        if name and not isinstance(module, nn.Flatten):
            module.register_forward_hook(keep(name))
    for twice in (False, True, False, True):  # (the second pass replays the first's records)
        seen.clear()
        rec.attach()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward(retain_graph=twice)
        if twice:
            loss.backward()
        stats = rec.collect().stats()
        rec.detach()
        model.zero_grad()
        assert stats.layers
        for lay in stats.layers:
            want = sum(seen[lay.name])
            assert len(seen[lay.name]) == (2 if twice else 1)
            assert lay.grad_std == pytest.approx(want.std().item(), rel=1e-3), (twice, lay.name)
        with warnings.catch_warnings():  # (torch warns that a non-leaf's .grad is not filled in: the point here)
            warnings.simplefilter("ignore", UserWarning)
            assert all(out.grad is None and not out.retains_grad for out in outputs.values())


def test_an_output_saved_on_a_sampled_step_saves_without_a_warning():
    """With the C++ hooks the Monitor's gradient hooks live in autograd's graph, not on the output: a user who saves
    the model's output (torch.save, pickle) on a sampled step gets no warning about backward hooks."""
    if probes._keep_grad is None:
        pytest.skip("nnvitals._autograd is not built")
    model, x, y = M.healthy_deep_tanh()
    with nnvitals.Monitor(model, every=1) as mon:
        out = model(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.save(out, io.BytesIO())
        nn.functional.cross_entropy(out, y).backward()
        mon.step()
    assert mon.history[0]["layers"]


def test_update_ratio_is_the_measured_update():
    model, x, y = M.healthy_deep_tanh()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with nnvitals.Monitor(model, every=1) as mon:
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        mon.step(loss)
    row = mon.history[0]["params"]
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            expected = torch.log10((p.detach() - before[name]).std() / before[name].std()).item()
            assert row[name]["update_ratio"] == pytest.approx(expected, abs=1e-3)



def test_update_ratios_step_after_step_each_against_its_own_step():
    # every step sampled: each step's weight copy replaces the last one (the kernel reuses its block)
    model, x, y = M.healthy_deep_tanh()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    expected = []
    with nnvitals.Monitor(model, every=1) as mon:
        for _ in range(4):
            before = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() >= 2}
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss)
            # the Monitor divides by the spread of the weight as the step left it
            expected.append({n: torch.log10((p.detach() - before[n]).std() / p.detach().std()).item()
                             for n, p in model.named_parameters() if p.dim() >= 2})
    for row, want in zip(mon.history, expected, strict=True):
        assert {n: row["params"][n]["update_ratio"] for n in want} == pytest.approx(want, abs=1e-3)
    assert expected[0] != pytest.approx(expected[-1], abs=1e-3)  # momentum: the steps differ


@pytest.mark.parametrize("update", ["optimizer", "by hand", "by hand, then another model's optimizer"])
def test_update_ratio_at_every_third_step_is_that_steps_own_update(update):
    """Between samples the weights' copy is taken as the model's optimizer is about to step (once one has been
    seen doing so), or at the step before for updates written by hand; an optimizer of another model stepping
    after a hand-written update does not count as the model's."""
    model, x, y = M.healthy_deep_tanh()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    other = nn.Linear(3, 3)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    weights = {n: p for n, p in model.named_parameters() if p.dim() >= 2}
    expected = {}
    with nnvitals.Monitor(model, every=3) as mon:
        for step in range(10):
            before = {n: p.detach().clone() for n, p in weights.items()}
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            if update == "optimizer":
                opt.step()
            else:
                with torch.no_grad():
                    for p in model.parameters():
                        p -= 0.5 * p.grad
                if update != "by hand":
                    other(torch.ones(1, 3)).sum().backward()
                    other_opt.step()
            mon.step(loss)
            if step % 3 == 0:
                expected[step] = {n: torch.log10((p.detach() - before[n]).std() / p.detach().std()).item()
                                  for n, p in weights.items()}
    rows = {row["step"]: row for row in mon.history}
    assert sorted(rows) == [0, 3, 6, 9]
    for step, want in expected.items():
        assert {n: rows[step]["params"][n]["update_ratio"] for n in want} == pytest.approx(want, abs=1e-3)
    assert mon._late_copy == (update == "optimizer")  # where the copy was taken at the last sample


def test_a_weight_frozen_between_snapshot_and_step_leaves_the_other_numbers_right():
    """The weights copied before the step no longer match the trainable ones: no update ratio is made up,
    and every weight's and gradient's spread is still its own."""
    model, x, y = M.healthy_deep_tanh()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with nnvitals.Monitor(model, every=1) as mon:
        frozen = next(p for p in model.parameters() if p.dim() >= 2)
        frozen.requires_grad_(False)  # after the Monitor copied the weights for this step
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        mon.step(loss)
    params = {p.name: p for p in mon.report().stats.params}
    for name, p in model.named_parameters():
        if p.requires_grad and p.dim() >= 2:
            assert params[name].update_ratio is None
            assert params[name].std == pytest.approx(p.detach().std().item(), rel=1e-4)
            assert params[name].grad_std == pytest.approx(p.grad.std().item(), rel=1e-4)

def test_state_dict_resumes_with_the_same_history_and_findings():
    import json

    model, opt, g, data, targets = setup(EXAMPLES["makemore-naive"])
    with nnvitals.Monitor(model, every=4) as mon:
        run(30, model, opt, g, data, targets, mon)
    whole_history, whole_codes = mon.history, [(f.code, f.where) for f in mon.findings()]

    model, opt, g, data, targets = setup(EXAMPLES["makemore-naive"])
    with nnvitals.Monitor(model, every=4) as mon:
        run(13, model, opt, g, data, targets, mon)
    state = json.loads(json.dumps(mon.state_dict()))  # plain data survives a checkpoint
    with nnvitals.Monitor(model, every=4) as resumed:
        resumed.load_state_dict(state)
        run(17, model, opt, g, data, targets, resumed)
    assert [r["step"] for r in resumed.history] == [r["step"] for r in whole_history]
    assert resumed.history == whole_history
    assert [(f.code, f.where) for f in resumed.findings()] == whole_codes
    with pytest.raises(ValueError):
        nnvitals.Monitor(model, every=5).load_state_dict(state)


class _StepAsForward(nn.Module):
    """What Lightning's DDP strategies do: the training step runs as the module's forward, and calls the
    module again for the logits."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, y=None):
        return self.net(x) if y is None else nn.functional.cross_entropy(self(x), y)


def test_the_output_is_the_logits_when_the_training_step_is_the_forward():
    net, x, y = EXAMPLES["makemore-naive"]()
    model = _StepAsForward(net)
    with nnvitals.Monitor(model, every=1) as mon:
        loss = model(x, y)
        loss.backward()
        mon.step(loss)
    report = mon.report()
    assert report.classes == 27  # judged against ln(27), not taken from the scalar loss
    assert "start-loss-high" in [f.code for f in report.findings]


def test_pause_records_nothing_and_seek_renumbers_the_next_step():
    model, opt, g, data, targets = setup(EXAMPLES["makemore-fixed"])
    with nnvitals.Monitor(model, every=2) as mon:
        mon.pause()
        run(1, model, opt, g, data, targets, mon)  # step 0 is sampled, but paused: not recorded
        mon.resume()
        run(1, model, opt, g, data, targets, mon)  # step 1: not sampled
        mon.seek(4)
        run(1, model, opt, g, data, targets, mon)  # recorded as step 4
    assert [row["step"] for row in mon.history] == [4] and mon.steps == 5


def test_only_every_nth_step_is_recorded_around_seeks_and_pauses():
    """Between samples step() only counts; a seek or a pause and resume in such a stretch leaves exactly the
    sampled steps recorded."""
    model, opt, g, data, targets = setup(EXAMPLES["makemore-fixed"])
    with nnvitals.Monitor(model, every=5) as mon:
        run(3, model, opt, g, data, targets, mon)  # steps 0 (recorded), 1, 2
        mon.seek(8)
        run(4, model, opt, g, data, targets, mon)  # 8, 9, 10 (recorded), 11
        mon.pause()
        mon.resume()
        run(10, model, opt, g, data, targets, mon)  # 12 to 21: 15 and 20 recorded
    assert [row["step"] for row in mon.history] == [0, 10, 15, 20] and mon.steps == 22
    with pytest.raises(RuntimeError, match="context manager"):
        mon.step()  # closed: says so, also in a stretch between samples


class _InPlaceAfter(nn.Module):
    """BatchNorm feeding an in-place ReLU, and a Linear whose output is changed in place only when `late`."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(27, 8)
        self.lin = nn.Linear(24, 32)
        self.bn = nn.BatchNorm1d(32, affine=False)  # its output: mean 0 exactly, whatever the training
        self.act = nn.ReLU(inplace=True)
        self.out = nn.Linear(32, 27)
        self.late = False

    def forward(self, x):
        h = self.lin(self.emb(x).flatten(1))
        if self.late:
            h.mul_(3.0)
        return self.out(self.act(self.bn(h)))


def test_outputs_changed_in_place_are_measured_as_their_layer_made_them():
    model = _InPlaceAfter()
    g = torch.Generator().manual_seed(3)
    data, targets = torch.randint(0, 27, (512, 3), generator=g), torch.randint(0, 27, (512,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with nnvitals.Monitor(model, every=1) as mon:
        run(4, model, opt, g, data, targets, mon)
        model.late = True  # from now on `lin`'s output is changed after its hook saw it
        run(3, model, opt, g, data, targets, mon)
    rows = mon.history
    # BatchNorm's output (normalised: mean 0 per unit) is measured before the ReLU zeroes its negative half
    # (after it, the mean would be about 0.4), on the first pass, which copies it, and on every one after
    assert all(abs(row["layers"]["bn"]["mean"]) < 1e-4 for row in rows)
    # `lin`, uncopied once the first pass saw nothing change it, is left out of the one pass where it was
    # changed unseen, then copied again and measured as the layer made it
    assert [("lin" in row["layers"]) for row in rows] == [True] * 4 + [False, True, True]
    ix = torch.randint(0, 512, (32,), generator=torch.Generator().manual_seed(0))
    assert rows[-1]["layers"]["lin"]["std"] == pytest.approx(
        model.lin(model.emb(data[ix]).flatten(1)).std().item(), rel=0.5)  # not three times it


class _Routed(nn.Module):
    """The same layers called in the same order, BatchNorm fed by the Linear with a bias or by the one without,
    or called twice."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(27, 10)
        self.a = nn.Linear(30, 40)
        self.b = nn.Linear(30, 40, bias=False)
        self.bn = nn.BatchNorm1d(40)
        self.act = nn.Tanh()
        self.out = nn.Linear(40, 27)
        self.route = "a"

    def forward(self, x):
        h = self.emb(x).flatten(1)
        with_bias, without = self.a(h), self.b(h)
        h = self.bn(with_bias if self.route in ("a", "twice") else without)
        if self.route == "twice":
            h = self.bn(h)
        return self.out(self.act(h))


class _KernelWithoutReplay:
    """The compiled kernel's reductions, without its Replay: the forward hook's common case done in Python."""

    def __init__(self, kernel):
        self.VERSION, self.reduce, self.addresses = kernel.VERSION, kernel.reduce, kernel.addresses


@pytest.fixture(params=["replay-in-c", "replay-in-python"])
def replay(request, monkeypatch):
    if probes._kernel is None:
        pytest.skip("the compiled kernel is not built")
    if request.param == "replay-in-python":
        monkeypatch.setattr(probes, "_kernel", _KernelWithoutReplay(probes._kernel))
    return request.param


def test_each_step_is_recorded_as_its_own_route_took_it(replay):
    """A sampled pass that repeats the last one's layers is recorded from what the last one worked out (by the
    kernel's Replay, or in Python); one that takes another route, or another batch size, is told apart: every
    step's layers, their inputs and the bias-before-norm finding are those a fresh `check` of the same batch
    reports."""
    model = _Routed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(4)
    routes = [("a", 32), ("a", 32), ("b", 32), ("b", 32), ("b", 16), ("twice", 16), ("twice", 16), ("a", 32)]

    def seen(report):
        return ([(lay.name, lay.input_from, lay.shape) for lay in report.layers],
                sorted(f.where for f in report.findings if f.code == "bias-before-norm"))

    steps = []
    with nnvitals.Monitor(model, every=1) as mon:
        for route, batch in routes:
            model.route = route
            x, y = torch.randint(0, 27, (batch, 3), generator=g), torch.randint(0, 27, (batch,), generator=g)
            one_step(model, opt, x, y, mon)
            mon.pause()  # check's own pass is not one of the Monitor's
            steps.append(seen(mon.report()))
            assert steps[-1] == seen(nnvitals.check(model, x, y)), (route, batch)
            mon.resume()
    inputs_of_bn = [[src for name, src, _ in layers if name.startswith("bn")] for layers, _ in steps]
    assert inputs_of_bn == [["a"], ["a"], ["b"], ["b"], ["b"], ["a", "bn"], ["a", "bn"], ["a"]]
    assert [wasted for _, wasted in steps] == [["a.bias"]] * 2 + [[]] * 3 + [["a.bias"]] * 3
    assert [layers[0][2][0] for layers, _ in steps] == [32, 32, 32, 32, 16, 16, 16, 32]


def test_the_replay_in_c_records_what_the_python_one_does(monkeypatch):
    """Monitor histories of the same training (the lesson's deep network with an in-place ReLU after a Linear and
    a bias before the second BatchNorm, the first going into eval mode for the last steps; sampled every step and every
    3rd) are equal number for number, and the findings alike, with the forward hook's common case in C and in
    Python."""
    if probes._kernel is None:
        pytest.skip("the compiled kernel is not built")

    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(27, 10)
            self.body = nn.Sequential(*[m for i in range(3) for m in (nn.Linear(30 if i == 0 else 64, 64, bias=i == 1),
                                                                        nn.BatchNorm1d(64), nn.Tanh())])
            self.lin = nn.Linear(64, 64)
            self.relu = nn.ReLU(inplace=True)  # changes the Linear's output in place: copied, in Python
            self.out = nn.Linear(64, 27)

        def forward(self, x):
            return self.out(self.relu(self.lin(self.body(self.emb(x).flatten(1)))))

    def history(every):
        torch.manual_seed(0)
        model = Deep()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        with nnvitals.Monitor(model, every=every) as mon:
            for step in range(7):
                if step == 5:
                    model.body[1].eval()  # a BatchNorm left in eval mode while training
                x, y = torch.randint(0, 27, (32, 3), generator=g), torch.randint(0, 27, (32,), generator=g)
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                mon.step(loss)
        stats = mon.report().stats
        return mon.history, [f.code for f in mon.findings()], (stats.output_name, stats.output_shape,
                                                                stats.output_params)

    kernel = probes._kernel
    for every in (1, 3):
        in_c = history(every)
        monkeypatch.setattr(probes, "_kernel", _KernelWithoutReplay(kernel))
        in_python = history(every)
        monkeypatch.undo()
        assert in_c == in_python
        assert len(in_c[0]) == len(range(0, 7, every)) and "lin" in in_c[0][-1]["layers"]
        assert {"bias-before-norm", "train-eval-mode"} <= set(in_c[1])
        assert in_c[2] == ("out", (32, 27), [("out.bias", "zero"), ("out.weight", "scale")])


def test_a_pass_like_the_last_one_gets_the_numbers_of_one_worked_out_afresh(monkeypatch):
    """A sampled pass that made the same records as the last one is collected with the last one's layout
    (`Recorder._collect_steady`); its history is the same number for number as when every pass is worked out
    afresh, through a BatchNorm put in eval mode and a smaller batch midway, at every step and every 2nd; the pass
    with the smaller batch is worked out afresh. (A pass where some output was changed in place, by an in-place ReLU
    say, always is: its gradient is not taken as it came.)"""
    if probes._kernel is None:
        pytest.skip("the compiled kernel is not built")

    def history(every, steady):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(27, 10), nn.Flatten(), nn.Linear(30, 64), nn.BatchNorm1d(64), nn.Tanh(),
                              nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 27))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        used = {}  # sampled step -> whether it was collected with the last pass's layout
        collect_steady = probes.Recorder._collect_steady

        def counted(self, *args):
            raw = collect_steady(self, *args) if steady else None
            used[step] = raw is not None
            return raw

        monkeypatch.setattr(probes.Recorder, "_collect_steady", counted)
        with nnvitals.Monitor(model, every=every) as mon:
            for step in range(12):
                if step == 6:
                    model[3].eval()
                batch = 16 if step >= 9 else 32
                x, y = torch.randint(0, 27, (batch, 3), generator=g), torch.randint(0, 27, (batch,), generator=g)
                one_step(model, opt, x, y, mon)
        monkeypatch.undo()
        return mon.history, [f.code for f in mon.findings()], used

    for every in (1, 2):
        repeated, afresh = history(every, True), history(every, False)
        assert repeated[:2] == afresh[:2]
        assert all(row["params"]["7.weight"]["update_ratio"] is not None for row in repeated[0])
        assert "train-eval-mode" in repeated[1]
        used = repeated[2]
        assert sum(used.values()) >= (6 if every == 1 else 2), used
        assert used[9 if every == 1 else 10] is False  # (the first sample with the smaller batch)
        assert used.get(6) is True and used.get(11, True) is True  # (in eval mode; the second with the smaller one)


def test_the_passes_a_monitor_keeps_give_the_garbage_collector_little_to_go_through():
    """A Monitor keeps up to thousands of sampled passes. Each one's own lists and objects would be more for
    Python's cyclic garbage collector to go through, and full collections of a process with torch loaded take
    tenths of a second: passes that differ only in their numbers share everything else."""
    model, x, y = M.healthy_deep_tanh()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with nnvitals.Monitor(model, every=1) as mon:
        for _ in range(5):
            one_step(model, opt, x, y, mon)
        gc.collect()
        before = {id(o) for o in gc.get_objects()}
        for _ in range(40):
            one_step(model, opt, x, y, mon)
        gc.collect()
        kept = [o for o in gc.get_objects() if id(o) not in before]
    # per pass: the pass, its entry in the history, the loss; then and again a list (17 each before they shared)
    assert len(kept) / 40 < 5, sorted({type(o).__name__ for o in kept})
    rows = mon.history
    assert len(rows) == 45 and rows[-1]["loss"] < rows[5]["loss"]
    assert rows[5]["layers"] != rows[-1]["layers"]  # the numbers are each pass's own


@pytest.mark.parametrize("how", ["monitor", "check"])
def test_a_watched_model_is_freed_once_the_user_lets_it_go(how):
    """Nothing of a Monitor's or a check's keeps the model alive after it: a notebook that builds and watches model
    after model gets its memory back (the kernel's Replay is among the hooks that hold the recorder)."""
    alive = []
    for _ in range(3):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
        x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        if how == "check":
            nnvitals.check(model, x, y)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            with nnvitals.Monitor(model, every=1) as mon:
                for _ in range(4):  # (the later passes are watched by the kernel's Replay, where it is built)
                    loss = nn.functional.cross_entropy(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    mon.step(loss)
            assert mon.findings() is not None
            del opt, mon, loss
        alive.append(weakref.ref(model))
        del model
    gc.collect()
    assert [ref() is None for ref in alive] == [True] * 3


class _Scaled(nn.Module):
    """Float inputs, passed by keyword."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 16)
        self.act = nn.Tanh()
        self.out = nn.Linear(16, 3)

    def forward(self, *, x):
        return self.out(self.act(self.lin(x)))


def test_a_nan_in_the_inputs_is_reported_with_the_replay_in_c_or_in_python(replay):
    """The model's inputs are checked for NaN/Inf on sampled steps, keyword arguments too, and its output
    layer named, whichever does the forward hook's common case."""
    torch.manual_seed(0)
    model = _Scaled()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with nnvitals.Monitor(model, every=2) as mon:
        for step in range(5):
            x = torch.randn(16, 4, generator=g)
            if step == 4:
                x[2, 1] = float("nan")
            loss = nn.functional.cross_entropy(model(x=x), torch.randint(0, 3, (16,), generator=g))
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss)
            if step == 2:  # a clean sampled step: nothing to report
                assert "nonfinite" not in [f.code for f in mon.findings()]
    report = mon.report()
    assert [f.where for f in report.findings if f.code == "nonfinite"][:1] == ["input"]
    assert (report.stats.output_name, report.stats.output_shape) == ("out", (16, 3))


class _Parts(nn.Module):
    """A body and a head, and an extra head that a loop may call outside the model's own call."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Embedding(27, 10), nn.Flatten(), nn.Linear(30, 64), nn.Tanh())
        self.head = nn.Linear(64, 27)
        self.aux = nn.Sequential(nn.Linear(64, 8), nn.Tanh())
        self.fail = False

    def forward(self, x):
        h = self.body(x)
        if self.fail:
            raise RuntimeError("a forward that raises")
        return self.head(h)


def _train_parts(model, how, steps=5, every=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(2)
    armed = []
    with nnvitals.Monitor(model, every=every) as mon:
        for _ in range(steps):
            x, y = torch.randint(0, 27, (16, 3), generator=g), torch.randint(0, 27, (16,), generator=g)
            if how == "parts":  # the model itself never called
                logits = model.head(model.body(x))
                loss = nn.functional.cross_entropy(logits, y)
            else:
                loss = nn.functional.cross_entropy(model(x), y)
                if how == "model and aux":
                    loss = loss + model.aux(model.body(x)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss)
            armed.append(bool(torch.nn.modules.module._global_forward_hooks))
    return mon, armed


def _no_instance_forward(model):
    return all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("how", ["model", "parts", "model and aux"])
def test_each_sample_records_every_layer_however_the_loop_calls_them(how):
    """Once a sample has shown that the loop calls the layers only inside the model's own call, the Monitor watches
    them without a process-wide hook (other models in the process are not slowed); layers called outside that call
    keep the process-wide hook, so they are recorded on every sample all the same. Between steps no module carries
    anything of the Monitor's (the model can be copied and pickled)."""
    model = _Parts()
    mon, armed = _train_parts(model, how)
    wanted = {"body.0", "body.2", "body.3", "head"} | ({"aux.0", "aux.1"} if how == "model and aux" else set())
    for row in mon.history:
        assert set(row["layers"]) >= wanted, row["step"]
        assert all(row["layers"][name]["grad_std"] for name in wanted)
    if probes._kernel is not None:
        assert armed[-1] == (how != "model")  # armed for the next step: process-wide only where it must be
    assert _no_instance_forward(model)
    copy.deepcopy(model)
    pickle.dumps(model)


def test_a_forward_that_raises_leaves_the_modules_as_they_were():
    """An exception in the model's forward on a sampled step, watched module by module, reaches the caller and
    leaves every module as it was (a forward the user set on an instance included); the next sample still records
    the model's layers, through the user's own forward where there is one."""
    model = _Parts()
    calls = []

    def own_forward(x, _head=model.head):
        calls.append(len(x))
        return nn.Linear.forward(_head, x)

    model.head.forward = own_forward
    mon, _ = _train_parts(model, "model", steps=3)
    with mon:
        model.fail = True
        with pytest.raises(RuntimeError, match="a forward that raises"):
            model(torch.zeros(4, 3, dtype=torch.long))
        assert vars(model.head)["forward"] is own_forward
        assert all("forward" not in vars(m) for m in model.modules() if m is not model.head)
        model.fail = False
        before = len(mon.history)
        x, y = torch.randint(0, 27, (16, 3)), torch.randint(0, 27, (16,))
        nn.functional.cross_entropy(model(x), y).backward()
        mon.step()
    assert len(mon.history) == before + 1 and {"body.2", "head"} <= set(mon.history[-1]["layers"])
    assert calls == [16] * 4  # three steps and the last one (the failed call raised before the head)
