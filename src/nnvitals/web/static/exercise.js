// The exercise page: the server checks the learner's figures and returns the worked solution.
"use strict";

function caseInputs(section) {
  const d = section.dataset;
  const inputs = { kind: d.kind };
  if (d.classes !== undefined) inputs.classes = Number(d.classes);
  if (d.loss !== undefined) inputs.loss = Number(d.loss);
  if (d.preactivation !== undefined) inputs.preactivation = Number(d.preactivation);
  return inputs;
}

async function checkCase(section) {
  const form = section.querySelector(".case-form");
  const inputs = [...form.querySelectorAll("input[name=answer]")];
  const error = form.querySelector(".form-error");
  error.textContent = "";
  inputs.forEach((input) => input.removeAttribute("aria-invalid"));
  let result;
  try {
    result = await api("/api/exercise/check", {
      method: "POST",
      body: { case: caseInputs(section), answers: inputs.map((i) => i.value) },
    });
  } catch (e) {
    for (const [field, msg] of Object.entries(e.fields || {})) {
      const m = /^answers\.(\d+)$/.exec(field);
      if (m && inputs[Number(m[1])]) inputs[Number(m[1])].setAttribute("aria-invalid", "true");
    }
    error.textContent = e.message;
    return;
  }
  const steps = section.querySelectorAll(".step");
  result.steps.forEach((step, i) => {
    const mark = steps[i].querySelector(".mark");
    mark.className = "mark " + (step.right === null ? "skipped" : step.right ? "right" : "wrong");
    if (step.right === null) mark.textContent = `skipped: it is ${step.shown}`;
    else if (step.right) mark.textContent = `right: ${step.shown}`;
    else mark.textContent = `not within ±${step.tolerance} of ${step.shown}`;
  });
  const worked = section.querySelector(".worked");
  const list = worked.querySelector(".solution");
  list.replaceChildren(...result.solution.map((line) => {
    const li = document.createElement("li");
    li.textContent = line;
    return li;
  }));
  worked.querySelector(".verdict").textContent = `Verdict: ${result.verdict}`;
  worked.hidden = false;
}

function watchCase(section) {
  section.querySelector(".case-form").addEventListener("submit", (event) => {
    event.preventDefault();
    checkCase(section);
  });
}

document.querySelectorAll("#cases .case").forEach(watchCase);

let drilled = 0;
document.getElementById("new-case").addEventListener("click", async () => {
  const error = document.getElementById("drill-error");
  error.textContent = "";
  let posed;
  try {
    posed = await api("/api/exercise/drill");
  } catch (e) {
    error.textContent = `No new case: ${e.message}`;
    return;
  }
  const template = document.getElementById("case-template");
  const section = template.content.querySelector(".case").cloneNode(true);
  drilled += 1;
  section.dataset.kind = posed.kind;
  for (const key of ["classes", "loss", "preactivation"]) {
    if (posed[key] !== null) section.dataset[key] = String(posed[key]);
  }
  section.querySelector(".case-title").textContent = `Drill case ${drilled}`;
  section.querySelector(".story").textContent = posed.story;
  const first = section.querySelector(".step");
  const steps = posed.steps.map((step) => {
    const node = first.cloneNode(true);
    node.querySelector(".prompt").textContent = step.prompt;
    return node;
  });
  first.replaceWith(...steps);
  document.getElementById("drills").prepend(section);
  watchCase(section);
  section.querySelector("input").focus();
});

// The calculators: each form's fields become the query of its API call.
for (const form of document.querySelectorAll(".calc")) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const output = form.querySelector(".result");
    const params = new URLSearchParams();
    for (const input of form.querySelectorAll("input")) {
      // A count takes thousands separators (1,000 or 1 000); a real number a decimal comma (3,30).
      const text = input.value.trim();
      params.set(input.name, input.name === "classes" ? text.replace(/[,_\s]/g, "") : text.replace(",", "."));
      input.removeAttribute("aria-invalid");
    }
    output.className = "result";
    try {
      const r = await api(`${form.dataset.api}?${params}`);
      if (r.status !== undefined) {
        output.classList.add(r.status);
        output.textContent = `${r.status}: ${r.message} Fix: ${r.fix}`;
      } else {
        output.textContent = r.text;
      }
    } catch (e) {
      for (const field of Object.keys(e.fields || {})) {
        const input = form.querySelector(`input[name="${field}"]`);
        if (input) input.setAttribute("aria-invalid", "true");
      }
      output.classList.add("error");
      output.textContent = e.message;
    }
  });
}
