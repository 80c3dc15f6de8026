// scaleseg serve: upload an image to POST /predict?format=json and show what comes back.
"use strict";

const $ = (id) => document.getElementById(id);

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
  $("status").textContent = "";
}

async function loadInfo() {
  try {
    const info = await (await fetch("/info")).json();
    const scales = info.scales.join(", ");
    $("model-info").textContent =
      `${info.model} · ${info.classes.length} classes (${info.dataset}) · scales ${scales}` +
      ` (${info.fusion}) · images larger than ${info.max_side} px are ${info.tile ? "tiled" : "downscaled"}`;
  } catch (err) {
    $("model-info").textContent = "model information unavailable";
  }
}

function legendRow(cls) {
  const row = document.createElement("tr");
  row.dataset.classId = cls.id;
  const swatch = document.createElement("td");
  const chip = document.createElement("span");
  chip.className = "swatch";
  chip.style.background = `rgb(${cls.color.join(",")})`;
  swatch.appendChild(chip);
  const id = document.createElement("td");
  id.textContent = cls.id;
  const name = document.createElement("td");
  name.className = "class-name";
  name.textContent = cls.name;
  const share = document.createElement("td");
  const bar = document.createElement("span");
  bar.className = "bar";
  bar.style.width = `${(100 * cls.share).toFixed(1)}%`;
  bar.style.background = `rgb(${cls.color.join(",")})`;
  const value = document.createElement("span");
  value.className = "share";
  value.textContent = `${(100 * cls.share).toFixed(2)} %`;
  share.append(bar, value);
  row.append(swatch, id, name, share);
  return row;
}

function showResult(result, inputUrl) {
  $("input-img").src = inputUrl;
  $("overlay-img").src = result.overlay_png;
  $("color-img").src = result.color_png;
  $("download").href = result.label_png;
  $("timing").textContent =
    `inference ${result.inference_ms.toFixed(1)} ms for ${result.width}×${result.height}` +
    (result.attention.length ? ` (attention maps: ${result.attention_ms.toFixed(1)} ms more)` : "");
  $("resize").textContent = result.resize.message;
  const body = $("legend").querySelector("tbody");
  body.replaceChildren(...result.classes.map(legendRow));
  const maps = $("attention");
  maps.replaceChildren(...result.attention.map((a) => {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = a.png;
    img.alt = `attention at scale ${a.scale}`;
    img.className = "attention-map";
    const cap = document.createElement("figcaption");
    cap.textContent = `scale ${a.scale}×`;
    fig.append(img, cap);
    return fig;
  }));
  $("attention-section").hidden = result.attention.length === 0;
  $("result").hidden = false;
}

async function segment(file) {
  $("error").hidden = true;
  $("status").textContent = `segmenting ${file.name}…`;
  const form = new FormData();
  form.append("file", file);
  let response;
  try {
    response = await fetch("/predict?format=json", { method: "POST", body: form });
  } catch (err) {
    showError(`the server did not answer: ${err}`);
    return;
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail; } catch (err) { /* keep the status text */ }
    showError(`${response.status}: ${detail}`);
    return;
  }
  const result = await response.json();
  showResult(result, URL.createObjectURL(file));
  $("status").textContent = `segmented ${file.name}`;
}

$("file").addEventListener("change", (event) => {
  if (event.target.files.length) segment(event.target.files[0]);
});
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files.length) segment(event.dataTransfer.files[0]);
});
loadInfo();
