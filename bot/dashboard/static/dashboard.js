// kugetsu dashboard: elapsed times that tick, the overview refreshed in place, and an
// agent's log followed live over server-sent events. No framework, no build step.
"use strict";

function duration(seconds) {
  seconds = Math.max(0, Math.round(seconds));
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  if (h) return h + "h" + String(m).padStart(2, "0") + "m";
  if (m) return m + "m" + String(s).padStart(2, "0") + "s";
  return s + "s";
}

function tick() {
  const now = Date.now() / 1000;
  for (const el of document.querySelectorAll("time.elapsed[data-since]")) {
    el.textContent = duration(now - parseFloat(el.dataset.since));
  }
}

function refreshOverview(live) {
  const every = parseInt(live.dataset.refresh, 10) || 5000;
  async function again() {
    if (!document.hidden) {
      const url = new URL(location.href);
      url.searchParams.set("fragment", "live");
      try {
        const answer = await fetch(url, { credentials: "same-origin" });
        if (answer.ok) { live.innerHTML = await answer.text(); tick(); }
        else if (answer.status === 401) { location.reload(); return; }
      } catch (e) { /* offline for a moment: try again later */ }
    }
    setTimeout(again, every);
  }
  setTimeout(again, every);
}

// The log: at most MAX_CHARS stay on the page; older chunks leave from the top.
const MAX_CHARS = 2000000;

function followLog(pre) {
  const status = document.getElementById("log-status");
  let first = parseInt(pre.dataset.start, 10) || 0;
  let shown = 0, dropped = false, finished = false;
  const atBottom = () => pre.scrollHeight - pre.scrollTop - pre.clientHeight < 40;

  function add(text) {
    const stick = atBottom();
    pre.appendChild(document.createTextNode(text));
    shown += text.length;
    while (shown > MAX_CHARS && pre.firstChild) {
      shown -= pre.firstChild.textContent.length;
      pre.removeChild(pre.firstChild);
      dropped = true;
    }
    if (stick) pre.scrollTop = pre.scrollHeight;
  }

  const source = new EventSource(pre.dataset.stream + "?from=" + first);
  source.addEventListener("open", () => { if (!finished) status.textContent = "Live: following the log."; });
  source.addEventListener("log", (e) => {
    add(JSON.parse(e.data));
    if (!finished) status.textContent = "Live: " + Number(e.lastEventId).toLocaleString() + " bytes"
      + (dropped ? " (the oldest lines on this page were let go; download the whole log for all)" : "");
  });
  source.addEventListener("reset", () => { pre.textContent = ""; shown = 0; });
  source.addEventListener("end", (e) => {
    finished = true;
    status.textContent = "The task has finished: " + Number(e.lastEventId).toLocaleString() + " bytes in all.";
    source.close();
  });
  source.addEventListener("busy", (e) => {
    const limit = JSON.parse(e.data).limit;
    status.textContent = "Live logs paused: " + limit + " people are already following live logs, "
      + "as many as this server allows. Trying again in 10 s.";
  });
  source.addEventListener("error", () => {
    if (!finished && source.readyState === EventSource.CONNECTING) status.textContent = "Reconnecting…";
  });

  const earlier = document.getElementById("log-earlier");
  if (earlier) earlier.addEventListener("click", async () => {
    const answer = await fetch(pre.dataset.part + "?end=" + first, { credentials: "same-origin" });
    if (!answer.ok) return;
    const text = await answer.text();
    first = parseInt(answer.headers.get("X-Log-Start"), 10) || 0;
    pre.insertBefore(document.createTextNode(text), pre.firstChild);
    shown += text.length;
    if (first === 0) earlier.remove();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  tick();
  setInterval(tick, 1000);
  const live = document.getElementById("live");
  if (live) refreshOverview(live);
  const pre = document.getElementById("log");
  if (pre) followLog(pre);
});
