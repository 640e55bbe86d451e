"""The review page: one HTML document with its script and style inline (nothing is fetched from
the network, so it works in a reading room without internet), talking to `medrpn.review.server`.

Left, the studies and their images; middle, the image with each finding's box drawn over it
(numbered, coloured by mark: white unmarked, green confirmed, red rejected, orange other type) and
window centre / width sliders (DICOM sources: the file's own window first); right, the findings
with score, class and three buttons (confirm, reject, other type + class) and the operating point
the findings were cut at. Marks are saved on the server the moment they are made.
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>medrpn review</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 0; display: flex; height: 100vh; background: #111; color: #ddd; }
nav { width: 220px; overflow: auto; border-right: 1px solid #333; padding: 8px; }
nav div.image { cursor: pointer; padding: 2px 6px; }
nav div.image.current { background: #345; }
main { flex: 1; display: flex; flex-direction: column; align-items: center; padding: 8px; }
#stage { position: relative; }
#stage img, #stage svg { position: absolute; left: 0; top: 0; }
aside { width: 330px; overflow: auto; border-left: 1px solid #333; padding: 8px; }
.finding { border: 1px solid #444; margin: 6px 0; padding: 6px; }
.finding.confirmed { border-color: #3c3; } .finding.rejected { border-color: #c33; } .finding.wrong_type { border-color: #e90; }
button { margin-right: 4px; } label { margin-right: 8px; }
</style></head>
<body>
<nav id="studies"></nav>
<main>
  <div id="controls">
    <label>window centre <input id="center" type="range"></label>
    <label>width <input id="width" type="range"></label>
    <span id="window"></span>
  </div>
  <div id="stage"><img id="picture" alt="image"><svg id="boxes"></svg></div>
</main>
<aside><div id="operating"></div><div id="findings"></div></aside>
<script>
const colours = {confirmed: "#3c3", rejected: "#c33", wrong_type: "#e90"};
let data = null, current = null;
const display = 640;

async function load() {
  data = await (await fetch("api/studies")).json();
  const nav = document.getElementById("studies");
  nav.innerHTML = "";
  data.studies.forEach((study) => {
    const title = document.createElement("div");
    title.textContent = study.folder;
    title.style.fontWeight = "bold";
    nav.appendChild(title);
    study.images.forEach((image) => {
      const row = document.createElement("div");
      row.className = "image";
      row.dataset.key = image.key;
      row.textContent = image.source + " (" + image.findings.length + ")";
      row.onclick = () => show(image.key);
      nav.appendChild(row);
    });
  });
  const first = data.studies.flatMap((s) => s.images)[0];
  if (first) show(current || first.key);
}

function find(key) {
  for (const study of data.studies) for (const image of study.images) if (image.key === key) return [study, image];
}

function show(key) {
  current = key;
  const [study, image] = find(key);
  document.querySelectorAll("nav div.image").forEach((row) => row.classList.toggle("current", row.dataset.key === key));
  document.getElementById("operating").textContent =
    "score threshold " + study.score_threshold + " (" + study.threshold_source + ")";
  const center = document.getElementById("center"), width = document.getElementById("width");
  const controls = document.getElementById("controls");
  controls.style.visibility = image.adjustable ? "visible" : "hidden";
  if (image.window) {
    const [c, w] = image.window;
    center.min = c - 2 * w; center.max = c + 2 * w; center.step = w / 200; center.value = c;
    width.min = 1; width.max = 4 * w; width.step = w / 200; width.value = w;
  }
  center.oninput = width.oninput = () => picture(image);
  picture(image);
  draw(image);
  list(image);
}

function picture(image) {
  const c = document.getElementById("center").value, w = document.getElementById("width").value;
  const query = image.adjustable ? "&center=" + c + "&width=" + w : "";
  document.getElementById("window").textContent = image.adjustable ? "C " + Number(c).toFixed(0) + " W " + Number(w).toFixed(0) : "";
  const img = document.getElementById("picture");
  const scale = display / Math.max(image.width, image.height);
  img.width = image.width * scale; img.height = image.height * scale;
  img.src = "api/image?key=" + encodeURIComponent(image.key) + query;
}

function draw(image) {
  const svg = document.getElementById("boxes");
  const scale = display / Math.max(image.width, image.height);
  svg.setAttribute("width", image.width * scale); svg.setAttribute("height", image.height * scale);
  document.getElementById("stage").style.width = image.width * scale + "px";
  document.getElementById("stage").style.height = image.height * scale + "px";
  svg.innerHTML = "";
  image.findings.forEach((f, n) => {
    const [x1, y1, x2, y2] = f.box_px.map((v) => v * scale);
    const colour = f.mark ? colours[f.mark.mark] : "#fff";
    svg.innerHTML += `<rect class="box" x="${x1}" y="${y1}" width="${x2 - x1}" height="${y2 - y1}" fill="none" stroke="${colour}" stroke-width="2"/>` +
      `<text x="${x1 + 2}" y="${Math.max(12, y1 - 3)}" fill="${colour}" font-size="12">${n + 1}</text>`;
  });
}

function list(image) {
  const box = document.getElementById("findings");
  box.innerHTML = "";
  image.findings.forEach((f, n) => {
    const div = document.createElement("div");
    div.className = "finding " + (f.mark ? f.mark.mark : "");
    const other = data.class_names.filter((c) => c !== f.label).map((c) => `<option>${c}</option>`).join("");
    div.innerHTML = `<b>${n + 1}. ${f.label}</b> ${f.score.toFixed(2)}` +
      (f.mark ? ` &mdash; <i class="mark">${f.mark.mark.replace("_", " ")}${f.mark.mark === "wrong_type" ? ": " + f.mark.label : ""}</i>` : "") +
      `<div><button class="confirm">confirm</button><button class="reject">reject</button>` +
      `<button class="wrong">other type</button><select>${other}</select></div>`;
    div.querySelector(".confirm").onclick = () => send(f.key, "confirmed");
    div.querySelector(".reject").onclick = () => send(f.key, "rejected");
    div.querySelector(".wrong").onclick = () => send(f.key, "wrong_type", div.querySelector("select").value);
    box.appendChild(div);
  });
}

async function send(key, mark, label) {
  const response = await fetch("api/marks", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({key: key, mark: mark, label: label || null})});
  if (!response.ok) { alert(await response.text()); return; }
  await load();
}

load();
</script>
</body></html>
"""
