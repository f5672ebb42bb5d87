// Shared by the pages: one way to call the JSON API and to show what it says went wrong.
"use strict";

class ApiError extends Error {
  constructor(message, status, fields) {
    super(message);
    this.status = status;
    this.fields = fields; // field name -> message, for 422 answers
  }
}

async function api(path, options = {}) {
  const init = { method: options.method || "GET", headers: { Accept: "application/json" } };
  if (options.body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new ApiError("the server cannot be reached: is `nnvitals serve` still running?", 0, {});
  }
  let data = null;
  try {
    data = await response.json();
  } catch (e) {
    data = null;
  }
  if (!response.ok) {
    const fields = {};
    let message = `the server answered ${response.status}`;
    if (data && Array.isArray(data.detail)) {
      for (const d of data.detail) fields[d.field] = d.msg;
      message = data.message || message;
    } else if (data && typeof data.detail === "string") {
      message = data.detail;
    }
    throw new ApiError(message, response.status, fields);
  }
  return data;
}

// "in 10 min", "in 3 h", "in 4 days", "now": when a card comes back.
function fromNow(iso) {
  const seconds = (new Date(iso) - new Date()) / 1000;
  if (seconds <= 30) return "now";
  const minutes = Math.round(seconds / 60);
  if (minutes < 60) return `in ${minutes} min`;
  const hours = Math.round(seconds / 3600);
  if (hours < 36) return `in ${hours} h`;
  return `in ${Math.round(seconds / 86400)} days`;
}
