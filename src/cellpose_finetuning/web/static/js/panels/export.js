// 4 · Export & find: export_model with its download link, and
// list_models_by_dataset.

import { applySchema } from "../form.js";
import { readParams } from "./segment.js";
import { safeHref } from "../safety.js";
import { $, el, formatTime, run, say } from "../ui.js";

/** A link only to an http(s) address on this page's own server; plain text otherwise. */
function link(url, attrs, text) {
  const href = safeHref(url, window.location.origin);
  return href ? el("a", { ...attrs, href }, text) : el("span", { class: "hint", title: "not a link: not an address on this server" }, text);
}

// From the service's schema when connected (get_training_capabilities): the model-name
// rule (service/payloads.py MODEL_NAME) and InferenceSettings' thresholds.
const NUMBER = { type: "number" };
const PARAMS = {
  flow_threshold: ["#export-flow", NUMBER],
  cellprob_threshold: ["#export-cellprob", NUMBER],
};

export class ExportPanel {
  constructor(app) {
    this.app = app;
    $("#export-btn").addEventListener("click", () => run($("#export-btn"), $("#export-msg"), () => this.export()));
    $("#find-btn").addEventListener("click", () => run($("#find-btn"), $("#find-msg"), () => this.find()));
    app.on("sessions", (list) => this.sessionOptions(list));
    app.on("datasets", (list) => {
      $("#find-datasets").replaceChildren(...list.map((ds) => el("option", { value: ds.id })));
      if (!$("#find-dataset").value && list.length) $("#find-dataset").value = list[0].id;
    });
    app.on("export-session", (id) => {
      $("#export-session").value = id;
      app.showTab("export");
    });
  }

  async start(conn) {
    this.conn = conn;
    $("#export-collection").value = conn.config.collection || "";
    if (conn.anonymous) return;
    await run(null, $("#export-msg"), async () => {
      const caps = await conn.capabilities;
      applySchema(PARAMS, caps.inference_parameters, $);
      this.modelName = new RegExp(`^(?:${caps.model_name_pattern})$`);
    });
  }

  sessionOptions(list) {
    const select = $("#export-session");
    const current = select.value;
    const usable = list.filter((s) => ["completed", "stopped"].includes(s.status_type));
    select.replaceChildren(
      ...(usable.length ? [] : [el("option", { value: "" }, "(no completed or stopped session)")]),
      ...usable.map((s) => el("option", { value: s.session_id }, `${s.session_id} (${s.dataset_artifact_id || ""})`)),
    );
    if (usable.some((s) => s.session_id === current)) select.value = current;
  }

  async export() {
    const sessionId = $("#export-session").value;
    const name = $("#export-name").value.trim();
    if (!sessionId) throw new Error("Choose a completed or stopped session.");
    if (this.modelName && !this.modelName.test(name)) {
      $("#export-name").classList.add("invalid");
      throw new Error(`model name ${JSON.stringify(name)}: use 3-63 lowercase letters, digits and hyphens, starting with a letter or digit. Nothing was sent.`);
    }
    $("#export-name").classList.remove("invalid");
    const args = {
      session_id: sessionId,
      model_name: name,
      checkpoint: $("#export-checkpoint").value,
      ...readParams(PARAMS),
    };
    const collection = $("#export-collection").value.trim();
    if (collection) args.collection = collection;
    const license = $("#export-license").value.trim();
    if (license) args.license = license;
    const box = $("#export-result");
    box.replaceChildren();
    say($("#export-msg"), "Building, validating and uploading the package… (this takes a little while)", "info");
    const result = await this.conn.call("export_model", args);
    say($("#export-msg"), `Exported ${result.artifact_id}: a validated BioImage.IO package.`, "ok");
    box.append(
      el("p", {},
        link(result.download_url, { id: "export-download", class: "button", download: `${name}.zip` }, "Download the package (.zip)"),
        " ",
        link(result.artifact_url, { target: "_blank", rel: "noopener" }, String(result.artifact_url)),
      ),
      el("p", { class: "hint" }, `files: ${(result.files || []).join(", ")}`),
    );
    const session = this.app.sessions.find((s) => s.session_id === sessionId);
    if (session?.dataset_artifact_id) $("#find-dataset").value = session.dataset_artifact_id;
  }

  async find() {
    const datasetId = $("#find-dataset").value.trim();
    if (!datasetId) throw new Error("Give a dataset id (workspace/alias).");
    const args = { dataset_id: datasetId };
    const collection = $("#export-collection").value.trim();
    if (collection) args.collection = collection;
    const models = await this.conn.call("list_models_by_dataset", args);
    const table = $("#find-table");
    table.replaceChildren();
    if (!models.length) {
      table.append(el("tr", {}, el("td", { class: "hint" }, `No model was trained on ${datasetId}.`)));
      return;
    }
    table.append(el("tr", {}, ...["model", "created", "link"].map((h) => el("th", {}, h))));
    for (const m of models) {
      table.append(
        el("tr", { dataset: { model: m.id } },
          el("td", {}, m.name),
          el("td", {}, formatTime(m.created_at)),
          el("td", {}, link(m.url, { target: "_blank", rel: "noopener" }, String(m.id))),
        ),
      );
    }
  }
}
