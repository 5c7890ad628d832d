// 1 · Data: pick a folder or files, see how they pair, check the masks, upload.

import { checkPair } from "../images.js";
import { pairFiles } from "../pairing.js";
import { listDatasets, uploadDataset } from "../upload.js";
import { $, el, formatBytes, formatTime, run, say } from "../ui.js";

const ALIAS = /^[a-z0-9][a-z0-9_.-]{1,63}$/;

/** The four spec inputs of a form, by split. */
function specInputs(prefix) {
  return {
    train: [$(`#${prefix}train-images`), $(`#${prefix}train-annotations`)],
    test: [$(`#${prefix}test-images`), $(`#${prefix}test-annotations`)],
  };
}

/**
 * Pair both splits with the service's rules.
 * @returns {{train: object[], test: object[], specs: object}} specs as start_training wants them
 * @throws {PairingError}
 */
export function pairSplits(names, inputs) {
  const [trainImages, trainMasks] = inputs.train.map((i) => i.value.trim());
  const [testImages, testMasks] = inputs.test.map((i) => i.value.trim());
  const train = pairFiles(trainImages, trainMasks, names);
  const specs = { train_images: trainImages, train_annotations: trainMasks };
  let test = [];
  if (testImages || testMasks) {
    test = pairFiles(testImages, testMasks, names, {
      imagesArg: "test_images",
      annotationsArg: "test_annotations",
    });
    Object.assign(specs, { test_images: testImages, test_annotations: testMasks });
  }
  return { train, test, specs };
}

export class DataPanel {
  constructor(app) {
    this.app = app;
    this.files = new Map(); // path inside the dataset -> File
    this.inputs = specInputs("spec-");
    for (const radio of document.querySelectorAll("input[name=source]")) {
      radio.addEventListener("change", () => this.switchSource(radio.value));
    }
    $("#folder-input").addEventListener("change", (e) => this.pickFolder(e.target.files));
    $("#images-input").addEventListener("change", () => this.pickFiles());
    $("#masks-input").addEventListener("change", () => this.pickFiles());
    for (const input of [...this.inputs.train, ...this.inputs.test]) {
      input.addEventListener("input", () => this.preview());
    }
    $("#upload-btn").addEventListener("click", () =>
      run($("#upload-btn"), $("#upload-msg"), () => this.upload()),
    );
    $("#datasets-refresh").addEventListener("click", () =>
      run($("#datasets-refresh"), $("#datasets-msg"), () => this.refresh()),
    );
  }

  async start(conn) {
    this.conn = conn;
    if (!conn.anonymous) await run(null, $("#datasets-msg"), () => this.refresh());
  }

  switchSource(kind) {
    $("#source-folder").hidden = kind !== "folder";
    $("#source-files").hidden = kind !== "files";
    this.files = new Map();
    if (kind === "files") {
      this.inputs.train[0].value = "images/";
      this.inputs.train[1].value = "masks/";
      this.inputs.test[0].value = "";
      this.inputs.test[1].value = "";
    } else {
      this.inputs.train[0].value = "images/train/";
      this.inputs.train[1].value = "annotations/train/";
      this.inputs.test[0].value = "images/test/";
      this.inputs.test[1].value = "annotations/test/";
    }
    this.preview();
  }

  pickFolder(fileList) {
    this.files = new Map();
    let root = "";
    for (const file of fileList) {
      const rel = file.webkitRelativePath || file.name;
      const [top, ...rest] = rel.split("/");
      root = top;
      this.files.set(rest.length ? rest.join("/") : rel, file);
    }
    if (!$("#dataset-alias").value && root) {
      $("#dataset-alias").value = root.toLowerCase().replace(/[^a-z0-9_.-]+/g, "-").replace(/^[^a-z0-9]+/, "");
    }
    this.preview();
  }

  pickFiles() {
    this.files = new Map();
    for (const file of $("#images-input").files) this.files.set(`images/${file.name}`, file);
    for (const file of $("#masks-input").files) this.files.set(`masks/${file.name}`, file);
    this.preview();
  }

  /** Show how the files pair (or the service's error), live as specs are edited. */
  preview() {
    const box = $("#pairing-msg");
    const table = $("#pairing-preview");
    table.replaceChildren();
    const names = [...this.files.keys()];
    const bytes = [...this.files.values()].reduce((s, f) => s + f.size, 0);
    $("#source-summary").textContent = names.length
      ? `${names.length} files (${formatBytes(bytes)}) selected`
      : "";
    if (!names.length) {
      say(box, "");
      return null;
    }
    let result;
    try {
      result = pairSplits(names, this.inputs);
    } catch (err) {
      say(box, err.message, "error");
      return null;
    }
    const { train, test } = result;
    say(box, `${train.length} training pairs` + (test.length ? `, ${test.length} test pairs` : ", no test pairs (no validation)"), "ok");
    const rows = [...train.map((p) => ["train", p]), ...test.map((p) => ["test", p])];
    table.append(
      el("table", { class: "list" },
        el("tr", {}, el("th", {}, "split"), el("th", {}, "key"), el("th", {}, "image"), el("th", {}, "mask")),
        ...rows.map(([split, p]) =>
          el("tr", {}, el("td", {}, split), el("td", {}, p.key), el("td", {}, p.image), el("td", {}, p.annotation)),
        ),
      ),
    );
    return result;
  }

  async upload() {
    const alias = $("#dataset-alias").value.trim();
    const status = $("#upload-status");
    if (!this.files.size) throw new Error("Choose a folder or files first.");
    if (!ALIAS.test(alias)) {
      throw new Error(
        `Dataset name ${JSON.stringify(alias)}: use 2-64 lowercase letters, digits, '-', '_' or '.', starting with a letter or digit.`,
      );
    }
    const result = this.preview();
    if (!result) throw new Error(`Nothing was uploaded: ${$("#pairing-msg").textContent}`);
    const pairs = [...result.train, ...result.test];
    const problems = [];
    for (const [i, pair] of pairs.entries()) {
      status.textContent = `checking pair ${i + 1} of ${pairs.length}…`;
      problems.push(
        ...(await checkPair(pair, this.files.get(pair.image), this.files.get(pair.annotation), this.conn)),
      );
    }
    status.textContent = "";
    if (problems.length) {
      const box = $("#upload-msg");
      say(box, `${problems.length} problem${problems.length > 1 ? "s" : ""} in the masks; nothing was uploaded:`, "error");
      box.append(el("ul", {}, ...problems.map((p) => el("li", {}, p))));
      return;
    }
    const files = new Map();
    for (const p of pairs) {
      files.set(p.image, this.files.get(p.image));
      files.set(p.annotation, this.files.get(p.annotation));
    }
    const bar = $("#upload-progress");
    bar.hidden = false;
    bar.value = 0;
    const id = await uploadDataset(
      this.conn,
      {
        alias,
        name: alias,
        files,
        extra: { cellpose_pairing: result.specs, n_train: result.train.length, n_test: result.test.length },
      },
      (done, total) => {
        bar.value = total ? done / total : 1;
        status.textContent = `uploading: ${formatBytes(done)} of ${formatBytes(total)}`;
      },
    );
    bar.value = 1;
    status.textContent = `${files.size} files uploaded`;
    say($("#upload-msg"), `Uploaded dataset ${id} (${files.size} files). Train on it in “2 · Train”.`, "ok");
    await this.refresh();
    this.app.emit("select-dataset", id, false);
  }

  async refresh() {
    const list = await listDatasets(this.conn);
    this.app.setDatasets(list);
    const table = $("#datasets-table");
    table.replaceChildren();
    if (!list.length) {
      table.append(el("tr", {}, el("td", { class: "hint" }, "No datasets yet.")));
      return;
    }
    table.append(el("tr", {}, ...["dataset", "files", "pairs", "created", ""].map((h) => el("th", {}, h))));
    for (const ds of list) {
      const m = ds.manifest || {};
      table.append(
        el("tr", { dataset: { id: ds.id } },
          el("td", {}, el("code", {}, ds.id)),
          el("td", {}, ds.file_count ?? ""),
          el("td", {}, m.n_train !== undefined ? `${m.n_train} train, ${m.n_test} test` : ""),
          el("td", {}, formatTime(ds.created_at)),
          el("td", { class: "actions" },
            el("button", { class: "small", onclick: () => this.app.emit("select-dataset", ds.id) }, "Train on it"),
            el("button", { class: "small danger", onclick: (e) => this.remove(e.target, ds.id) }, "Delete"),
          ),
        ),
      );
    }
  }

  async remove(button, id) {
    if (!window.confirm(`Delete dataset ${id} and its files?`)) return;
    await run(button, $("#datasets-msg"), async () => {
      await this.conn.artifacts("delete", { artifact_id: id, delete_files: true });
      await this.refresh();
    });
  }
}
