// 2 · Train: the form from get_training_capabilities(), the live chart of one
// session, and the list of the user's sessions (stop, continue, delete).

import { drawTrainingChart } from "../chart.js";
import { buildForm, parseValue } from "../form.js";
import { checkSpecs } from "../pairing.js";
import { $, el, formatTime, run, say } from "../ui.js";

const ACTIVE = ["waiting", "preparing", "running"];
const FIRST = ["recipe", "n_epochs", "learning_rate", "weight_decay", "validation_interval", "n_samples"];
const CONTINUE_EPOCHS = { type: "integer", minimum: 1 };

export class TrainPanel {
  constructor(app) {
    this.app = app;
    this.form = null;
    this.watched = null; // session id on the chart
    this.timer = null;
    $("#start-btn").addEventListener("click", () =>
      run($("#start-btn"), $("#train-msg"), () => this.startTraining()),
    );
    $("#sessions-refresh").addEventListener("click", () =>
      run($("#sessions-refresh"), $("#sessions-msg"), () => this.refresh()),
    );
    $("#train-dataset").addEventListener("change", () => this.fillSpecs());
    app.on("datasets", (list) => this.datasetOptions(list));
    app.on("select-dataset", (id, show = true) => {
      $("#train-dataset").value = id;
      this.fillSpecs();
      if (show) app.showTab("train");
    });
    app.on("watch", (id) => this.watch(id));
    window.addEventListener("resize", () => this.lastStatus && drawTrainingChart($("#chart"), this.lastStatus));
  }

  async start(conn) {
    this.conn = conn;
    if (conn.anonymous) return;
    await run(null, $("#train-msg"), async () => {
      const caps = await conn.capabilities;
      this.caps = caps;
      const models = caps.models.map((m) => m.name);
      $("#train-model").replaceChildren(...models.map((n) => el("option", { value: n }, n)));
      this.form = buildForm($("#train-form"), caps.parameters, FIRST);
      // Choosing a recipe fills in its settings (which can still be changed).
      const recipe = $("#param-recipe");
      if (recipe && caps.recipes) {
        recipe.addEventListener("change", () => {
          const chosen = caps.recipes[recipe.value];
          for (const [name, value] of Object.entries(chosen?.settings || {})) this.form.set(name, value);
          say($("#train-msg"), chosen ? chosen.description : "", "ok");
        });
      }
    });
    await run(null, $("#sessions-msg"), () => this.refresh());
  }

  stop() {
    clearTimeout(this.timer);
    clearTimeout(this.listTimer);
  }

  datasetOptions(list) {
    const select = $("#train-dataset");
    const current = select.value;
    select.replaceChildren(
      el("option", { value: "" }, list.length ? "choose a dataset" : "upload a dataset first"),
      ...list.map((ds) => el("option", { value: ds.id }, ds.id)),
    );
    if (list.some((ds) => ds.id === current)) select.value = current;
  }

  fillSpecs() {
    const ds = this.app.datasets.find((d) => d.id === $("#train-dataset").value);
    const specs = ds?.manifest?.cellpose_pairing || {};
    $("#train-images").value = specs.train_images ?? "images/train/";
    $("#train-annotations").value = specs.train_annotations ?? "annotations/train/";
    $("#train-test-images").value = specs.test_images ?? "";
    $("#train-test-annotations").value = specs.test_annotations ?? "";
  }

  async startTraining() {
    const artifact = $("#train-dataset").value;
    if (!artifact) throw new Error("Choose a dataset (upload one in “1 · Data”).");
    if (!this.form) throw new Error("The training settings did not load; reload the page.");
    const values = this.form.values();
    if (!values) throw new Error("Some settings are out of bounds; see the fields marked in red. Nothing was sent.");
    const args = {
      artifact,
      model: $("#train-model").value,
      train_images: $("#train-images").value.trim(),
      train_annotations: $("#train-annotations").value.trim(),
      ...values,
    };
    checkSpecs(args.train_images, args.train_annotations);
    const testImages = $("#train-test-images").value.trim();
    const testMasks = $("#train-test-annotations").value.trim();
    if (testImages || testMasks) {
      checkSpecs(testImages, testMasks, { imagesArg: "test_images", annotationsArg: "test_annotations" });
      Object.assign(args, { test_images: testImages, test_annotations: testMasks });
    }
    const status = await this.conn.call("start_training", args);
    this.watch(status.session_id);
    const warnings = (status.warnings || []).map((w) => ` Warning: ${w}`).join("");
    say($("#train-msg"), `Started session ${status.session_id}.${warnings}`, "ok");
    await this.refresh();
  }

  /** Follow one session on the chart, polling its status every second. */
  watch(sessionId) {
    clearTimeout(this.timer);
    this.watched = sessionId;
    this.lastStatus = null;
    $("#monitor").hidden = false;
    $("#monitor-id").textContent = sessionId;
    const tick = async () => {
      if (this.watched !== sessionId) return;
      let status;
      try {
        status = await this.conn.call("get_training_status", { session_id: sessionId });
      } catch (err) {
        await run(null, $("#train-msg"), () => Promise.reject(err));
        return;
      }
      if (this.watched !== sessionId) return;
      this.show(status);
      if (ACTIVE.includes(status.status_type)) this.timer = setTimeout(tick, 1000);
      else this.refresh().catch(() => {});
    };
    tick();
  }

  show(status) {
    this.lastStatus = status;
    const state = $("#monitor-state");
    state.textContent = status.status_type;
    state.className = `badge ${status.status_type}`;
    state.dataset.status = status.status_type;
    $("#monitor-message").textContent = status.message || "";
    const bar = $("#monitor-progress");
    bar.max = status.total_epochs || 1;
    bar.value = status.current_epoch || 0;
    drawTrainingChart($("#chart"), status);
    const parts = [];
    if (status.total_epochs) parts.push(`epoch ${status.current_epoch || 0} of ${status.total_epochs}`);
    if (status.n_train !== null && status.n_train !== undefined) {
      parts.push(`${status.n_train} training / ${status.n_test ?? 0} test images`);
    }
    if (status.best_epoch) parts.push(`best epoch ${status.best_epoch}`);
    if (status.elapsed_seconds) parts.push(`${status.elapsed_seconds.toFixed(0)} s`);
    const m = status.instance_metrics;
    if (m) {
      parts.push(
        `test set: AP@0.5 ${m.ap_0_5?.toFixed(3)}, AP@0.75 ${m.ap_0_75?.toFixed(3)}, ` +
          `${m.n_pred} objects found of ${m.n_true}`,
      );
    }
    const b = status.base_instance_metrics;
    if (b && m) {
      const delta = m.ap_0_5 - b.ap_0_5;
      const sign = delta >= 0 ? "+" : "−";
      let text = `AP@0.5 ${b.ap_0_5.toFixed(2)} → ${m.ap_0_5.toFixed(2)} (${sign}${Math.abs(delta).toFixed(2)})`;
      if (delta < 0) text += ": the fine-tuned model is WORSE than the base";
      parts.push(text);
    } else if (b) {
      parts.push(`starting model: AP@0.5 ${b.ap_0_5.toFixed(3)}`);
    }
    $("#monitor-metrics").textContent = parts.join(" · ");
  }

  async refresh() {
    clearTimeout(this.listTimer);
    // {session_id: status}, newest first (the original service's shape); oldest first here.
    const sessions = await this.conn.call("list_training_sessions");
    const list = Object.values(sessions || {}).filter((s) => s && s.session_id).reverse();
    this.app.setSessions(list);
    const table = $("#sessions-table");
    table.replaceChildren();
    if (!list.length) {
      table.append(el("tr", {}, el("td", { class: "hint" }, "No training sessions yet.")));
    } else {
      table.append(
        el("tr", {}, ...["session", "dataset", "model", "status", "epoch", "started", ""].map((h) => el("th", {}, h))),
      );
      for (const s of [...list].reverse()) table.append(this.row(s));
    }
    if (list.some((s) => ACTIVE.includes(s.status_type))) {
      this.listTimer = setTimeout(() => this.refresh().catch(() => {}), 3000);
    }
  }

  row(s) {
    const active = ACTIVE.includes(s.status_type);
    const msg = $("#sessions-msg");
    const epochs = el("input", { type: "number", min: "1", value: "2", title: "more epochs", "aria-label": "more epochs" });
    const actions = [el("button", { class: "small secondary", onclick: () => this.watch(s.session_id) }, "Watch")];
    if (active) {
      actions.push(el("button", {
        class: "small danger",
        onclick: (e) => run(e.target, msg, async () => {
          await this.conn.call("stop_training", { session_id: s.session_id });
          await this.refresh();
        }),
      }, "Stop"));
    } else {
      actions.push(epochs, el("button", {
        class: "small secondary",
        onclick: (e) => run(e.target, msg, async () => {
          const [n, err] = parseValue(epochs.value, CONTINUE_EPOCHS);
          if (err) throw new Error(`more epochs: ${err}`);
          await this.conn.call("restart_training", { session_id: s.session_id, n_epochs: n });
          await this.refresh();
          this.watch(s.session_id);
        }),
      }, "Continue"));
      if (["completed", "stopped"].includes(s.status_type)) {
        actions.push(el("button", {
          class: "small secondary",
          onclick: () => this.app.emit("export-session", s.session_id),
        }, "Export"));
      }
      actions.push(el("button", {
        class: "small danger",
        onclick: (e) => run(e.target, msg, async () => {
          if (!window.confirm(`Delete session ${s.session_id}?`)) return;
          await this.conn.call("delete_training_session", { session_id: s.session_id });
          if (this.watched === s.session_id) {
            this.watched = null;
            $("#monitor").hidden = true;
          }
          await this.refresh();
        }),
      }, "Delete"));
    }
    return el("tr", { dataset: { session: s.session_id, status: s.status_type } },
      el("td", {}, el("code", {}, s.session_id)),
      el("td", {}, s.dataset_artifact_id || ""),
      el("td", {}, s.model || ""),
      el("td", {}, el("span", { class: `badge ${s.status_type}`, title: s.message || "" }, s.status_type)),
      el("td", {}, s.total_epochs ? `${s.current_epoch || 0}/${s.total_epochs}` : ""),
      el("td", {}, formatTime(s.start_time)),
      el("td", { class: "actions" }, ...actions),
    );
  }
}
