// The page: configuration, login, tabs; the panels do the rest.

import { connect, errorText, loadConfig } from "./api.js";
import { serviceWarning } from "./safety.js";
import { $, run, say, showBanner } from "./ui.js";
import { DataPanel } from "./panels/data.js";
import { TrainPanel } from "./panels/train.js";
import { SegmentPanel } from "./panels/segment.js";
import { ExportPanel } from "./panels/export.js";

const TOKEN_KEY = "cellpose-finetuning-token";

/** What the panels share: the connection, lists, and a tiny event bus. */
class App {
  constructor(config) {
    this.config = config;
    this.conn = null;
    this.datasets = [];
    this.sessions = [];
    this.listeners = {};
  }

  on(event, fn) {
    (this.listeners[event] ||= []).push(fn);
  }

  emit(event, ...args) {
    for (const fn of this.listeners[event] || []) {
      try {
        fn(...args);
      } catch (err) {
        showBanner(errorText(err));
      }
    }
  }

  setDatasets(list) {
    this.datasets = list;
    this.emit("datasets", list);
  }

  setSessions(list) {
    this.sessions = list;
    this.emit("sessions", list);
  }

  showTab(name) {
    for (const btn of document.querySelectorAll(".tab-btn")) {
      btn.classList.toggle("active", btn.dataset.tab === name);
    }
    for (const tab of document.querySelectorAll("section.tab")) tab.hidden = tab.id !== `tab-${name}`;
    this.emit("tab", name);
  }
}

function setState(state) {
  $("#app-state").dataset.state = state;
}

async function main() {
  window.addEventListener("unhandledrejection", (e) => showBanner(errorText(e.reason)));
  const config = await loadConfig();
  const app = new App(config);
  window.cellposeApp = app; // for debugging from the console
  $("#server-url").textContent = config.serverUrl;
  $("#service-id").value = config.serviceId;
  const panels = [new DataPanel(app), new TrainPanel(app), new SegmentPanel(app), new ExportPanel(app)];

  for (const btn of document.querySelectorAll(".tab-btn")) {
    btn.addEventListener("click", () => app.showTab(btn.dataset.tab));
  }

  const warnService = () => {
    const text = serviceWarning($("#service-id").value.trim(), config.configuredServiceId);
    say($("#service-warning"), text, "error");
  };
  $("#service-id").addEventListener("input", warnService);
  warnService();

  async function login(token) {
    app.config.serviceId = $("#service-id").value.trim();
    const conn = await connect(app.config, token);
    app.conn = conn;
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    $("#who").textContent = conn.anonymous
      ? "anonymous visitor (segmentation with cpsam only)"
      : `${conn.user.id} · workspace ${conn.workspace}`;
    $("#login").hidden = true;
    $("#tabs").hidden = false;
    $("#logout-btn").hidden = false;
    for (const btn of document.querySelectorAll(".tab-btn")) {
      const allowed = !conn.anonymous || btn.dataset.tab === "segment";
      btn.disabled = !allowed;
      btn.title = allowed ? "" : "log in with a token to use this";
    }
    // Asked once; the train, segment and export panels all build forms from it.
    conn.capabilities = conn.call("get_training_capabilities");
    conn.capabilities.catch(() => {}); // each panel reports a failure in its own message
    await Promise.all(panels.map((p) => p.start(conn)));
    app.showTab(conn.anonymous ? "segment" : "data");
    setState(conn.anonymous ? "anonymous" : "connected");
  }

  $("#login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const token = $("#token").value.trim();
    if (!token) {
      say($("#login-msg"), "Paste a token first (or continue anonymously).", "error");
      return;
    }
    run($("#login-btn"), $("#login-msg"), () => login(token));
  });
  $("#anon-btn").addEventListener("click", () => run($("#anon-btn"), $("#login-msg"), () => login(null)));
  $("#logout-btn").addEventListener("click", async () => {
    sessionStorage.removeItem(TOKEN_KEY);
    for (const p of panels) p.stop?.();
    if (app.conn) await app.conn.disconnect();
    // a fresh page: nothing of this user stays on screen
    window.location.reload();
  });

  if (!config.serviceId) {
    say($("#login-msg"), "This page does not know its service: add ?service=<workspace>/cellpose-finetuning to the address.", "error");
  }
  setState("login");
  const saved = sessionStorage.getItem(TOKEN_KEY);
  // never log in by itself to a service other than the server's own
  const foreign = serviceWarning(config.serviceId, config.configuredServiceId);
  if (saved && config.serviceId && !foreign) await run(null, $("#login-msg"), () => login(saved));
}

main().catch((err) => {
  showBanner(`The page could not start: ${errorText(err)}`);
  setState("broken");
});
