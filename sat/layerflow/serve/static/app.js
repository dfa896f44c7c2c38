// The page of `layerflow serve`: a form that posts a job to the server's JSON API, polls it while it
// runs (queue position, stage, a progress bar per denoising step) and shows the finished sample's
// layers side by side. Plain JavaScript, no build step, nothing loaded from the network but the
// server itself. The API is the one README's "Web page" section lists; tests/serve/test_browser.py
// finds the elements by their ids (#task, #prompt-fg, #given-file, #progress, #status, #results, ...).
"use strict";

const POLL_MS = 300;
const LAYER_ORDER = ["fg", "alpha", "bg", "blend"];
const LAYER_LABELS = { fg: "foreground", alpha: "alpha", bg: "background", blend: "blend" };
const TASK_LABELS = {
  gen: "gen: all layers",
  seg: "seg: split a blend",
  fg2bg: "fg2bg: add background",
  bg2fg: "bg2fg: add foreground",
};
const TASK_HELP = {
  gen: "Writes a foreground, a background and their blend from three prompts.",
  seg: "Give a blended video; the model separates its foreground and background.",
  fg2bg: "Give a foreground; the model writes a background and the blend around it.",
  bg2fg: "Give a background; the model writes a foreground and the blend on top of it.",
};
const STAGE_LABELS = {
  text_encoder: "encoding the prompts",
  vae_encode: "encoding the given layer",
  denoise: "denoising",
  vae_decode: "decoding the layers",
  write: "writing the sample folder",
};
const SCORE_LABELS = {
  psnr_db: ["PSNR", " dB", 2],
  ssim: ["SSIM", "", 3],
  edge_psnr_db: ["edge PSNR", " dB", 2],
  edge_ssim: ["edge SSIM", "", 3],
  alpha_temporal_change: ["alpha change per frame", "", 3],
  edge_fraction: ["edge fraction", "", 3],
};
const IMAGE_TYPES = [".png", ".jpg", ".jpeg"];

const page = {
  catalogue: null, // GET /api/tasks
  given: null, // the uploaded given layer: {file, id, info}
  job: null, // the id of the job this page runs or ran last
  shown: null, // the id of the job whose result is shown (compose works on it)
  started: 0, // when it was posted (ms), for the time in the status line
};

const $ = (id) => document.getElementById(id);

// ---- the status line -------------------------------------------------------------------------

function oneLine(text) {
  return String(text).replace(/\s+/g, " ").trim();
}

function setStatus(text, kind = "") {
  const status = $("status");
  status.textContent = oneLine(text);
  status.title = status.textContent;
  status.className = kind;
}

function showError(error) {
  setStatus(error instanceof Error ? error.message : error, "error");
}

// ---- talking to the server -------------------------------------------------------------------

async function requestJson(url, options = {}) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (error) {
    throw new Error(`the server did not answer ${url} (${error.message})`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    body = null;
  }
  if (!response.ok) {
    throw new Error(body && body.error ? body.error : `${url}: HTTP ${response.status} ${response.statusText}`);
  }
  return body;
}

function postJson(url, body) {
  return requestJson(url, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
}

// MiB to one decimal, rounded up (a file just over a 1 MB limit reads 1.1 MB, not 1.0 MB)
function megabytes(bytes) {
  const mb = Math.ceil((bytes / (1024 * 1024)) * 10) / 10;
  return `${Number.isInteger(mb) ? mb : mb.toFixed(1)} MB`;
}

function suffixOf(name) {
  const dot = name.lastIndexOf(".");
  return dot > 0 ? name.slice(dot).toLowerCase() : "";
}

// The server refuses these too (413 / 415); checking here first spares sending a large file for nothing.
function refusalOf(file) {
  const limits = page.catalogue.limits;
  const suffix = suffixOf(file.name);
  if (!limits.upload_types.includes(suffix)) {
    const what = suffix ? `${suffix} files are` : "a file without a suffix is";
    return `${file.name}: ${what} not taken (expected ${limits.upload_types.join(" ")})`;
  }
  if (file.size > limits.upload_bytes) {
    return `${file.name}: ${megabytes(file.size)} is over the upload limit (${megabytes(limits.upload_bytes)})`;
  }
  return null;
}

async function upload(file) {
  const refusal = refusalOf(file);
  if (refusal) {
    throw new Error(refusal);
  }
  const url = `/api/uploads?filename=${encodeURIComponent(file.name)}`;
  try {
    return await requestJson(url, { method: "POST", body: file });
  } catch (error) {
    // the line names the file, whether the server's words do or not
    throw new Error(error.message.includes(file.name) ? error.message : `${file.name}: ${error.message}`);
  }
}

// ---- the form --------------------------------------------------------------------------------

function currentEntry() {
  const task = $("task").value;
  const variant = $("variant").value;
  return page.catalogue.tasks.find((entry) => entry.task === task && entry.variant === variant);
}

function fillSelect(select, values, labels = {}) {
  const previous = select.value;
  select.replaceChildren(
    ...values.map((value) => {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = labels[value] || value;
      return option;
    }),
  );
  if (values.includes(previous)) {
    select.value = previous;
  }
}

function fillVariants() {
  const task = $("task").value;
  const variants = page.catalogue.tasks.filter((entry) => entry.task === task).map((entry) => entry.variant);
  fillSelect($("variant"), variants, { rgb: "rgb", rgba: "rgba" });
}

function layerName(layer) {
  return LAYER_LABELS[layer] || layer;
}

function showPrompts(entry) {
  for (const field of document.querySelectorAll("[data-prompt]")) {
    field.hidden = !entry.prompts.includes(field.dataset.prompt);
  }
}

function showGiven(entry) {
  const given = entry.given[0];
  $("given").hidden = !given;
  if (!given) {
    return;
  }
  const types = page.catalogue.limits.upload_types;
  const input = $("given-file");
  input.accept = types.join(",");
  $("given-label").textContent = `Given ${layerName(given.layer)} (${given.layer})`;
  const alpha = given.needs_alpha
    ? "It must carry alpha: RGBA PNG frames (a .zip), an RGBA .png, or a video with an alpha channel."
    : "A video, PNG frames as a .zip, or one image.";
  $("given-help").textContent = `${alpha} Up to ${megabytes(page.catalogue.limits.upload_bytes)}; ${types.join(" ")}.`;
}

function updateForm() {
  const entry = currentEntry();
  if (!entry) {
    return;
  }
  showPrompts(entry);
  showGiven(entry);
  $("task-help").textContent = `${TASK_HELP[entry.task] || ""} Layout ${entry.name}.`;
}

function fillDefaults(catalogue) {
  const { defaults, limits } = catalogue;
  $("seed").value = defaults.seed;
  $("steps").value = defaults.steps;
  $("steps").max = limits.max_steps;
  $("guidance").value = defaults.guidance;
  fillSelect($("size"), limits.sizes);
  $("size").value = defaults.size || limits.sizes[0];
}

async function loadCatalogue() {
  const catalogue = await requestJson("/api/tasks");
  page.catalogue = catalogue;
  const tasks = [...new Set(catalogue.tasks.map((entry) => entry.task))];
  fillSelect($("task"), tasks, TASK_LABELS);
  fillVariants();
  if ([...$("variant").options].some((option) => option.value === "rgba")) {
    $("variant").value = "rgba";
  }
  fillDefaults(catalogue);
  updateForm();
  if (catalogue.model) {
    const badge = $("model");
    badge.textContent = catalogue.model === "tiny" ? "tiny model (random weights, no checkpoint)" : "release checkpoints";
    badge.hidden = false;
  }
  setStatus("ready");
}

function jobRequest(entry) {
  const prompts = {};
  for (const layer of entry.prompts) {
    const box = $(`prompt-${layer}`);
    if (!box.value.trim()) {
      box.focus();
      throw new Error(`the ${layerName(layer)} prompt is empty`);
    }
    prompts[layer] = box.value.trim();
  }
  return {
    task: entry.task,
    variant: entry.variant,
    prompts,
    seed: Number($("seed").value),
    steps: Number($("steps").value),
    guidance: Number($("guidance").value),
    size: $("size").value,
  };
}

async function givenUploads(entry) {
  const given = entry.given[0];
  if (!given) {
    return null;
  }
  const file = $("given-file").files[0];
  if (!file) {
    throw new Error(`choose the given ${layerName(given.layer)} file first`);
  }
  if (!page.given || page.given.file !== file) {
    await uploadGiven();
  }
  if (!page.given) {
    throw new Error(`${file.name} was refused; choose another file`);
  }
  return { [given.layer]: page.given.id };
}

async function uploadGiven() {
  const file = $("given-file").files[0];
  page.given = null;
  if (!file) {
    return;
  }
  setStatus(`uploading ${file.name}…`);
  try {
    const info = await upload(file);
    page.given = { file, id: info.upload, info };
    const frames = info.frames ? `, ${info.frames} frame${info.frames === 1 ? "" : "s"}` : "";
    const alpha = info.alpha === undefined ? "" : info.alpha ? ", with alpha" : ", no alpha";
    setStatus(`uploaded ${info.filename} (${info.kind}${frames}${alpha})`);
  } catch (error) {
    $("given-file").value = "";
    showError(error);
  }
}

function setBusy(busy) {
  const button = $("generate");
  button.disabled = busy;
  button.textContent = busy ? "Generating…" : "Generate";
}

async function generate(event) {
  event.preventDefault();
  const entry = currentEntry();
  setBusy(true);
  try {
    const request = jobRequest(entry);
    const given = await givenUploads(entry);
    if (given) {
      request.given = given;
    }
    const progress = $("progress");
    progress.max = request.steps || 1;
    progress.value = 0;
    $("progress-text").textContent = "";
    const answer = await postJson("/api/jobs", request);
    page.job = answer.job;
    page.started = Date.now();
    showQueued(answer.position);
    setTimeout(() => poll(answer.job), POLL_MS);
  } catch (error) {
    showError(error);
    setBusy(false);
  }
}

// ---- following a job -------------------------------------------------------------------------

function showQueued(position) {
  setStatus(position > 0 ? `queued: ${position} job${position === 1 ? "" : "s"} ahead` : "queued: next");
}

function showProgress(job) {
  const progress = $("progress");
  if (job.steps) {
    progress.max = job.steps;
    progress.value = Math.min(job.step || 0, job.steps);
    $("progress-text").textContent = `${progress.value}/${job.steps}`;
  }
  if (job.state === "queued") {
    showQueued(job.position);
  } else if (job.state === "running") {
    const stage = STAGE_LABELS[job.stage] || job.stage || "starting";
    const step = job.stage === "denoise" && job.steps ? `, step ${job.step} of ${job.steps}` : "";
    setStatus(`running: ${stage}${step}`);
  }
}

async function poll(jobId) {
  if (jobId !== page.job) {
    return;
  }
  let job;
  try {
    job = await requestJson(`/api/jobs/${encodeURIComponent(jobId)}`);
  } catch (error) {
    showError(error);
    setBusy(false);
    return;
  }
  showProgress(job);
  if (job.state === "done") {
    const seconds = (job.seconds ?? (Date.now() - page.started) / 1000).toFixed(1);
    $("progress").value = $("progress").max;
    showResult(job);
    setStatus(`done: ${job.job} in ${seconds} s`, "done");
    setBusy(false);
  } else if (job.state === "failed") {
    showError(job.error || "the run failed");
    setBusy(false);
  } else {
    setTimeout(() => poll(jobId), POLL_MS);
  }
}

// ---- the result ------------------------------------------------------------------------------

function layerVideo(src, caption, attribute, value) {
  const figure = document.createElement("figure");
  figure.className = "tile";
  const video = document.createElement("video");
  Object.assign(video, { controls: true, loop: true, muted: true, playsInline: true, autoplay: true, preload: "auto" });
  video.dataset[attribute] = value;
  video.src = src;
  video.setAttribute("aria-label", caption);
  if (value === "alpha") {
    video.classList.add("matte");
  }
  const label = document.createElement("figcaption");
  label.textContent = caption;
  figure.append(video, label);
  return figure;
}

function orderedLayers(result) {
  const layers = { ...result.layers };
  if (result.alpha) {
    layers.alpha = result.alpha;
  }
  const names = Object.keys(layers);
  const known = LAYER_ORDER.filter((name) => names.includes(name));
  return [...known, ...names.filter((name) => !LAYER_ORDER.includes(name))].map((name) => [name, layers[name]]);
}

function showLayers(result) {
  const given = result.given || {};
  $("layers").replaceChildren(
    ...orderedLayers(result).map(([name, src]) => {
      // a given layer's slot holds its latents decoded by the VAE, next to the generated layers
      const caption = `${layerName(name)}${name in given ? " (given, re-decoded)" : ""}`;
      return layerVideo(src, caption, "layer", name);
    }),
  );
  const givenNames = Object.keys(given);
  $("given-views").hidden = givenNames.length === 0;
  $("given-tiles").replaceChildren(
    ...givenNames.map((name) => layerVideo(given[name], `given ${layerName(name)}`, "given", name)),
  );
}

function showAlphaViews(result) {
  const hasAlpha = Boolean(result.fg_alpha);
  $("alpha-views").hidden = !hasAlpha;
  $("no-alpha").hidden = hasAlpha;
  const composed = $("composed");
  composed.removeAttribute("src");
  composed.load();
  $("composed-caption").textContent = "composed (press Compose)";
  for (const id of ["fg-checker", "fg-preview"]) {
    const video = $(id);
    if (hasAlpha) {
      video.src = result.fg_alpha;
    } else {
      video.removeAttribute("src");
      video.load();
    }
  }
  previewBackground();
}

function formatScore(score) {
  if (!score || Object.keys(score).length === 0) {
    return "not scored (scores need the RGBA variant's alpha)";
  }
  return Object.entries(score)
    .filter(([, value]) => typeof value === "number")
    .map(([key, value]) => {
      const [label, unit, digits] = SCORE_LABELS[key] || [key.replace(/_/g, " "), "", 3];
      return `${label} ${value.toFixed(digits)}${unit}`;
    })
    .join(" · ");
}

function showResult(job) {
  const { result } = job;
  const entry = currentEntry();
  page.shown = job.job;
  $("result-title").textContent = `Result ${job.job}`;
  showLayers(result);
  showAlphaViews(result);
  const score = $("score");
  score.textContent = formatScore(result.score);
  score.title = "how well the blend matches the foreground laid over the background by the alpha";
  $("meta-link").href = result.meta;
  const link = $("download-zip");
  link.href = result.zip;
  link.download = `${job.job}.zip`;
  $("placeholder").hidden = true;
  $("results").hidden = false;
  $("results").dataset.layout = entry ? entry.name : "";
}

function playAll() {
  const videos = [...document.querySelectorAll("#results video")].filter((video) => video.src);
  for (const video of videos) {
    video.pause();
    video.currentTime = 0;
  }
  for (const video of videos) {
    video.play().catch(() => {});
  }
}

// ---- compose ---------------------------------------------------------------------------------

let previewUrl = null;

function previewBackground() {
  const preview = $("fg-preview");
  const image = $("bg-image").files[0];
  if (previewUrl) {
    URL.revokeObjectURL(previewUrl);
    previewUrl = null;
  }
  if (image && IMAGE_TYPES.includes(suffixOf(image.name))) {
    previewUrl = URL.createObjectURL(image);
    preview.style.backgroundImage = `url("${previewUrl}")`;
  } else {
    preview.style.backgroundImage = "none";
  }
  preview.style.backgroundColor = $("bg-colour").value;
}

async function compose() {
  if (!page.shown) {
    return;
  }
  const button = $("compose");
  button.disabled = true;
  try {
    const image = $("bg-image").files[0];
    let body;
    let over;
    if (image) {
      setStatus(`uploading ${image.name}…`);
      body = { background: (await upload(image)).upload };
      over = image.name;
    } else {
      body = { colour: $("bg-colour").value };
      over = body.colour;
    }
    setStatus(`composing the foreground over ${over}…`);
    const answer = await postJson(`/api/jobs/${encodeURIComponent(page.shown)}/compose`, body);
    const composed = $("composed");
    composed.src = answer.video;
    composed.play().catch(() => {});
    $("composed-caption").textContent = `composed over ${over}`;
    setStatus(`composed over ${over}`, "done");
  } catch (error) {
    showError(error);
  } finally {
    button.disabled = false;
  }
}

// ---- wiring ----------------------------------------------------------------------------------

function start() {
  $("task").addEventListener("change", () => {
    fillVariants();
    updateForm();
  });
  $("variant").addEventListener("change", updateForm);
  $("given-file").addEventListener("change", uploadGiven);
  $("form").addEventListener("submit", generate);
  $("play-all").addEventListener("click", playAll);
  $("compose").addEventListener("click", compose);
  $("bg-colour").addEventListener("input", () => {
    $("bg-image").value = ""; // a colour picked after an image replaces it
    previewBackground();
  });
  $("bg-image").addEventListener("change", previewBackground);
  loadCatalogue().catch((error) => {
    showError(`could not load the tasks: ${error.message}`);
    $("generate").disabled = true;
  });
}

start();
