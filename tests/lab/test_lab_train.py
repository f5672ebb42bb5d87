import pytest
import torch
import torch.nn.functional as F

from nnvitals.lab import data, models, train


def test_profiles_and_schedules():
    quick = train.schedule_for("kaiming", "quick")
    assert (quick.steps, quick.decay_at) == (20_000, 10_000)
    full = train.schedule_for("kaiming", "full")
    assert (full.steps, full.decay_at, full.lr, full.lr_after) == (200_000, 100_000, 0.1, 0.01)
    assert train.schedule_for("deep", "full").decay_at == 150_000
    assert train.schedule_for("deep", "quick", steps=1000).decay_at == 750
    assert [full.lr_at(s) for s in (0, 99_999, 100_000)] == [0.1, 0.1, 0.01]
    with pytest.raises(ValueError, match="profile"):
        train.schedule_for("naive", "slow")


def fresh(stage, splits, seed=5):
    g = torch.Generator().manual_seed(seed)
    return models.build(stage, splits.vocab.size, g), g


def run(stage, splits, steps, **kwargs):
    model, g = fresh(stage, splits)
    progress = train.train(model, splits.train, g, train.Schedule(steps, steps // 2), train.Progress.fresh(g), **kwargs)
    return model, progress


@pytest.mark.parametrize("stage", ["kaiming", "batchnorm"])
def test_training_takes_the_same_batches_and_steps_as_a_plain_loop(stage, words27, monkeypatch):
    """Indices drawn in blocks are the ones one randint per step gives; updates are plain SGD; the one-layer
    network's written-out backward gives autograd's numbers bit for bit."""
    monkeypatch.setattr(train, "CHUNK", 16)
    splits = data.split(words27)
    steps = 40
    model, progress = run(stage, splits, steps)

    ref, g = fresh(stage, splits)
    losses = []
    for i in range(steps):
        ix = torch.randint(0, len(splits.train), (32,), generator=g)
        loss = F.cross_entropy(ref(splits.train.X[ix]), splits.train.Y[ix])
        ref.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(p.grad, alpha=-(0.1 if i < steps // 2 else 0.01))
        losses.append(loss.item())
    assert progress.losses.tolist() == pytest.approx(losses, abs=0, rel=0)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("stop_at", [7, 16, 33])
def test_an_interrupted_run_continues_to_exactly_the_same_numbers(stop_at, words27, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "CHUNK", 16)
    monkeypatch.setattr(train, "CHECKPOINT_EVERY", 32)
    splits = data.split(words27)
    steps = 50
    whole, whole_progress = run("batchnorm", splits, steps)

    flag = train.StopFlag()
    checkpoint = tmp_path / "checkpoint.pt"

    def on_progress(step, loss):
        if step >= stop_at:
            flag.set()

    monkeypatch.setattr(train, "LOG_EVERY", 1)
    with pytest.raises(train.Interrupted) as stopped:
        run("batchnorm", splits, steps, checkpoint=checkpoint, stop=flag, on_progress=on_progress)
    assert stopped.value.step == stop_at

    model, g = fresh("batchnorm", splits)  # a new process would start from a fresh model too
    schedule = train.Schedule(steps, steps // 2)
    progress = train.load_checkpoint(checkpoint, model, schedule)
    assert progress.step == stop_at
    final = train.train(model, splits.train, g, schedule, progress, checkpoint=checkpoint)
    assert torch.equal(final.losses, whole_progress.losses)
    for (name, a), b in zip(model.state_dict().items(), whole.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_checkpoint_for_another_schedule_is_refused(words27, tmp_path):
    splits = data.split(words27)
    run("kaiming", splits, 5, checkpoint=tmp_path / "c.pt")
    model, _ = fresh("kaiming", splits)
    with pytest.raises(ValueError, match="another schedule"):
        train.load_checkpoint(tmp_path / "c.pt", model, train.Schedule(6, 3))


def test_ctrl_c_becomes_a_stop_request():
    import os
    import signal

    before = signal.getsignal(signal.SIGINT)
    flag = train.StopFlag()
    with train.stop_on_sigint(flag):
        os.kill(os.getpid(), signal.SIGINT)
    assert flag.requested
    assert signal.getsignal(signal.SIGINT) is before
