// batchcxr review app: overlay toggle, opacity, zoom and keyboard shortcuts. No inline script (CSP).
"use strict";
document.querySelectorAll(".viewer-section").forEach((section) => {
  const select = section.querySelector(".overlay-select");
  const overlay = section.querySelector("img.overlay");
  const opacity = section.querySelector(".opacity");
  const zoom = section.querySelector(".zoom");
  const stack = section.querySelector(".stack");
  if (!select) return;
  select.addEventListener("change", () => {
    if (select.value) { overlay.src = select.value; overlay.hidden = false; } else { overlay.hidden = true; }
  });
  opacity.addEventListener("input", () => { overlay.style.opacity = opacity.value / 100; });
  zoom.addEventListener("input", () => { stack.style.width = zoom.value + "%"; });
});
document.addEventListener("keydown", (e) => {
  if (e.target.closest("input, select, textarea")) return;
  const click = (id) => { const el = document.getElementById(id); if (el) el.click(); };
  if (e.key === "j") click("next");
  else if (e.key === "k") click("prev");
  else if (e.key === "1") click("verdict-yes");
  else if (e.key === "2") click("verdict-no");
  else if (e.key === "3") click("verdict-uncertain");
  else if (e.key === "o") {
    const first = document.querySelector(".overlay-select");
    if (first) { first.selectedIndex = (first.selectedIndex + 1) % first.options.length; first.dispatchEvent(new Event("change")); }
  }
});
