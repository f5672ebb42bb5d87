// The print layout: the Print button, and printing at once when opened from the flashcards page.
"use strict";

document.getElementById("print-now").addEventListener("click", () => window.print());
if (new URLSearchParams(window.location.search).get("print") === "1") {
  window.addEventListener("load", () => window.print());
}
