// The review page: FSRS grades through the same store as `nnvitals study review`.
"use strict";

const el = (id) => document.getElementById(id);
let current = null; // the card on show

function showQueue(queue) {
  const next = queue.next_due ? ` · next due ${fromNow(queue.next_due)}` : "";
  el("counts").textContent = `${queue.due} due · ${queue.new} new · ${queue.cards} cards · `
    + `${queue.reviews} ${queue.reviews === 1 ? "grade" : "grades"} so far${next}`;
  current = queue.card;
  el("review-card").hidden = !current;
  el("review-done").hidden = Boolean(current);
  if (!current) {
    el("review-done").textContent = queue.next_due
      ? `Nothing is due. The next card comes back ${fromNow(queue.next_due)}.`
      : "There are no cards to review.";
    return;
  }
  const seen = current.reviews ? `${current.state}, ${current.reviews} grades before` : "new";
  el("card-meta").textContent = `${current.id} · ${seen}`;
  el("card-question").textContent = current.question;
  el("card-answer-text").textContent = current.answer;
  el("card-answer").hidden = true;
  el("show-answer").hidden = false;
}

function showAnswer() {
  if (!current) return;
  el("card-answer").hidden = false;
  el("show-answer").hidden = true;
  document.querySelector(".grade-3").focus();
}

// One grade at a time: a double click or a repeated key must not grade the card twice.
let grading = false;

function setGrading(busy) {
  grading = busy;
  for (const button of document.querySelectorAll(".grade")) button.disabled = busy;
}

async function grade(rating) {
  if (grading || !current || el("card-answer").hidden) return;
  setGrading(true);
  el("review-error").textContent = "";
  try {
    const done = await api("/api/review/grade", { method: "POST", body: { card_id: current.id, rating } });
    el("review-last").textContent = `${done.review.rating_name} on ${done.review.card_id}: back `
      + `${fromNow(done.review.due)} (saved).`;
    showQueue(done.queue);
  } catch (e) {
    el("review-error").textContent = e.message;
  } finally {
    setGrading(false);
  }
}

el("show-answer").addEventListener("click", showAnswer);
for (const button of document.querySelectorAll(".grade")) {
  button.addEventListener("click", () => grade(Number(button.dataset.rating)));
}
document.addEventListener("keydown", (event) => {
  if (event.target.closest("input, textarea")) return;
  if (event.key === " " && !el("show-answer").hidden) {
    event.preventDefault();
    showAnswer();
  } else if (["1", "2", "3", "4"].includes(event.key) && !event.repeat) {
    grade(Number(event.key));
  }
});

api("/api/review").then(showQueue).catch((e) => {
  el("counts").textContent = "";
  el("review-error").textContent = e.message;
});
