"""What a lab run leaves behind: summary.json, loss.png and a self-contained report.html.

summary.json
------------
    {
      "nnvitals": version,
      "dataset": {
        "path":         the word list's file, or null for the embedded default,
        "source":       "file" (--data), "env" ($NNVITALS_DATA), "cache" (nnvitals data fetch) or "embedded",
        "description":  the same for people,
        "sha256":       of the file (of the newline-joined words for the embedded default),
        "lesson_data":  true when the file is the lesson's names.txt, byte for byte,
        "words":        number of words,
        "vocab_size":   distinct characters plus the '.' marker,
        "baseline":     ln(vocab_size), the loss of a uniform guess, in nats,
        "split_words", "examples": {"train", "val", "test"} counts after the 80/10/10 split
      },
      "profile": "quick" or "full",  "steps": the --steps override or null,  "seed": the generator's seed,
      "stages": [ one object per stage, in the order asked:
        "name", "title":            the stage and what changes in it,
        "parameters":               number of trainable numbers,
        "start_loss_batch":         loss on the first minibatch before training (step 0),
        "start_loss_train":         loss over the whole training split before training,
        "baseline":                 ln(vocab_size) again, for reading the two above,
        "verdict":                  numbers.judge_start_loss on start_loss_batch: healthy, too-high, too-low,
        "verdict_message":          why,
        "findings":                 the doctor's finding codes at initialisation (first minibatch),
        "findings_end":             the same after training,
        "findings_training":        (deep only) the Monitor's codes over the run,
        "saturation_init":          share (0-1) of tanh outputs beyond +-0.97 on the first minibatch,
        "saturation_end":           the same after training,
        "train_loss", "val_loss", "test_loss":
                                    mean loss over each whole split after training, in eval mode
                                    (BatchNorm layers use their running statistics),
        "train_loss_calibrated", "val_loss_calibrated", "test_loss_calibrated":
                                    (BatchNorm stages) the same with statistics calibrated over the whole
                                    training split after training,
        "caveats":                  (BatchNorm stages) one example's loss and largest logit change when its
                                    batchmates change, in training and in eval mode, and evaluated alone,
        "samples":                  20 words drawn from the trained model,
        "last_batch_loss":          the loss of the last training minibatch,
        "seconds", "steps", "steps_per_second", "schedule": {"steps", "decay_at", "lr", "lr_after"},
        "loss_curve":               {"every": k, "mean_loss": means of the training loss over k steps},
        "diagnosis":                the doctor's findings in full ("init", "end", "training"), each with
                                    "codes", "findings" (code, severity, where, evidence, message, fix),
                                    "saturation", "tanh_layers" and "plots" (paths inside the run folder),
        "reference":                (lesson data only) the notebook's figures for the stage
      ],
      "reference_source":  where the reference figures come from (lesson data only),
      "report": "report.html",  "loss_plot": "loss.png"
    }

Losses are natural-log cross-entropies in nats; paths inside the run are relative to its folder.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

import nnvitals
from nnvitals.lab import reference
from nnvitals.lab.data import write_atomic
from nnvitals.lab.experiment import SUMMARY_FILE, LabConfig, write_json

REPORT_FILE = "report.html"
LOSS_PLOT = "loss.png"


def summary(dataset: dict[str, Any], config: LabConfig, results: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    stages = []
    for r in results:
        stage = dict(r)
        if dataset["lesson_data"]:
            stage["reference"] = reference.for_stage(r["name"])
        stages.append(stage)
    s: dict[str, Any] = {
        "nnvitals": nnvitals.__version__,
        "dataset": dataset,
        "profile": config.profile,
        "steps": config.steps,
        "seed": config.seed,
        "stages": stages,
        "report": REPORT_FILE,
        "loss_plot": LOSS_PLOT,
        "out": str(out),
    }
    if dataset["lesson_data"]:
        s["reference_source"] = reference.SOURCE
    return s


def write(out: Path, summary: dict[str, Any]) -> None:
    """summary.json, loss.png and report.html into `out`, each written atomically."""
    write_json(out / SUMMARY_FILE, summary)
    png = loss_plot(summary)
    write_atomic(out / LOSS_PLOT, png)
    write_atomic(out / REPORT_FILE, render(summary, out, png).encode())


def loss_plot(summary: dict[str, Any]) -> bytes:
    """The training loss of every stage, as log10 of the mean over windows of steps."""
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for st in summary["stages"]:
        curve = st["loss_curve"]
        ys = [math.log10(v) for v in curve["mean_loss"] if v > 0]
        xs = [curve["every"] * (i + 0.5) for i in range(len(ys))]
        ax.plot(xs, ys, label=st["name"], linewidth=1.2)
    baseline = summary["dataset"]["baseline"]
    ax.axhline(math.log10(baseline), color="k", linestyle="--", linewidth=1,
               label=f"uniform baseline ln({summary['dataset']['vocab_size']}) = {baseline:.2f}")
    ax.set_title("training loss (minibatch loss averaged over windows of steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("log10 loss")
    ax.legend(fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


# --- report.html ---------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,-apple-system,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.ref{color:#555;background:#fafaf0}
.too-high,.error{color:#b00}.too-low,.warning{color:#a60}.healthy{color:#070}.info{color:#456}
img{max-width:100%;border:1px solid #eee;margin:.3em 0}code{background:#f4f4f4;padding:0 .2em}
.samples{font-family:monospace}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _num(x: Any, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _pct(x: Any) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _findings(findings: list[dict[str, Any]]) -> str:
    if not findings:
        return "<p>No findings: the doctor saw nothing wrong.</p>"
    rows = "".join(
        f'<tr><td class="l {_e(f["severity"])}">{_e(f["severity"])}</td><td class="l"><code>{_e(f["code"])}</code></td>'
        f'<td class="l">{_e(f["where"])}</td><td class="l">{_e(f["message"])}<br><b>fix:</b> {_e(f["fix"])}</td></tr>'
        for f in findings)
    return f'<table><tr><th class="l">severity</th><th class="l">code</th><th class="l">where</th>' \
           f'<th class="l">finding</th></tr>{rows}</table>'


def _overview(summary: dict[str, Any]) -> str:
    lesson = summary["dataset"]["lesson_data"]
    head = ["stage", "parameters", "step-0 loss", "start (train split)", "verdict", "saturated at init",
            "train", "val", "test", "val (calibrated BN)", "seconds"]
    if lesson:
        head[3:3] = ["notebook step-0"]
        head += ["notebook train", "notebook val"]
    rows = []
    for st in summary["stages"]:
        ref = st.get("reference", {})
        cells = [f'<td class="l">{_e(st["name"])}</td>', f"<td>{st['parameters']:,}</td>",
                 f"<td>{_num(st['start_loss_batch'])}</td>"]
        if lesson:
            cells.append(f'<td class="ref">{_num(ref.get("start_loss_batch"))}</td>')
        cells += [f"<td>{_num(st['start_loss_train'])}</td>",
                  f'<td class="l {_e(st["verdict"])}">{_e(st["verdict"])}</td>',
                  f"<td>{_pct(st['saturation_init'])}</td>",
                  f"<td>{_num(st['train_loss'])}</td>", f"<td>{_num(st['val_loss'])}</td>",
                  f"<td>{_num(st['test_loss'])}</td>", f"<td>{_num(st.get('val_loss_calibrated'))}</td>",
                  f"<td>{st['seconds']:.0f}</td>"]
        if lesson:
            cells += [f'<td class="ref">{_num(ref.get("train_loss_calibrated", ref.get("train_loss")))}</td>',
                      f'<td class="ref">{_num(ref.get("val_loss_calibrated", ref.get("val_loss")))}</td>']
        rows.append("<tr>" + "".join(cells) + "</tr>")
    header = "".join(f'<th{" class=ref" if h.startswith("notebook") else ""}>{_e(h)}</th>' for h in head)
    return f"<table><tr>{header}</tr>{''.join(rows)}</table>"


def _caveats(c: dict[str, Any]) -> str:
    tr, ev, alone = c["train_mode"], c["eval_mode"], c["alone_eval"]
    return (
        f"<p>Caveats, on {_e(c['example'])}:</p><ul>"
        f"<li>training mode: its loss is {tr['loss_in_batch_a']:.4f} in one batch and {tr['loss_in_batch_b']:.4f} "
        f"in the other (logits move by up to {tr['max_logit_change']:.3g}): BatchNorm couples the examples "
        "of a batch.</li>"
        f"<li>eval mode: {ev['loss_in_batch_a']:.4f} and {ev['loss_in_batch_b']:.4f} (logits move by up to "
        f"{ev['max_logit_change']:.3g}): the running statistics make each example independent.</li>"
        f"<li>evaluated alone in eval mode: {alone['loss_alone']:.4f}, against {alone['loss_in_batch']:.4f} inside "
        f"the batch (largest logit difference {alone['max_logit_difference']:.3g}).</li></ul>")


def _stage(st: dict[str, Any], out: Path, lesson: bool) -> str:
    title = st["title"][:1].upper() + st["title"][1:]
    parts = [f'<h2 id="{_e(st["name"])}">{_e(st["name"])}</h2><p>{_e(title)}. '
             f'{st["parameters"]:,} parameters, {st["steps"]:,} steps of SGD '
             f'(lr {st["schedule"]["lr"]} until step {st["schedule"]["decay_at"]:,}, then '
             f'{st["schedule"]["lr_after"]}), {st["seconds"]:.0f} s.</p>',
             f'<p>Starting loss {st["start_loss_batch"]:.4f} on the first minibatch and '
             f'{st["start_loss_train"]:.4f} over the training split, against the uniform baseline '
             f'{st["baseline"]:.4f}: <b class="{_e(st["verdict"])}">{_e(st["verdict"])}</b>. '
             f'{_e(st["verdict_message"])}</p>']
    ref = st.get("reference") if lesson else None
    if ref:
        known = ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in ref.items())
        parts.append(f'<p class="ref">The notebook: {_e(known)}.</p>')
    diagnosis = st["diagnosis"]
    for key, heading in (("init", "At initialisation (first minibatch)"), ("training", "During training (Monitor)"),
                         ("end", "After training (same minibatch)")):
        d = diagnosis.get(key)
        if not d:
            continue
        sat = f" Tanh outputs beyond ±0.97: {_pct(d['saturation'])}." if d.get("saturation") is not None else ""
        parts.append(f"<h3>{heading}</h3><p>{sat}</p>{_findings(d['findings'])}")
        parts.append("".join(_img(out / p, Path(p).stem) for p in d["plots"]))
    parts.append(f"<p>Final loss: train {st['train_loss']:.4f}, val {st['val_loss']:.4f}, test {st['test_loss']:.4f}."
                 "</p>")
    if "val_loss_calibrated" in st:
        parts.append(
            "<table><tr><th class=l>BatchNorm statistics</th><th>train</th><th>val</th><th>test</th></tr>"
            f"<tr><td class=l>running (kept during training)</td><td>{_num(st['train_loss'])}</td>"
            f"<td>{_num(st['val_loss'])}</td><td>{_num(st['test_loss'])}</td></tr>"
            f"<tr><td class=l>calibrated over the training split</td><td>{_num(st['train_loss_calibrated'])}</td>"
            f"<td>{_num(st['val_loss_calibrated'])}</td><td>{_num(st['test_loss_calibrated'])}</td></tr></table>")
    if "caveats" in st:
        parts.append(_caveats(st["caveats"]))
    parts.append(f'<p>Samples: <span class="samples">{_e(", ".join(st["samples"]))}</span></p>')
    return "\n".join(parts)


def render(summary: dict[str, Any], out: Path, loss_png: bytes) -> str:
    """The report as one HTML page with every picture embedded."""
    ds = summary["dataset"]
    lesson = ds["lesson_data"]
    ref_note = (f"<p>The data is the lesson's names.txt, so the notebook's figures stand beside ours "
                f"(shaded; from {_e(summary['reference_source'])}).</p>" if lesson else
                "<p>The data is not the lesson's names.txt, so the notebook's figures do not apply.</p>")
    steps = f", {summary['steps']:,} steps" if summary["steps"] else ""
    loss_img = f'<img alt="training loss" src="data:image/png;base64,{base64.b64encode(loss_png).decode()}">'
    body = [
        "<h1>nnvitals lab: makemore part 3, stage by stage</h1>",
        f"<p>Dataset: {_e(ds['description'])}: {ds['words']:,} words, {ds['vocab_size']} symbols "
        f"(uniform baseline {ds['baseline']:.4f} nats); {ds['examples']['train']:,} / {ds['examples']['val']:,} / "
        f"{ds['examples']['test']:,} training / validation / test examples.</p>",
        f"<p>Profile {_e(summary['profile'])}{steps}, seed {summary['seed']}.</p>",
        ref_note,
        _overview(summary),
        loss_img,
        *(_stage(st, out, lesson) for st in summary["stages"]),
    ]
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>nnvitals lab report</title>'
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")
