// batchcxr review app: opacity, zoom and outline controls, keyboard shortcuts. No inline script (CSP).
"use strict";
document.querySelectorAll(".viewer-section").forEach((section) => {
  const overlays = section.querySelectorAll("img.overlay");
  const outlines = section.querySelectorAll("img.lungs");
  const opacity = section.querySelector(".opacity");
  const zoom = section.querySelector(".zoom");
  const outline = section.querySelector(".outline-toggle");
  if (!opacity) return;
  opacity.addEventListener("input", () => overlays.forEach((o) => { o.style.opacity = opacity.value / 100; }));
  zoom.addEventListener("input", () => section.querySelectorAll(".stack").forEach((s) => { s.style.width = zoom.value + "%"; }));
  outline.addEventListener("change", () => outlines.forEach((o) => { o.hidden = !outline.checked; }));
});
// Keys work after any control was used: only typing in a text field keeps them; Escape leaves it.
const typing = (el) => el && (el.tagName === "TEXTAREA" || (el.tagName === "INPUT" && ["text", "search", "password"].includes(el.type)));
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape") { if (document.activeElement) document.activeElement.blur(); return; }
  if (typing(e.target) || e.ctrlKey || e.metaKey || e.altKey) return;
  const click = (id) => { const el = document.getElementById(id); if (el) el.click(); };
  if (e.key === "j") click("next");
  else if (e.key === "k") click("prev");
  else if (e.key === "1") click("verdict-yes");
  else if (e.key === "2") click("verdict-no");
  else if (e.key === "3") click("verdict-uncertain");
  else if (e.key === "o") document.querySelectorAll(".outline-toggle").forEach((t) => { t.click(); });
  else return;
  e.preventDefault();
});
