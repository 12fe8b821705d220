// tuneforge dashboard: live run pages, the login form, the new-job form and the chat playground.
// Plain JavaScript, no framework: the server renders the pages and the charts.
"use strict";

const KEY_COOKIE = "tuneforge_key";
const prefix = document.body.dataset.prefix;

function apiKey() {
  const found = document.cookie.split("; ").find((c) => c.startsWith(KEY_COOKIE + "="));
  return found ? decodeURIComponent(found.slice(KEY_COOKIE.length + 1)) : "";
}

function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: "Bearer " + key } : extra;
}

// The OpenAI error body's message, or the status when the body is not one.
async function failure(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (err) {
    return `${response.status} ${response.statusText}`;
  }
}

async function postJSON(url, body) {
  const response = await fetch(url, {
    method: "POST",
    headers: authHeaders({ "Content-Type": "application/json" }),
    body: JSON.stringify(body),
  });
  if (!response.ok) throw new Error(await failure(response));
  return response.json();
}

function showTimes(root) {
  root.querySelectorAll("time[data-at]").forEach((t) => {
    t.textContent = new Date(Number(t.dataset.at) * 1000).toLocaleTimeString();
  });
}

// ---- a run's page: its live part is fetched again while the run is active ----------------------

function followRun(live) {
  const poll = Number(live.dataset.poll);
  const note = document.getElementById("live-note");
  // Why the page has stopped changing; it keeps asking, since a server restarted or a run started again
  // with --overwrite answers again.
  function stalled(text) {
    note.textContent = text;
    note.hidden = false;
    setTimeout(refresh, poll * 2);
  }
  async function refresh() {
    let response;
    try {
      response = await fetch(live.dataset.url, { headers: authHeaders() });
    } catch (err) {
      return stalled("The server does not answer (stopped?): the figures below may be old; trying again.");
    }
    if (response.status === 404) return stalled("This run is no longer there (its folder deleted?): trying again in case it comes back.");
    if (!response.ok) return stalled(`The server answers ${await failure(response)}: trying again.`);
    const update = await response.json();
    note.hidden = true;
    // The sample steps a person opened or closed keep that as the part is drawn again; the others are drawn as
    // the new part has them, the latest validation open.
    const chosen = [...live.querySelectorAll("details[id]")].filter((d) => d.open !== ("defaultOpen" in d.dataset));
    live.innerHTML = update.html;
    for (const before of chosen) {
      const shown = document.getElementById(before.id);
      if (shown) shown.open = before.open;
    }
    showTimes(live);
    if (update.active) setTimeout(refresh, poll);
    else window.location.reload(); // the finished run's page has its evaluation and report
  }
  if (live.dataset.active === "yes") setTimeout(refresh, poll);
}

// ---- login --------------------------------------------------------------------------------------

function login(form) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = document.getElementById("api-key").value.trim();
    const error = document.getElementById("login-error");
    const response = await fetch("/v1/models", { headers: { Authorization: "Bearer " + key } });
    if (!response.ok) {
      error.textContent = await failure(response);
      error.hidden = false;
      return;
    }
    document.cookie = `${KEY_COOKIE}=${encodeURIComponent(key)}; path=/; SameSite=Strict`;
    window.location.assign(form.dataset.next);
  });
}

function logout(button) {
  button.addEventListener("click", () => {
    document.cookie = `${KEY_COOKIE}=; path=/; SameSite=Strict; max-age=0`;
    window.location.assign(`${prefix}/login`);
  });
}

// ---- a new job: upload, check, then create ------------------------------------------------------

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function showCheck(target, report) {
  target.replaceChildren();
  const counts = report.counts;
  target.append(element("p", `${counts.read} rows read: ${counts.valid} valid, ${counts.rejected} rejected; ` +
    `${counts.train} training examples.`));
  report.warnings.forEach((w) => target.append(element("p", `[${w.code}] ${w.message}`, "warning")));
  if (!report.errors_total) {
    target.append(element("p", "No problems: the file is ready to train on.", "ok"));
    return true;
  }
  target.append(element("p", `${report.errors_total} ${report.errors_total === 1 ? "problem" : "problems"}: fix the file and choose it again.`, "error problems-count"));
  const table = element("table", undefined, "problems");
  const head = table.insertRow();
  ["file", "line", "code", "field", "problem"].forEach((h) => head.append(element("th", h)));
  report.errors.forEach((e) => {
    const row = table.insertRow();
    [e.file, e.line ?? "", e.code, e.field ?? "", e.message].forEach((v) => row.append(element("td", String(v))));
  });
  target.append(table);
  return false;
}

function newJob(form) {
  const start = document.getElementById("start-job");
  const error = document.getElementById("job-error");
  // The training file (required) and the validation file (optional): each uploaded, then checked.
  const files = ["training", "validation"].map((role) => ({
    role,
    input: document.getElementById(`${role}-file`),
    result: document.getElementById(`${role}-check`),
    id: null,
    ok: role === "validation",
  }));

  function update() {
    start.disabled = !(files[0].id && files.every((f) => f.ok));
  }

  async function check(file) {
    if (!file.id) return;
    file.ok = false;
    update();
    file.result.replaceChildren(element("p", "Checking every row…", "note"));
    try {
      const report = await postJSON(`${prefix}/api/check`, {
        file_id: file.id,
        model: document.getElementById("model").value,
        method: document.getElementById("method").value,
      });
      file.ok = showCheck(file.result, report);
    } catch (err) {
      file.result.replaceChildren(element("p", err.message, "error"));
    }
    update();
  }

  async function upload(file) {
    file.id = null;
    file.ok = file.role === "validation";
    update();
    const chosen = file.input.files[0];
    if (!chosen) return file.result.replaceChildren();
    file.result.replaceChildren(element("p", `Uploading ${chosen.name}…`, "note"));
    const body = new FormData();
    body.append("purpose", "fine-tune");
    body.append("file", chosen);
    const response = await fetch("/v1/files", { method: "POST", headers: authHeaders(), body });
    if (!response.ok) {
      file.result.replaceChildren(element("p", await failure(response), "error"));
      return;
    }
    file.id = (await response.json()).id;
    await check(file);
  }

  files.forEach((file) => file.input.addEventListener("change", () => upload(file)));
  ["model", "method"].forEach((id) =>
    document.getElementById(id).addEventListener("change", () => files.forEach(check)),
  );

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.hidden = true;
    const method = document.getElementById("method").value;
    const hyperparameters = {};
    ["n_epochs", "batch_size", "learning_rate_multiplier"].forEach((name) => {
      const value = document.getElementById(name).value.trim();
      if (value && value !== "auto") hyperparameters[name] = Number(value);
    });
    const body = {
      model: document.getElementById("model").value,
      training_file: files[0].id,
      method: { type: method, [method]: { hyperparameters } },
    };
    if (files[1].id) body.validation_file = files[1].id;
    const suffix = document.getElementById("suffix").value.trim();
    if (suffix) body.suffix = suffix;
    try {
      const job = await postJSON("/v1/fine_tuning/jobs", body);
      window.location.assign(`${prefix}/runs/${job.id}`);
    } catch (err) {
      error.textContent = err.message;
      error.hidden = false;
    }
  });
}

// ---- the playground: one message to two models, each with its own conversation -------------------

function playground(form) {
  const conversations = { left: [], right: [] };

  function say(side, role, text) {
    const item = element("li", undefined, role);
    item.append(element("b", role === "user" ? "you" : role), element("span", text));
    document.getElementById(`transcript-${side}`).append(item);
    return item;
  }

  async function ask(side, model, message) {
    const history = conversations[side];
    history.push({ role: "user", content: message });
    say(side, "user", message);
    const pending = say(side, "assistant", "…");
    const system = document.getElementById("system").value.trim();
    try {
      const reply = await postJSON("/v1/chat/completions", {
        model,
        messages: system ? [{ role: "system", content: system }, ...history] : history,
        max_tokens: Number(document.getElementById("max-tokens").value),
        temperature: Number(document.getElementById("temperature").value),
      });
      const choice = reply.choices[0];
      const content = choice.message.content;
      history.push({ role: "assistant", content });
      pending.lastChild.textContent = content.trim() ? content : "(only white space)";
      pending.append(element("small", `${reply.usage.completion_tokens} tokens, ${choice.finish_reason}`, "usage"));
      pending.classList.add("answered");
    } catch (err) {
      history.pop();
      pending.lastChild.textContent = err.message;
      pending.classList.add("error");
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const message = document.getElementById("message").value.trim();
    if (!message) return;
    document.getElementById("message").value = "";
    const asks = ["left", "right"]
      .map((side) => [side, document.getElementById(`model-${side}`).value])
      .filter(([, model]) => model)
      .map(([side, model]) => ask(side, model, message));
    await Promise.all(asks);
  });
  document.getElementById("reset").addEventListener("click", () => {
    ["left", "right"].forEach((side) => {
      conversations[side] = [];
      document.getElementById(`transcript-${side}`).replaceChildren();
    });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  showTimes(document);
  const hooks = {
    live: followRun,
    "login-form": login,
    logout: logout,
    "job-form": newJob,
    "chat-form": playground,
  };
  Object.entries(hooks).forEach(([id, hook]) => {
    const node = document.getElementById(id);
    if (node) hook(node);
  });
});
