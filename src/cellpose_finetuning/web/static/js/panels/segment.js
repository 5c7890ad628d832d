// 3 · Segment: one image, a base model and a fine-tuned session side by side,
// masks overlaid with their object counts, each downloadable as a TIFF (made here) and
// in the tools' formats (made by the service's convert_masks with their own writers).

import { applySchema, parseValue } from "../form.js";
import { readByService, readImage, readLabels, readLabelsByService } from "../images.js";
import { countObjects, drawOverlay, fromNdarray, imageToRgba, toNdarray } from "../overlay.js";
import { encodeLabelTiff } from "../tiff.js";
import { $, downloadLink, el, run } from "../ui.js";

// Filled from the service's InferenceSettings schema when connected (applySchema);
// until then a number or nothing is accepted and the service checks the bounds.
const NUMBER_OR_NULL = { anyOf: [{ type: "number" }, { type: "null" }] };
const PARAMS = {
  diameter: ["#seg-diameter", NUMBER_OR_NULL],
  flow_threshold: ["#seg-flow", NUMBER_OR_NULL],
  cellprob_threshold: ["#seg-cellprob", NUMBER_OR_NULL],
  niter: ["#seg-niter", NUMBER_OR_NULL],
};

/** Read the threshold fields; throw a readable error naming the first bad one. */
export function readParams(params) {
  const out = {};
  for (const [name, [selector, spec]] of Object.entries(params)) {
    const input = $(selector);
    const [value, err] = parseValue(input.value, spec);
    input.classList.toggle("invalid", Boolean(err));
    if (err) throw new Error(`${name.replaceAll("_", " ")}: ${err}. Nothing was sent.`);
    if (value !== null) out[name] = value;
  }
  return out;
}

/** The part of a file name output names keep: all but the last suffix, as cellpose does. */
function stem(name) {
  return name.replace(/\.[^.]+$/, "");
}

// Formats convert_masks writes besides the TIFF: [format, button text, title].
const TOOL_FORMATS = [
  ["seg", "cellpose (_seg.npy)", "opens in the cellpose GUI, beside its image"],
  ["png", "PNG (_cp_masks.png)", "16-bit label PNG, as cellpose saves it"],
  ["rois", "Fiji ROIs (.zip)", "ImageJ ROI set: File > Open, or the ROI Manager"],
  ["geojson", "QuPath (.geojson)", "File > Import objects from file, or drop on the image"],
];

export class SegmentPanel {
  constructor(app) {
    this.app = app;
    $("#seg-run").addEventListener("click", () => run($("#seg-run"), $("#seg-msg"), () => this.segment()));
    app.on("sessions", (list) => this.sessionOptions(list));
  }

  async start(conn) {
    this.conn = conn;
    await run(null, $("#seg-msg"), async () => {
      applySchema(PARAMS, (await conn.capabilities).inference_parameters, $);
    });
    const a = $("#seg-model-a");
    if (conn.anonymous) {
      a.replaceChildren(el("option", { value: "cpsam" }, "cpsam"));
      $("#seg-model-b").replaceChildren(el("option", { value: "" }, "log in to use your fine-tuned models"));
      $("#seg-model-b").disabled = true;
      return;
    }
    await run(null, $("#seg-msg"), async () => {
      const names = await conn.call("list_pretrained_models");
      a.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
    });
  }

  sessionOptions(list) {
    const select = $("#seg-model-b");
    const current = select.value;
    const usable = list.filter((s) => ["completed", "stopped"].includes(s.status_type));
    select.replaceChildren(
      el("option", { value: "" }, usable.length ? "(nothing)" : "(no finished session yet)"),
      ...usable.map((s) => el("option", { value: s.session_id }, `session ${s.session_id} (${s.model}, ${s.status_type})`)),
    );
    if (usable.some((s) => s.session_id === current)) select.value = current;
    else if (usable.length) select.value = usable[usable.length - 1].session_id;
  }

  async segment() {
    const file = $("#seg-image").files[0];
    if (!file) throw new Error("Choose an image first.");
    const params = readParams(PARAMS);
    let image;
    try {
      image = await readImage(file);
    } catch (err) {
      throw new Error(`${file.name}: ${err.message}`);
    }
    const rgba = imageToRgba(image);
    const results = $("#seg-results");
    results.replaceChildren();
    const maskFile = $("#seg-mask").files[0];
    if (maskFile) {
      const truth = (await readByService(maskFile))
        ? await readLabelsByService(this.conn, maskFile, maskFile.name, [image.height, image.width])
        : await readLabels(maskFile);
      if (truth.width !== image.width || truth.height !== image.height) {
        throw new Error(`${maskFile.name}: ${truth.height}×${truth.width} differs from the image's ${image.height}×${image.width}`);
      }
      results.append(this.figure(rgba, truth.labels, "ground truth", null));
    } else {
      results.append(this.figure(rgba, null, "image", null));
    }
    const models = [$("#seg-model-a").value, $("#seg-model-b").value].filter(Boolean);
    for (const model of models) {
      const placeholder = el("figure", { class: "pending" }, `segmenting with ${model}…`);
      results.append(placeholder);
      const out = await this.conn.call("infer", { model, input_arrays: [toNdarray(image)], ...params });
      const { data, shape } = fromNdarray(out[0].output);
      if (shape.length !== 2 || shape[0] !== image.height || shape[1] !== image.width) {
        throw new Error(`the service returned masks of shape (${shape.join(", ")}) for a ${image.height}×${image.width} image`);
      }
      const session = this.app.sessions.find((x) => x.session_id === model);
      const title = session ? `fine-tuned (session ${model})` : model;
      const fig = this.figure(rgba, data, title, `${stem(file.name)}_${model}_masks.tif`);
      fig.dataset.model = model;
      // named for the image, so the cellpose GUI finds <stem>_seg.npy beside it
      this.toolDownloads(fig, out[0].output, file.name);
      placeholder.replaceWith(fig);
    }
  }

  /** Buttons that fetch the masks in each tool's format from the service and save them. */
  toolDownloads(fig, masks, imageName) {
    const caption = fig.querySelector("figcaption");
    const box = el("span", { class: "formats" });
    for (const [format, text, title] of TOOL_FORMATS) {
      const button = el("button", { class: "small", title, dataset: { format } }, text);
      button.addEventListener("click", () =>
        run(button, $("#seg-msg"), async () => {
          const files = await this.conn.call("convert_masks", {
            masks, image_name: imageName, formats: [format],
          });
          for (const [name, bytes] of Object.entries(files)) {
            const link = downloadLink(bytes, name, name);
            link.hidden = true;
            box.append(link);
            link.click();
          }
        }),
      );
      box.append(button);
    }
    caption.append(box);
  }

  figure(rgba, labels, title, filename) {
    const canvas = el("canvas");
    drawOverlay(canvas, rgba, labels);
    const count = labels ? countObjects(labels) : null;
    const caption = el("figcaption", {},
      el("b", {}, title),
      count === null ? "" : el("span", { class: "count" }, `${count} objects`),
    );
    if (filename && labels) {
      const tiffLabels = labels instanceof Uint16Array || labels instanceof Uint32Array
        ? labels : Uint32Array.from(labels, Number);
      caption.append(downloadLink(encodeLabelTiff(tiffLabels, rgba.width, rgba.height), filename, "masks (.tif)", "image/tiff"));
    }
    return el("figure", { dataset: { model: title, count: count ?? "" } }, canvas, caption);
  }
}
