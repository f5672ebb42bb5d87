// The flashcards: a click, Enter or Space turns a card over.
"use strict";

function flip(card) {
  const turned = card.classList.toggle("flipped");
  card.setAttribute("aria-pressed", String(turned));
}

for (const card of document.querySelectorAll(".card")) {
  card.addEventListener("click", () => flip(card));
  card.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault(); // Space would scroll the page
      flip(card);
    }
  });
}
