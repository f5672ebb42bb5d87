// The lab page: start one run in the background, follow it, cancel it; the server keeps the state,
// so a reload picks the run up where it is.
"use strict";

const byId = (id) => document.getElementById(id);
const RUNNING = new Set(["running", "cancelling"]);
let pollPending = false; // a poll is waiting or in flight: never two at once
let lastState = null; // null until the first answer

function stageRow(stage) {
  const tr = document.createElement("tr");
  tr.className = `stage ${stage.state}`;
  const name = document.createElement("td");
  name.textContent = stage.name;
  const bar = document.createElement("td");
  const progress = document.createElement("progress");
  progress.max = stage.steps || 1;
  progress.value = stage.state === "done" ? progress.max : stage.step;
  bar.append(progress);
  const text = document.createElement("td");
  const steps = stage.steps ? `${stage.step.toLocaleString()} / ${stage.steps.toLocaleString()} steps` : "";
  const loss = stage.loss === null ? "" : stage.state === "done" ? ` · val loss ${stage.loss.toFixed(4)}`
    : ` · loss ${stage.loss.toFixed(4)}`;
  text.textContent = `${stage.state}${steps ? " · " + steps : ""}${loss}`;
  tr.append(name, bar, text);
  return tr;
}

async function refreshRuns() {
  const error = byId("runs-error");
  try {
    const response = await fetch("/lab/runs");
    if (!response.ok) throw new Error(`the server answered ${response.status}`);
    byId("runs").innerHTML = await response.text(); // rendered and escaped by the server
    error.textContent = "";
  } catch (e) {
    const why = e instanceof TypeError ? "the server cannot be reached" : e.message;
    error.textContent = `The list of runs could not be refreshed (${why}); reload the page to try again.`;
  }
}

function show(job) {
  const running = RUNNING.has(job.state);
  byId("start-job").disabled = running;
  byId("job-progress").hidden = job.state === "idle";
  byId("cancel-job").hidden = !running;
  byId("cancel-job").disabled = job.state === "cancelling";
  byId("job-bar").value = job.fraction;
  byId("job-stages").replaceChildren(...job.stages.map(stageRow));
  const seconds = `${Math.round(job.seconds)} s`;
  const words = {
    running: `Running ${job.run_id}: ${Math.round(100 * job.fraction)}% after ${seconds}.`,
    cancelling: `Stopping ${job.run_id} at the next step; a checkpoint is being saved.`,
    cancelled: `Cancelled ${job.run_id} after ${seconds}. Its checkpoints are kept.`,
    finished: `Finished ${job.run_id} in ${seconds}: its report is in the list below.`,
    failed: `The run ${job.run_id} failed: ${job.message}`,
  };
  const state = byId("job-state");
  state.textContent = words[job.state] || "";
  state.className = job.state;
  if (job.state === "finished") {
    const link = document.createElement("a");
    link.href = `/lab/runs/${encodeURIComponent(job.run_id)}`;
    link.textContent = "Open the report";
    link.id = "job-report";
    state.append(" ", link);
  }
  // The list was rendered with the page: a run that ended since (even before this first look) is out of date.
  const first = lastState === null;
  if ((first && job.state !== "idle") || (RUNNING.has(lastState) && !running)) refreshRuns();
  lastState = job.state;
  if (running) schedulePoll(500);
}

function schedulePoll(ms) {
  if (pollPending) return;
  pollPending = true;
  setTimeout(poll, ms);
}

// Each poll schedules the next once it has its answer, so a slow answer never overlaps the next question.
async function poll() {
  let wait = 500;
  try {
    const job = await api("/api/lab/job");
    pollPending = false;
    show(job);
    return;
  } catch (e) {
    byId("job-error").textContent = e.message;
    wait = 2000;
  }
  pollPending = false;
  if (lastState === null || RUNNING.has(lastState)) schedulePoll(wait);
}

byId("job-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  byId("job-error").textContent = "";
  const stages = [...form.querySelectorAll("input[name=stage]:checked")].map((i) => i.value);
  const stepsText = form.elements.steps.value.trim().replaceAll(",", "").replaceAll("_", "");
  const body = { stages };
  if (stepsText) body.steps = /^\d+$/.test(stepsText) ? Number(stepsText) : stepsText;
  try {
    const job = await api("/api/lab/job", { method: "POST", body });
    refreshRuns();
    show(job);
  } catch (e) {
    byId("job-error").textContent = e.message;
  }
});

byId("cancel-job").addEventListener("click", async () => {
  try {
    show(await api("/api/lab/job/cancel", { method: "POST" }));
  } catch (e) {
    byId("job-error").textContent = e.message;
  }
});

pollPending = true;
poll();
