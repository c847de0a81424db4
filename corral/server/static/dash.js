// corral dashboard: refresh server-rendered fragments in place, follow job logs over
// server-sent events. No framework, nothing fetched from elsewhere.
"use strict";

function toLogin() {
  location.assign("/login?next=" + encodeURIComponent(location.pathname + location.search));
}

function live(el) {
  const url = el.dataset.live;
  const every = parseInt(el.dataset.every || "3000", 10);
  let timer = null;
  async function tick() {
    timer = null;
    if (!document.hidden) {
      try {
        const r = await fetch(url, { credentials: "same-origin", cache: "no-store" });
        if (r.status === 401) return toLogin();
        if (r.ok) {
          const html = await r.text();  // rendered and escaped by the server
          if (html !== el.dataset.last) {
            el.innerHTML = html;
            el.dataset.last = html;
          }
          if (el.hasAttribute("data-until-final") && el.querySelector("[data-final]")) return;
        }
      } catch (e) { /* the server restarts: try again on the next tick */ }
    }
    timer = setTimeout(tick, every);
  }
  timer = setTimeout(tick, every);
}

function follow(pre) {
  const status = document.getElementById("log-status");
  const src = new EventSource(pre.dataset.follow);
  let attempts = 0;
  function append(text, cls) {
    const span = document.createElement("span");
    if (cls) span.className = cls;
    span.textContent = text;  // never parsed as HTML
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.appendChild(span);
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  }
  src.addEventListener("attempt", (ev) => {
    const d = JSON.parse(ev.data);
    attempts += 1;
    if (attempts > 1 || d.attempt > 1) append("── attempt " + d.attempt + " ──\n", "marker");
  });
  src.addEventListener("chunk", (ev) => {
    const d = JSON.parse(ev.data);
    append(d.text, d.stream === "err" ? "err" : "");
    if (status) status.textContent = "following…";
  });
  src.addEventListener("end", (ev) => {
    const d = JSON.parse(ev.data);
    src.close();
    let line = "job " + d.state;
    if (d.exit_code !== null && d.exit_code !== undefined) line += ", exit code " + d.exit_code;
    if (d.reason) line += ": " + d.reason;
    if (status) status.textContent = line;
  });
  src.onerror = () => {
    if (status) status.textContent = "reconnecting…";
    fetch("/jobs?fragment=1", { credentials: "same-origin" }).then((r) => {
      if (r.status === 401) { src.close(); toLogin(); }
    }).catch(() => {});
  };
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-live]").forEach(live);
  document.querySelectorAll("[data-follow]").forEach(follow);
  document.addEventListener("submit", (ev) => {
    const msg = ev.target.dataset && ev.target.dataset.confirm;
    if (msg && !window.confirm(msg)) ev.preventDefault();
  });
});
