// The llmq dashboard: jobs with live status, fine-tunes with their loss curves, and a playground.
// Plain JavaScript that reads the public API (/v1); every text from the API reaches the page as a text node,
// never as HTML. The view comes from the path: /ui/jobs, /ui/generations/<id>, /ui/fine-tunes[/<id>],
// /ui/playground.
"use strict";

const KEY_STORAGE = "llmq.apiKey";
const POLL_MS = 2000;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

// ------------------------------------------------------------------------------------------------------
// DOM helpers
// ------------------------------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  setAttributes(node, attrs);
  append(node, children);
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";

function s(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  setAttributes(node, attrs);
  append(node, children);
  return node;
}

function setAttributes(node, attrs) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

function replace(node, ...children) {
  node.replaceChildren();
  append(node, children);
}

const main = () => document.getElementById("main");

// ------------------------------------------------------------------------------------------------------
// The API
// ------------------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function authHeaders() {
  const key = localStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    message = (body.error && body.error.message) || (typeof body.detail === "string" ? body.detail : message);
  } catch (_) {
    // not JSON: keep the status line
  }
  if (response.status === 401) showKeyPanel("This gateway requires an API key.");
  return new ApiError(response.status, message);
}

async function api(path, options = {}) {
  const init = { method: options.method || "GET", headers: authHeaders(), signal: options.signal };
  if (options.json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.json);
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

// Saves a file the tenant owns (GET /v1/files/{id}/content, with the API key) under its own name.
async function download(fileId) {
  const meta = await api(`/v1/files/${encodeURIComponent(fileId)}`);
  const response = await fetch(`/v1/files/${encodeURIComponent(fileId)}/content`, { headers: authHeaders() });
  if (!response.ok) throw await errorOf(response);
  const url = URL.createObjectURL(await response.blob());
  const link = h("a", { href: url, download: meta.filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function query(params) {
  const entries = Object.entries(params).filter(([, v]) => v !== null && v !== undefined && v !== "");
  return entries.length ? `?${new URLSearchParams(entries)}` : "";
}

// Runs fn now and every POLL_MS after it finished, until it returns false. Skips turns while the tab is hidden.
function poll(fn) {
  let stopped = false;
  const turn = async () => {
    if (stopped) return;
    let again = true;
    if (!document.hidden) {
      try {
        again = (await fn()) !== false;
      } catch (error) {
        showError(error);
      }
    }
    if (again && !stopped) setTimeout(turn, POLL_MS);
  };
  turn();
  return () => {
    stopped = true;
  };
}

function showError(error) {
  let box = document.getElementById("error");
  if (!box) {
    box = h("p", { id: "error", class: "error", role: "alert" });
    main().prepend(box);
  }
  box.textContent = error instanceof ApiError ? `${error.status}: ${error.message}` : String(error.message || error);
}

function clearError() {
  const box = document.getElementById("error");
  if (box) box.remove();
}

// ------------------------------------------------------------------------------------------------------
// The API key
// ------------------------------------------------------------------------------------------------------

function showKeyPanel(message) {
  const panel = document.getElementById("key-panel");
  if (message) document.getElementById("key-message").textContent = message;
  panel.hidden = false;
  document.getElementById("key-input").focus();
}

function setUpKeyPanel() {
  const panel = document.getElementById("key-panel");
  const input = document.getElementById("key-input");
  const button = document.getElementById("key-button");
  const label = () => {
    button.textContent = localStorage.getItem(KEY_STORAGE) ? "API key ✓" : "API key";
  };
  label();
  button.addEventListener("click", () => {
    panel.hidden = !panel.hidden;
    if (!panel.hidden) input.focus();
  });
  document.getElementById("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (input.value.trim()) localStorage.setItem(KEY_STORAGE, input.value.trim());
    location.reload();
  });
  document.getElementById("key-forget").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORAGE);
    input.value = "";
    label();
  });
}

// ------------------------------------------------------------------------------------------------------
// Formatting
// ------------------------------------------------------------------------------------------------------

function toDate(value) {
  if (value === null || value === undefined) return null;
  return typeof value === "number" ? new Date(value * 1000) : new Date(value);
}

function seconds(from, to) {
  const a = toDate(from);
  if (!a) return null;
  const b = toDate(to) || new Date();
  return Math.max((b - a) / 1000, 0);
}

function duration(value) {
  if (value === null || value === undefined) return "–";
  if (value < 1) return `${Math.round(value * 1000)} ms`;
  if (value < 59.95) return `${value.toFixed(1)} s`;
  // Rounded once, then split: 479.6 s is "8 min 0 s", never "7 min 60 s".
  const whole = Math.round(value);
  if (whole < 3600) return `${Math.floor(whole / 60)} min ${whole % 60} s`;
  const minutes = Math.round(value / 60);
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

function when(value) {
  const date = toDate(value);
  if (!date) return "–";
  return h("time", { datetime: date.toISOString(), title: date.toISOString() }, `${duration(seconds(date))} ago`);
}

function number(value, digits = 4) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return typeof value === "number" && !Number.isInteger(value) ? value.toFixed(digits) : String(value);
}

function badge(status) {
  return h("span", { class: `badge ${status}` }, status);
}

function shortModel(model) {
  return model && model.length > 48 ? `…${model.slice(-47)}` : model;
}

function table(headings, rows, empty) {
  if (!rows.length) return h("p", { class: "muted" }, empty);
  return h(
    "table",
    {},
    h("thead", {}, h("tr", {}, headings.map((title) => h("th", { scope: "col" }, title)))),
    h("tbody", {}, rows),
  );
}

function facts(pairs) {
  return h(
    "dl",
    { class: "facts" },
    pairs.filter(([, value]) => value !== undefined).map(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]),
  );
}

// ------------------------------------------------------------------------------------------------------
// Jobs
// ------------------------------------------------------------------------------------------------------

// A queued job's place in its queue and whether a worker of its kind is alive (null when not queued).
function queueText(queue, kind) {
  if (!queue) return null;
  const workers = queue.worker_alive
    ? `${queue.live_workers} ${kind} worker${queue.live_workers === 1 ? "" : "s"} alive`
    : `no ${kind} worker is alive: it waits until one starts`;
  return h("span", { class: queue.worker_alive ? "" : "error-text", id: "queue-state" }, `position ${queue.position} · ${workers}`);
}

function jobLink(job) {
  const href = job.kind === "train" ? `/ui/fine-tunes/${job.id}` : `/ui/generations/${job.id}`;
  return h("a", { href, class: "mono" }, job.id);
}

function select(name, label, options, value) {
  return h(
    "label",
    { class: "inline" },
    `${label} `,
    h(
      "select",
      { name },
      options.map(([optionValue, text]) => h("option", { value: optionValue, selected: optionValue === value }, text)),
    ),
  );
}

function jobsView() {
  const params = new URLSearchParams(location.search);
  const filters = { kind: params.get("kind") || "", status: params.get("status") || "", limit: params.get("limit") || "50" };
  const form = h(
    "form",
    { class: "filters", method: "get" },
    select("kind", "Kind", [["", "all"], ["generate", "generate"], ["train", "train"]], filters.kind),
    select(
      "status",
      "Status",
      [["", "all"], ...["queued", "running", "paused", "succeeded", "failed", "cancelled"].map((v) => [v, v])],
      filters.status,
    ),
    select("limit", "Show", [["20", "20"], ["50", "50"], ["100", "100"]], filters.limit),
  );
  form.addEventListener("change", () => form.submit());
  const updated = h("span", { class: "muted live" }, "loading…");
  const body = h("div", { id: "jobs" });
  replace(main(), h("div", { class: "heading" }, h("h1", {}, "Jobs"), updated), form, body);

  poll(async () => {
    const list = await api(`/v1/jobs${query(filters)}`);
    clearError();
    const rows = list.data.map((job) =>
      h(
        "tr",
        { "data-job": job.id },
        h("td", {}, jobLink(job)),
        h("td", {}, job.kind),
        h("td", {}, badge(job.status)),
        h("td", { class: "mono", title: job.model }, shortModel(job.model)),
        h("td", {}, when(job.created_at)),
        h("td", { class: "num" }, duration(seconds(job.created_at, job.started_at))),
        h("td", { class: "num" }, job.started_at ? duration(seconds(job.started_at, job.finished_at)) : "–"),
        h("td", { class: "num" }, job.attempt),
        h("td", { class: "error-text" }, job.error ? `${job.error.code}: ${job.error.message}` : ""),
      ),
    );
    replace(
      body,
      table(["Job", "Kind", "Status", "Model", "Created", "Queue wait", "Run time", "Attempt", "Error"], rows, "No jobs yet."),
      list.has_more ? h("p", { class: "muted" }, `Showing the newest ${list.data.length}.`) : null,
    );
    updated.textContent = `live · updated ${new Date().toLocaleTimeString()}`;
  });
}

// ------------------------------------------------------------------------------------------------------
// One generation job
// ------------------------------------------------------------------------------------------------------

function generationView(jobId) {
  const body = h("div", {});
  replace(main(), h("p", { class: "crumbs" }, h("a", { href: "/ui/jobs" }, "Jobs"), " / ", jobId), body);
  poll(async () => {
    const job = await api(`/v1/generations/${encodeURIComponent(jobId)}`);
    const queue = job.status === "queued" ? (await api(`/v1/jobs/${encodeURIComponent(jobId)}`)).queue : null;
    clearError();
    const cancel = job.status === "queued"
      ? h("button", { type: "button", onclick: () => api(`/v1/generations/${job.id}/cancel`, { method: "POST" }).catch(showError) }, "Cancel")
      : null;
    const request = job.request || {};
    replace(
      body,
      h("div", { class: "heading" }, h("h1", { class: "mono" }, job.id), badge(job.status), cancel),
      facts([
        ["Model", h("span", { class: "mono" }, job.model)],
        queue ? ["Queue", queueText(queue, "generate")] : [],
        ["Created", when(job.created_at)],
        ["Queue wait", duration(job.queue_seconds)],
        ["Run time", duration(job.run_seconds)],
        ["Attempt", job.attempt],
        ["Sampling", `max_tokens ${request.max_tokens}, temperature ${request.temperature}, top_p ${request.top_p}` +
          (request.seed !== null && request.seed !== undefined ? `, seed ${request.seed}` : "")],
        ["Usage", job.usage ? `${job.usage.prompt_tokens} prompt + ${job.usage.completion_tokens} completion tokens` : "–"],
        job.error ? ["Error", h("span", { class: "error-text" }, `${job.error.code}: ${job.error.message}`)] : [],
      ].filter((pair) => pair.length)),
      h("h2", {}, "Outputs"),
      (job.outputs || []).length
        ? job.outputs.map((output) => {
          const n = request.n || 1;
          const prompt = (request.prompts || [])[Math.floor(output.index / n)];
          return h(
            "div",
            { class: "output" },
            h("div", { class: "prompt" }, prompt),
            h("pre", { class: "completion" }, output.text),
            h("p", { class: "muted" }, `#${output.index} · ${output.finish_reason} · ${output.completion_tokens} tokens`),
          );
        })
        : h("p", { class: "muted" }, TERMINAL.has(job.status) ? "No outputs." : "Waiting for the worker…"),
    );
    return !TERMINAL.has(job.status);
  });
}

// ------------------------------------------------------------------------------------------------------
// Fine-tunes
// ------------------------------------------------------------------------------------------------------

function fineTunesView() {
  const body = h("div", {});
  const updated = h("span", { class: "muted live" }, "loading…");
  replace(main(), h("div", { class: "heading" }, h("h1", {}, "Fine-tunes"), updated), body);
  poll(async () => {
    const list = await api("/v1/fine_tuning/jobs?limit=100");
    clearError();
    const rows = list.data.map((job) =>
      h(
        "tr",
        {},
        h("td", {}, h("a", { href: `/ui/fine-tunes/${job.id}`, class: "mono" }, job.id)),
        h("td", {}, badge(job.status)),
        h("td", { class: "mono" }, shortModel(job.model)),
        h("td", { class: "mono" }, job.fine_tuned_model ? shortModel(job.fine_tuned_model) : "–"),
        h("td", { class: "num" }, job.trained_tokens ?? "–"),
        h("td", {}, when(job.created_at)),
      ),
    );
    replace(body, table(["Job", "Status", "Base model", "Fine-tuned model", "Trained tokens", "Created"], rows, "No fine-tunes yet."));
    updated.textContent = `live · updated ${new Date().toLocaleTimeString()}`;
  });
}

// All of a job's events, oldest first, fetched a page at a time; later calls fetch only what is new.
class EventLog {
  constructor(jobId) {
    this.jobId = jobId;
    this.events = [];
    this.seen = new Set();
  }

  async refresh() {
    const fresh = [];
    let after = null;
    for (;;) {
      const page = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(this.jobId)}/events${query({ limit: 1000, after })}`);
      const unseen = page.data.filter((event) => !this.seen.has(event.id));
      fresh.push(...unseen);
      if (!page.has_more || unseen.length < page.data.length || !page.data.length) break;
      after = page.data[page.data.length - 1].id;
    }
    for (const event of fresh.reverse()) {
      this.seen.add(event.id);
      this.events.push(event);
    }
    return fresh.length > 0;
  }

  // Series from the metrics events, by step: train loss per reported step; validation loss (of the base
  // model at step 0, during and after training); the learning rate and the training throughput in tokens per
  // second that each step report carries.
  series() {
    const train = new Map();
    const validation = new Map();
    const learningRate = new Map();
    const tokensPerSecond = new Map();
    for (const event of this.events) {
      const data = event.data || {};
      if (event.type !== "metrics" || typeof data.step !== "number") continue;
      if (typeof data.train_loss === "number") train.set(data.step, data.train_loss);
      for (const key of ["val_loss", "base_val_loss"]) {
        if (typeof data[key] === "number") validation.set(data.step, data[key]);
      }
      if (typeof data.learning_rate === "number") learningRate.set(data.step, data.learning_rate);
      if (typeof data.tokens_per_second === "number") tokensPerSecond.set(data.step, data.tokens_per_second);
    }
    const points = (map) => [...map.entries()].sort((a, b) => a[0] - b[0]).map(([x, y]) => ({ x, y }));
    return {
      train: points(train),
      validation: points(validation),
      learningRate: points(learningRate),
      tokensPerSecond: points(tokensPerSecond),
    };
  }

  progress() {
    for (let i = this.events.length - 1; i >= 0; i--) {
      const data = this.events[i].data || {};
      if (typeof data.step === "number" && typeof data.total_steps === "number") return data;
    }
    return null;
  }
}

// The buttons a fine-tune's page offers for its status: pause, resume, cancel; for the model it made, export
// (a standalone merged model, float16) and delete.
function fineTuneActions(job, exports) {
  const post = (action) => () => api(`/v1/fine_tuning/jobs/${job.id}/${action}`, { method: "POST" }).catch(showError);
  const button = (label, onclick) => h("button", { type: "button", onclick }, label);
  const actions = [];
  if (job.status === "queued" || job.status === "running") actions.push(button("Pause", post("pause")));
  if (job.status === "paused") actions.push(button("Resume", post("resume")));
  if (!TERMINAL.has(job.status)) actions.push(button("Cancel", post("cancel")));
  if (job.fine_tuned_model && job.status === "succeeded") {
    actions.push(button("Export", () =>
      api(`/v1/fine_tuning/jobs/${job.id}/export`, { method: "POST", json: { dtype: "float16" } })
        .then(exports.refresh)
        .catch(showError)));
  }
  if (job.fine_tuned_model) {
    actions.push(button("Delete model", (event) => {
      if (!window.confirm(`Delete ${job.fine_tuned_model}? It will no longer be listed or served.`)) return;
      api(`/v1/models/${encodeURIComponent(job.fine_tuned_model)}`, { method: "DELETE" })
        .then(() => event.target.replaceWith(h("span", { class: "small" }, "model deleted")))
        .catch(showError);
    }));
  }
  return actions;
}

// A fine-tune's exports: each one's status while it runs, its download once done (polled while any runs).
function exportsPanel(jobId) {
  const box = h("span", { id: "exports" }, "–");
  let stop = null;
  const refresh = () => {
    if (stop) stop();
    stop = poll(async () => {
      const list = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/exports?limit=10`);
      replace(box, ...(list.data.length ? list.data.map(exportLine) : ["–"]));
      return list.data.some((e) => !TERMINAL.has(e.status));
    });
  };
  refresh();
  return { box, refresh };
}

function exportLine(e) {
  if (e.status === "succeeded") {
    return h("button", { type: "button", class: "download", "data-file": e.file_id, onclick: () => download(e.file_id).catch(showError) },
      `Download ${e.dtype} model`);
  }
  const why = e.error ? ` (${e.error.code}: ${e.error.message})` : "";
  return h("span", { class: `small export-${e.status}` }, `${e.dtype} export ${e.status}${TERMINAL.has(e.status) ? "" : "…"}${why} `);
}

function hyperparameterText(job) {
  const hp = (job.method && job.method.supervised && job.method.supervised.hyperparameters) || {};
  return Object.entries(hp)
    .filter(([, value]) => value !== null && value !== undefined)
    .map(([key, value]) => `${key}=${Array.isArray(value) ? value.join(",") : value}`)
    .join("  ");
}

function fineTuneView(jobId) {
  const log = new EventLog(jobId);
  const header = h("div", {});
  const summary = h("div", {});
  const chart = h("div", { class: "chart", id: "loss-chart" });
  const rateChart = h("div", { class: "chart", id: "learning-rate-chart" });
  const speedChart = h("div", { class: "chart", id: "throughput-chart" });
  const samples = h("div", { id: "samples" });
  const checkpoints = h("div", { id: "checkpoints" });
  const events = h("div", { id: "events" });
  const exports = exportsPanel(jobId);
  replace(
    main(),
    h("p", { class: "crumbs" }, h("a", { href: "/ui/fine-tunes" }, "Fine-tunes"), " / ", jobId),
    header,
    summary,
    h("h2", {}, "Loss"),
    chart,
    h("div", { class: "columns even" },
      h("section", {}, h("h2", {}, "Learning rate"), rateChart),
      h("section", {}, h("h2", {}, "Throughput"), speedChart)),
    samples,
    h("div", { class: "columns" }, h("section", {}, h("h2", {}, "Checkpoints"), checkpoints), h("section", {}, h("h2", {}, "Events"), events)),
  );

  poll(async () => {
    const [job, changed, saved] = await Promise.all([
      api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`),
      log.refresh(),
      api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/checkpoints?limit=100`),
    ]);
    clearError();
    replace(header, h("div", { class: "heading" }, h("h1", { class: "mono" }, job.id), badge(job.status), ...fineTuneActions(job, exports)));

    const progress = log.progress();
    const metrics = job.metrics || {};
    const playground = job.fine_tuned_model
      ? h("a", { href: `/ui/playground${query({ model: job.fine_tuned_model })}`, class: "mono" }, job.fine_tuned_model)
      : "–";
    replace(
      summary,
      progress && !TERMINAL.has(job.status)
        ? h(
          "div",
          { class: "progress" },
          h("progress", { max: progress.total_steps, value: progress.step }),
          ` step ${progress.step} of ${progress.total_steps}`,
          progress.eta_seconds ? ` · about ${duration(progress.eta_seconds)} left` : "",
        )
        : null,
      facts([
        ["Base model", h("span", { class: "mono" }, job.model)],
        job.queue ? ["Queue", queueText(job.queue, "train")] : [],
        ["Fine-tuned model", playground],
        ["Result files", job.result_files.length
          ? h("span", {}, ...job.result_files.map((id) =>
            h("button", { type: "button", class: "download", "data-file": id, onclick: () => download(id).catch(showError) }, `Download ${id}`)))
          : "–"],
        ["Exports", exports.box],
        ["Data", job.training_file || (job.dataset ? `${job.dataset.name || "hub dataset"}` : "–")],
        ["Validation", job.validation_file || "–"],
        ["Hyperparameters", h("span", { class: "mono small" }, hyperparameterText(job))],
        ["Trained tokens", job.trained_tokens ?? (progress ? progress.trained_tokens : null) ?? "–"],
        ["Created", when(job.created_at)],
        ["Finished", job.finished_at ? when(job.finished_at) : "–"],
        ["Final losses", metrics.train_loss !== undefined
          ? `train ${number(metrics.train_loss)} · validation ${number(metrics.val_loss)} (base ${number(metrics.base_val_loss)})`
          : "–"],
        job.error ? ["Error", h("span", { class: "error-text" }, `${job.error.code}: ${job.error.message}`)] : [],
      ].filter((pair) => pair.length)),
    );

    if (changed || !chart.firstChild) {
      const { train, validation, learningRate, tokensPerSecond } = log.series();
      const checkpointSteps = saved.data.map((c) => c.step_number);
      replace(chart, lineChart(
        [
          { name: "train loss", className: "train", points: train },
          { name: "validation loss", className: "validation", points: validation, markers: true },
        ],
        { checkpointSteps, yLabel: "loss", label: "Training and validation loss by step", empty: "No loss reported yet." },
      ));
      replace(rateChart, lineChart(
        [{ name: "learning rate", className: "learning-rate", points: learningRate }],
        { yLabel: "learning rate", label: "Learning rate by step", empty: "No learning rate reported yet.", small: true },
      ));
      replace(speedChart, lineChart(
        [{ name: "tokens/s", className: "throughput", points: tokensPerSecond }],
        { yLabel: "tokens/s", label: "Training tokens per second by step", empty: "No throughput reported yet.", small: true },
      ));
      replace(events, table(
        ["Time", "Level", "Message"],
        log.events.slice(-200).reverse().map((event) =>
          h("tr", { class: `level-${event.level}` }, h("td", {}, when(event.created_at)), h("td", {}, event.level), h("td", {}, event.message)),
        ),
        "No events yet.",
      ));
    }
    replace(samples, (job.samples || []).length
      ? h("section", {},
        h("h2", {}, "Sample answers"),
        h("p", { class: "muted small" }, "Greedy answers to validation prompts after training, with the base model's for contrast."),
        table(
          ["Validation prompt", "Fine-tuned", "Base model", "Reference"],
          job.samples.map((sample) => h("tr", { class: "sample" },
            h("td", { class: "pre" }, sample.prompt),
            h("td", { class: "pre fine-tuned" }, sample.fine_tuned),
            h("td", { class: "pre base" }, sample.base ?? "–"),
            h("td", { class: "pre muted" }, sample.reference ?? "–"))),
          "No samples.",
        ))
      : null);
    replace(checkpoints, table(
      ["Step", "Checkpoint", "Train loss", "Validation loss", "Created"],
      saved.data.map((c) =>
        h(
          "tr",
          {},
          h("td", { class: "num" }, c.step_number),
          h("td", { class: "mono small" }, c.fine_tuned_model_checkpoint),
          h("td", { class: "num" }, number(c.metrics.train_loss)),
          h("td", { class: "num" }, number(c.metrics.val_loss)),
          h("td", {}, when(c.created_at)),
        ),
      ),
      "No checkpoints yet.",
    ));
    return !TERMINAL.has(job.status);
  });
}

// ------------------------------------------------------------------------------------------------------
// Line charts (loss, learning rate, throughput): inline SVG, drawn here (no library, nothing fetched)
// ------------------------------------------------------------------------------------------------------

// About `count` round tick values covering [low, high].
function ticks(low, high, count) {
  const span = high - low;
  const raw = span / Math.max(count, 1);
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((m) => raw <= m) || 10 * magnitude;
  const values = [];
  for (let v = Math.ceil(low / step) * step; v <= high + step * 1e-9; v += step) values.push(Number(v.toPrecision(12)));
  return values;
}

// Tick labels short enough for the axis: 0.0002 as 2e-4, 12000 as 12000.
function tickText(value) {
  if (value !== 0 && Math.abs(value) < 1e-3) return value.toExponential(1).replace(/\.0e/, "e");
  return String(Number(value.toPrecision(4)));
}

// series: [{ name, className, points: [{x: step, y}], markers }]; options: checkpointSteps (vertical marks),
// yLabel, label (for screen readers), empty (the text without points), small (the half-width charts).
function lineChart(series, { checkpointSteps = [], yLabel, label, empty, small = false }) {
  const points = series.flatMap((line) => line.points);
  if (!points.length) return h("p", { class: "muted" }, empty);
  const width = small ? 380 : 760;
  const height = small ? 220 : 320;
  const margin = { left: 64, right: 20, top: 36, bottom: 44 };
  let [x0, x1] = [Math.min(...points.map((p) => p.x)), Math.max(...points.map((p) => p.x))];
  let [y0, y1] = [Math.min(...points.map((p) => p.y)), Math.max(...points.map((p) => p.y))];
  if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
  const pad = (y1 - y0 || Math.abs(y0) || 1) * 0.08;
  [y0, y1] = [y0 - pad, y1 + pad];
  const plotW = width - margin.left - margin.right;
  const plotH = height - margin.top - margin.bottom;
  const X = (x) => margin.left + ((x - x0) / (x1 - x0)) * plotW;
  const Y = (y) => margin.top + (1 - (y - y0) / (y1 - y0)) * plotH;

  const grid = [];
  for (const y of ticks(y0, y1, 5)) {
    grid.push(s("line", { class: "grid", x1: margin.left, x2: width - margin.right, y1: Y(y), y2: Y(y) }));
    grid.push(s("text", { class: "tick", x: margin.left - 8, y: Y(y) + 4, "text-anchor": "end" }, tickText(y)));
  }
  for (const x of ticks(x0, x1, 6).filter((x) => Number.isInteger(x))) {
    grid.push(s("line", { class: "grid", x1: X(x), x2: X(x), y1: margin.top, y2: height - margin.bottom }));
    grid.push(s("text", { class: "tick", x: X(x), y: height - margin.bottom + 18, "text-anchor": "middle" }, x));
  }
  const saved = checkpointSteps
    .filter((step) => step >= x0 && step <= x1)
    .map((step) =>
      s("line", { class: "checkpoint", x1: X(step), x2: X(step), y1: margin.top, y2: height - margin.bottom },
        s("title", {}, `checkpoint at step ${step}`)),
    );

  const lines = series.filter((line) => line.points.length).map((line) => {
    const d = line.points.map((p, i) => `${i ? "L" : "M"}${X(p.x).toFixed(1)},${Y(p.y).toFixed(1)}`).join(" ");
    const marks = line.markers || line.points.length === 1
      ? line.points.map((p) => s("circle", { class: `mark ${line.className}`, cx: X(p.x), cy: Y(p.y), r: 3.5 },
        s("title", {}, `${line.name} at step ${p.x}: ${tickText(p.y)}`)))
      : [];
    return s("g", { class: `series ${line.className}`, "data-points": line.points.length },
      s("path", { class: `line ${line.className}`, d }), marks);
  });

  let legendX = margin.left;
  const legend = series.map((line) => {
    const item = s("g", { class: "legend", transform: `translate(${legendX},14)` },
      s("rect", { class: `swatch ${line.className}`, x: 0, y: -8, width: 14, height: 4, rx: 1 }),
      s("text", { x: 20, y: -3 }, `${line.name} (${line.points.length})`));
    legendX += 190;
    return item;
  });

  return s(
    "svg",
    { viewBox: `0 0 ${width} ${height}`, class: small ? "line-chart small" : "line-chart loss-chart", role: "img", "aria-label": label },
    grid,
    saved,
    s("line", { class: "axis", x1: margin.left, x2: width - margin.right, y1: height - margin.bottom, y2: height - margin.bottom }),
    s("line", { class: "axis", x1: margin.left, x2: margin.left, y1: margin.top, y2: height - margin.bottom }),
    s("text", { class: "axis-label", x: margin.left + plotW / 2, y: height - 8, "text-anchor": "middle" }, "step"),
    s("text", { class: "axis-label", x: 14, y: margin.top + plotH / 2, "text-anchor": "middle", transform: `rotate(-90 14 ${margin.top + plotH / 2})` }, yLabel),
    lines,
    legend,
  );
}

// ------------------------------------------------------------------------------------------------------
// Playground
// ------------------------------------------------------------------------------------------------------

function field(label, input) {
  return h("label", { class: "field" }, h("span", {}, label), input);
}

async function playgroundView() {
  const params = new URLSearchParams(location.search);
  const model = h("select", { name: "model", id: "model" });
  // Base vs fine-tuned side by side: the same request on a second model, answered in a second column.
  const compare = h("select", { name: "compare", id: "compare" });
  const mode = h("select", { name: "mode", id: "mode" },
    h("option", { value: "completion", selected: params.get("mode") !== "chat" }, "Completion"),
    h("option", { value: "chat", selected: params.get("mode") === "chat" }, "Chat"));
  const system = h("input", { type: "text", name: "system", id: "system", value: params.get("system") || "", placeholder: "optional" });
  const prompt = h("textarea", { name: "prompt", id: "prompt", rows: 6, placeholder: "Write a prompt…" });
  prompt.value = params.get("prompt") || "";
  const maxTokens = h("input", { type: "number", name: "max_tokens", min: 1, value: params.get("max_tokens") || "64" });
  const temperature = h("input", { type: "number", name: "temperature", min: 0, max: 2, step: "any", value: params.get("temperature") || "0.7" });
  const topP = h("input", { type: "number", name: "top_p", min: 0.01, max: 1, step: "any", value: params.get("top_p") || "1" });
  const seed = h("input", { type: "number", name: "seed", min: 0, value: params.get("seed") || "", placeholder: "random" });
  const template = h("input", { type: "checkbox", name: "template", checked: params.get("template") !== "raw" });
  const stream = h("input", { type: "checkbox", name: "stream", checked: params.get("stream") !== "0" });
  const run = h("button", { type: "submit", id: "run" }, "Run");
  const stop = h("button", { type: "button", class: "quiet", disabled: true }, "Stop");
  const clear = h("button", { type: "button", class: "quiet", id: "clear" }, "New conversation");
  const status = h("p", { id: "run-status", class: "muted" });
  // One column per model: its chat history (chat mode), its transcript and its latest output.
  const column = (id) => ({ history: [], transcript: h("div", { class: "transcript" }), output: h("pre", { id, class: "completion" }), heading: h("h3", { class: "mono" }) });
  const columns = [column("output"), column("output-compare")];
  const outputs = h("div", { class: "side-by-side" });
  const templateLabel = h("label", { class: "inline" }, template, " Treat the prompt as an instruction (the model's chat template)");
  const systemField = field("System message", system);
  const form = h(
    "form",
    { class: "playground" },
    h("div", { class: "row" }, field("Model", model), field("Side by side with", compare), field("Mode", mode)),
    systemField,
    field("Prompt", prompt),
    h("div", { class: "row" },
      field("Max tokens", maxTokens), field("Temperature", temperature), field("Top p", topP), field("Seed", seed)),
    templateLabel,
    h("label", { class: "inline" }, stream, " Stream the text as it is generated"),
    h("div", { class: "row" }, run, stop, clear),
  );
  replace(main(), h("h1", {}, "Playground"), form, h("h2", {}, "Output"), status, outputs);

  const chatMode = () => mode.value === "chat";
  const layout = () => {
    systemField.hidden = !chatMode();
    clear.hidden = !chatMode();
    templateLabel.hidden = chatMode();
    const shown = compare.value ? columns : columns.slice(0, 1);
    columns[0].heading.textContent = model.value;
    columns[1].heading.textContent = compare.value;
    replace(outputs, shown.map((c) => h("div", {}, compare.value ? c.heading : null, c.transcript, c.output)));
  };
  const forget = () => {
    for (const c of columns) {
      c.history = [];
      replace(c.transcript);
      c.output.textContent = "";
    }
  };
  for (const input of [mode, model, compare]) input.addEventListener("change", () => { forget(); layout(); });
  clear.addEventListener("click", () => { forget(); status.textContent = ""; });

  let controller = null;
  stop.addEventListener("click", () => controller && controller.abort());
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!prompt.value.trim()) {
      status.textContent = "Write a prompt first.";
      return;
    }
    controller = new AbortController();
    run.disabled = true;
    stop.disabled = false;
    status.textContent = "running…";
    const started = performance.now();
    const sampling = {
      max_tokens: Number(maxTokens.value),
      temperature: Number(temperature.value),
      top_p: Number(topP.value),
    };
    if (seed.value !== "") sampling.seed = Number(seed.value);
    const models = compare.value ? [model.value, compare.value] : [model.value];
    try {
      const results = await Promise.all(models.map((id, i) => runOn(id, columns[i], sampling, controller.signal)));
      const done = results[0];
      const usage = done.usage ? ` · ${done.usage.prompt_tokens} prompt + ${done.usage.completion_tokens} completion tokens` : "";
      status.replaceChildren(
        ...results.map((r, i) => [i ? " · " : "", r.id ? h("a", { href: `/ui/generations/${r.id}`, class: "mono" }, r.id) : ""]),
        ` · ${done.finish_reason || "done"} · ${duration((performance.now() - started) / 1000)}${usage}`,
      );
      status.dataset.done = "true";
      if (chatMode()) prompt.value = "";
    } catch (error) {
      status.textContent = error.name === "AbortError" ? "stopped" : `failed: ${error.message}`;
      status.dataset.done = "error";
    } finally {
      run.disabled = false;
      stop.disabled = true;
    }
  });

  // One model's run: a completion of the prompt, or (chat mode) the next turn of its conversation.
  async function runOn(id, col, sampling, signal) {
    col.output.textContent = "";
    const onText = (text) => col.output.append(text);
    if (!chatMode()) {
      const body = { model: id, prompt: prompt.value, ...sampling, template: template.checked ? "model" : "raw" };
      return stream.checked ? await streamCompletion(body, signal, onText) : await completion(body, signal, onText);
    }
    const turn = { role: "user", content: prompt.value };
    const start = system.value.trim() ? [{ role: "system", content: system.value }] : [];
    const body = { model: id, messages: [...start, ...col.history, turn], ...sampling };
    const done = stream.checked
      ? await streamCompletion(body, signal, onText, "/v1/chat/completions")
      : await chatCompletion(body, signal, onText);
    col.history.push(turn, { role: "assistant", content: col.output.textContent });
    col.transcript.append(
      h("p", { class: "turn user" }, h("b", {}, "You: "), turn.content),
      h("p", { class: "turn assistant" }, h("b", {}, "Model: "), col.output.textContent),
    );
    col.output.textContent = "";
    return done;
  }

  try {
    const models = await api("/v1/models");
    const wanted = params.get("model");
    const label = (m) => (m.parent ? `${m.id} (fine-tuned from ${m.parent})` : m.id);
    replace(model, models.data.map((m) => h("option", { value: m.id, selected: m.id === wanted }, label(m))));
    replace(compare, h("option", { value: "" }, "(none)"),
      models.data.map((m) => h("option", { value: m.id, selected: m.id === params.get("compare") }, label(m))));
  } catch (error) {
    showError(error);
    return;
  }
  layout();
  if (params.get("run") === "1" && prompt.value.trim()) form.requestSubmit();
}

// POST /v1/completions, answered when the job is done; same contract as streamCompletion.
async function completion(body, signal, onText) {
  const answer = await api("/v1/completions", { method: "POST", json: body, signal });
  const choice = answer.choices[0] || {};
  onText(choice.text || "");
  return { id: answer.id, finish_reason: choice.finish_reason, usage: answer.usage };
}

// POST /v1/chat/completions, answered when the job is done; same contract as streamCompletion.
async function chatCompletion(body, signal, onText) {
  const answer = await api("/v1/chat/completions", { method: "POST", json: body, signal });
  const choice = answer.choices[0] || {};
  onText((choice.message && choice.message.content) || "");
  return { id: answer.id, finish_reason: choice.finish_reason, usage: answer.usage };
}

// POST a completion (or, with path /v1/chat/completions, a chat completion) with stream: true; calls onText
// with each piece of text; resolves with the last chunk's id, finish reason and usage.
async function streamCompletion(body, signal, onText, path = "/v1/completions") {
  const chat = path === "/v1/chat/completions";
  const response = await fetch(path, {
    method: "POST",
    headers: { ...authHeaders(), "Content-Type": "application/json" },
    body: JSON.stringify({ ...body, stream: true, ...(chat ? { stream_options: { include_usage: true } } : {}) }),
    signal,
  });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const done = { id: null, finish_reason: null, usage: null };
  let buffer = "";
  for (;;) {
    const { value, done: ended } = await reader.read();
    if (ended) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const message = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = message.split("\n").filter((line) => line.startsWith("data: ")).map((line) => line.slice(6)).join("\n");
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(`${chunk.error.code}: ${chunk.error.message}`);
      done.id = chunk.id || done.id;
      if (chunk.usage) done.usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const text = chat ? choice.delta && choice.delta.content : choice.text;
        if (text) onText(text);
        if (choice.finish_reason) done.finish_reason = choice.finish_reason;
      }
    }
  }
  return done;
}

// ------------------------------------------------------------------------------------------------------
// Start
// ------------------------------------------------------------------------------------------------------

function start() {
  setUpKeyPanel();
  const [view, id] = location.pathname.replace(/^\/ui\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  const current = view || "jobs";
  for (const link of document.querySelectorAll("nav a")) {
    const active = link.dataset.view === current || (current === "generations" && link.dataset.view === "jobs");
    if (active) link.setAttribute("aria-current", "page");
  }
  if (current === "jobs") jobsView();
  else if (current === "generations" && id) generationView(id);
  else if (current === "fine-tunes" && id) fineTuneView(id);
  else if (current === "fine-tunes") fineTunesView();
  else if (current === "playground") playgroundView();
  else replace(main(), h("h1", {}, "Not found"), h("p", {}, h("a", { href: "/ui/jobs" }, "Jobs")));
  document.title = `llmq · ${id || current}`;
}

document.addEventListener("DOMContentLoaded", start);
