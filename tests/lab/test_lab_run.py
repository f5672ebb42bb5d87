import base64
import json
import re

import pytest

from nnvitals.lab import diagnose, experiment, train
from nnvitals.lab.data import read_words

STEPS = "30"


def lab(run_cli, *args):
    code, out, err = run_cli("lab", *args)
    return code, out, err


def stage_numbers(summary):
    keys = ("start_loss_batch", "start_loss_train", "train_loss", "val_loss", "test_loss", "val_loss_calibrated",
            "findings", "findings_end", "saturation_init", "samples", "loss_curve")
    return {s["name"]: {k: s.get(k) for k in keys} for s in summary["stages"]}


def test_lab_json_summary_and_self_contained_report(run_cli, word_file, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = lab(run_cli, "--data", str(word_file), "--stages", "kaiming,naive", "--steps", STEPS,
                            "--out", str(out), "--json", "--jobs", "1")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["dataset"]["words"] == 240 and summary["dataset"]["vocab_size"] == 27
    assert summary["dataset"]["baseline"] == pytest.approx(3.2958, abs=1e-4)
    assert summary["dataset"]["path"] == str(word_file) and not summary["dataset"]["lesson_data"]
    assert summary["profile"] == "quick"
    naive, kaiming = summary["stages"]  # the lesson's order, whatever the order asked
    assert (naive["name"], kaiming["name"]) == ("naive", "kaiming")
    assert naive["verdict"] == "too-high" and "start-loss-high" in naive["findings"]
    assert kaiming["verdict"] == "healthy" and "start-loss-high" not in kaiming["findings"]
    assert naive["saturation_init"] > kaiming["saturation_init"]
    for st in (naive, kaiming):
        assert st["steps"] == 30 and len(st["samples"]) == 20
        assert {"train_loss", "val_loss", "test_loss", "seconds", "start_loss_train"} <= set(st)
        assert "val_loss_calibrated" not in st
    assert json.loads((out / "summary.json").read_text()) == summary

    page = (out / "report.html").read_text()
    images = re.findall(r'<img[^>]*src="([^"]*)"', page)
    assert len(images) >= 1 + 2 * 2 * 3  # loss curve, and 3 pictures per stage at init and at the end
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert base64.b64decode(images[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http" not in page  # nothing to fetch: the page stands alone
    assert "figures do not apply" in page and "notebook train" not in page  # not the lesson's data
    assert (out / "naive" / "init" / "saturation.png").is_file() and (out / "loss.png").is_file()
    assert (out / "kaiming" / "checkpoint.pt").is_file()


def test_lab_terminal_output(run_cli, word_file, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = lab(run_cli, "--data", str(word_file), "--stages", "batchnorm", "--steps", STEPS,
                            "--out", str(out))
    assert code == 0, err
    stdout = " ".join(stdout.split())
    assert "240 words, 27 symbols (uniform baseline 3.2958 nats for 27 classes)" in stdout
    assert "healthy" in stdout and "calibrated over the whole training split" in stdout
    assert "caveat 1" in stdout and "caveat 2" in stdout and "samples:" in stdout
    assert "lab results" in stdout and f"report: {out / 'report.html'}" in stdout
    result = json.loads((out / "batchnorm" / "result.json").read_text())
    c = result["caveats"]
    assert c["train_mode"]["max_logit_change"] > 1e-3  # batchmates matter in training mode
    assert c["eval_mode"]["max_logit_change"] == 0.0  # and not in eval mode
    assert c["alone_eval"]["max_logit_difference"] < 1e-5  # one example alone gives its in-batch value
    assert {"train_loss_calibrated", "val_loss_calibrated", "test_loss_calibrated"} <= set(result)


def test_interrupted_lab_resumes_to_the_uninterrupted_numbers(word_file, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "CHUNK", 16)
    monkeypatch.setattr(train, "LOG_EVERY", 5)
    monkeypatch.setattr(diagnose, "MONITOR_EVERY", 8)
    words = read_words(word_file)
    config = experiment.LabConfig(("batchnorm", "deep"), "quick", 40, 11)

    def quiet(event):
        pass

    whole_dir = tmp_path / "whole"
    experiment.start_run(whole_dir, config, words)
    whole = experiment.run(whole_dir, config, words, quiet, jobs=1)

    parts_dir = tmp_path / "parts"
    experiment.start_run(parts_dir, config, words)
    stop = train.StopFlag()

    def stop_in_deep(event):
        if event["event"] == "progress" and event["stage"] == "deep" and event["step"] >= 25:
            stop.set()

    first = experiment.run(parts_dir, config, words, stop_in_deep, jobs=1, stop=stop)
    assert first.interrupted and first.summary is None
    assert (parts_dir / "batchnorm" / "result.json").is_file()
    assert not (parts_dir / "deep" / "result.json").exists() and (parts_dir / "deep" / "checkpoint.pt").is_file()

    config2, words2 = experiment.open_run(parts_dir)
    assert config2 == config
    events = []
    second = experiment.run(parts_dir, config2, words2, events.append, jobs=1)
    assert not second.interrupted
    starts = [e for e in events if e["event"] == "start"]
    assert [(e["stage"], e["step"]) for e in starts] == [("deep", 25)]
    assert stage_numbers(second.summary) == stage_numbers(whole.summary)
    monitor = {s["name"]: s["diagnosis"]["training"] for s in second.summary["stages"]}["deep"]
    assert monitor == {s["name"]: s["diagnosis"]["training"] for s in whole.summary["stages"]}["deep"]
    picture = "deep/training/update_ratio.png"  # drawn from the Monitor's whole history
    assert (parts_dir / picture).read_bytes() == (whole_dir / picture).read_bytes()


def test_stages_in_worker_processes_give_the_in_process_numbers(word_file, tmp_path):
    words = read_words(word_file)
    config = experiment.LabConfig(("fix-tanh", "batchnorm"), "quick", 20, 3)
    results = []
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        experiment.start_run(out, config, words)
        events = []
        outcome = experiment.run(out, config, words, events.append, jobs=jobs)
        assert {e["stage"] for e in events if e["event"] == "done"} == {"fix-tanh", "batchnorm"}
        results.append(stage_numbers(outcome.summary))
    assert results[0] == results[1]


def test_resume_of_a_finished_run_redoes_nothing(run_cli, word_file, tmp_path):
    out = tmp_path / "run"
    assert lab(run_cli, "--data", str(word_file), "--stages", "fix-tanh", "--steps", "10", "--out", str(out))[0] == 0
    before = (out / "fix-tanh" / "result.json").read_text()
    code, stdout, _ = lab(run_cli, "--resume", str(out))
    assert code == 0 and "done in an earlier session" in stdout
    assert (out / "fix-tanh" / "result.json").read_text() == before


@pytest.mark.parametrize(("args", "message"), [
    (["--stages", "naive,bogus"], "unknown stage 'bogus'"),
    (["--steps", "0"], "--steps"),
    (["--profile", "slow"], "--profile"),
    (["--resume", "{tmp}/nothing"], "holds no lab run"),
    (["--resume", "{tmp}", "--profile", "full"], "drop --profile"),
    (["--data", "{tmp}/missing.txt"], "no such file"),
])
def test_bad_input_is_one_error_line(run_cli, tmp_path, args, message):
    code, out, err = lab(run_cli, *[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_out_folder_with_a_run_is_not_overwritten(run_cli, word_file, tmp_path):
    out = tmp_path / "run"
    assert lab(run_cli, "--data", str(word_file), "--stages", "fix-tanh", "--steps", "5", "--out", str(out))[0] == 0
    code, _, err = lab(run_cli, "--data", str(word_file), "--out", str(out))
    assert code == 2 and "already holds a lab run" in err and "--resume" in err


def test_changed_data_cannot_be_resumed(run_cli, word_file, tmp_path):
    out = tmp_path / "run"
    assert lab(run_cli, "--data", str(word_file), "--stages", "fix-tanh", "--steps", "5", "--out", str(out))[0] == 0
    word_file.write_text(word_file.read_text() + "extra\n")
    code, _, err = lab(run_cli, "--resume", str(out))
    assert code == 2 and "changed since the run started" in err


def test_a_damaged_checkpoint_is_a_clear_error(run_cli, word_file, tmp_path):
    out = tmp_path / "run"
    assert lab(run_cli, "--data", str(word_file), "--stages", "fix-tanh", "--steps", "5", "--out", str(out))[0] == 0
    (out / "fix-tanh" / "result.json").unlink()
    (out / "fix-tanh" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    code, _, err = lab(run_cli, "--resume", str(out))
    assert code == 2 and "cannot be continued" in err and len(err.strip().splitlines()) == 1


def test_the_smallest_word_list_runs_every_batchnorm_demonstration(run_cli, tmp_path):
    words = tmp_path / "ten.txt"
    words.write_text("\n".join(["ann", "bob", "cy", "dee", "eve", "flo", "gus", "hal", "ivy", "jo"]))
    code, stdout, err = lab(run_cli, "--data", str(words), "--stages", "batchnorm,deep", "--steps", "5",
                            "--out", str(tmp_path / "run"), "--json", "--jobs", "1")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["dataset"]["split_words"] == {"train": 8, "val": 1, "test": 1}
    assert all(st["caveats"]["eval_mode"]["max_logit_change"] == 0.0 for st in summary["stages"])
