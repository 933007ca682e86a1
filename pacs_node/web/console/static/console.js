// Region boxes over the rendered image (coordinates are the image's own pixels, from the AI SR), and
// live queue counts on the queue page. No framework, nothing fetched from outside the node.
"use strict";

function drawBoxes(img) {
  const svg = img.parentElement.querySelector("svg.boxes");
  const boxes = JSON.parse(img.dataset.boxes || "[]");
  const ns = "http://www.w3.org/2000/svg";
  // The server may have scaled the image down: the SR's pixel grid is the DICOM image's.
  const columns = Number(img.dataset.columns || img.naturalWidth);
  const rows = Number(img.dataset.rows || img.naturalHeight);
  svg.setAttribute("viewBox", `0 0 ${columns} ${rows}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.replaceChildren();
  for (const region of boxes) {
    const [x0, y0, x1, y1] = region.box;
    const rect = document.createElementNS(ns, "rect");
    rect.setAttribute("x", x0); rect.setAttribute("y", y0);
    rect.setAttribute("width", x1 - x0); rect.setAttribute("height", y1 - y0);
    rect.setAttribute("vector-effect", "non-scaling-stroke");
    rect.dataset.region = region.name;
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", x0 + 2); label.setAttribute("y", y0 + 12);
    label.textContent = region.name;
    svg.append(rect, label);
  }
  svg.dataset.drawn = String(boxes.length);
}

async function refreshCounts() {
  try {
    const response = await fetch("/api/queue/counts", {credentials: "same-origin"});
    if (!response.ok) return;
    const counts = await response.json();
    for (const cell of document.querySelectorAll("#counts .n")) {
      cell.textContent = counts[cell.dataset.state] ?? 0;
    }
  } catch (error) { /* the node restarting: try again at the next tick */ }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const img of document.querySelectorAll("img[data-boxes]")) {
    if (img.complete && img.naturalWidth) drawBoxes(img);
    else img.addEventListener("load", () => drawBoxes(img));
  }
  if (document.getElementById("counts")) setInterval(refreshCounts, 2000);
});
