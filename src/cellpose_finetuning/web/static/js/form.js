// A form built from JSON-schema-like parameter descriptions, as
// get_training_capabilities() returns them: defaults and bounds are shown,
// and values outside them are refused before anything is sent.

import { el } from "./ui.js";

function kinds(spec) {
  const options = spec.anyOf || [spec];
  const types = options.map((o) => o.type);
  const main = options.find((o) => o.type && o.type !== "null") || spec;
  return { nullable: types.includes("null"), main };
}

function boundsText(main) {
  const parts = [];
  if (main.minimum !== undefined) parts.push(`≥ ${main.minimum}`);
  if (main.exclusiveMinimum !== undefined) parts.push(`> ${main.exclusiveMinimum}`);
  if (main.maximum !== undefined) parts.push(`≤ ${main.maximum}`);
  if (main.exclusiveMaximum !== undefined) parts.push(`< ${main.exclusiveMaximum}`);
  return parts.join(", ");
}

/**
 * Parse and check one value; return [value, error].
 * @param {string} text - what the user typed
 * @param {object} spec - the parameter's description
 */
export function parseValue(text, spec) {
  const { nullable, main } = kinds(spec);
  text = String(text ?? "").trim();
  if (main.enum) {
    return main.enum.includes(text) ? [text, null] : [null, `choose one of ${main.enum.join(", ")}`];
  }
  if (text === "") {
    return nullable ? [null, null] : [null, "a value is needed"];
  }
  if (main.type === "integer" || main.type === "number") {
    const v = Number(text);
    if (!Number.isFinite(v)) return [null, `${JSON.stringify(text)} is not a number`];
    if (main.type === "integer" && !Number.isInteger(v)) return [null, "must be a whole number"];
    if (main.minimum !== undefined && v < main.minimum) return [null, `must be ≥ ${main.minimum}`];
    if (main.exclusiveMinimum !== undefined && v <= main.exclusiveMinimum) {
      return [null, `must be > ${main.exclusiveMinimum}`];
    }
    if (main.maximum !== undefined && v > main.maximum) return [null, `must be ≤ ${main.maximum}`];
    if (main.exclusiveMaximum !== undefined && v >= main.exclusiveMaximum) {
      return [null, `must be < ${main.exclusiveMaximum}`];
    }
    return [v, null];
  }
  return [text, null];
}

/**
 * A form for a set of parameters.
 * @param {HTMLElement} container - emptied and filled with one row per parameter
 * @param {Object<string, object>} params - name -> description (type, default, bounds...)
 * @param {string[]} order - names to show first (the rest follow, under "more settings")
 * @returns {{values: () => (object|null)}} values() is null when a field is wrong
 */
export function buildForm(container, params, order = []) {
  container.replaceChildren();
  const names = [...order.filter((n) => n in params), ...Object.keys(params).filter((n) => !order.includes(n))];
  const more = el("details", { class: "more" }, el("summary", {}, "More settings"));
  const fields = {};
  for (const name of names) {
    const spec = params[name];
    const { nullable, main } = kinds(spec);
    const id = `param-${name}`;
    let input;
    if (main.enum) {
      input = el("select", { id, name }, ...main.enum.map((v) => el("option", { value: v }, v)));
      input.value = spec.default ?? main.enum[0];
    } else {
      input = el("input", {
        id, name, type: "text", inputmode: main.type === "string" ? "text" : "decimal",
        value: spec.default === null || spec.default === undefined ? "" : String(spec.default),
        placeholder: nullable ? "automatic" : "",
      });
    }
    const hint = [
      spec.default === null || spec.default === undefined ? "default: automatic" : `default: ${spec.default}`,
      boundsText(main),
    ].filter(Boolean).join("; ");
    const error = el("span", { class: "field-error", role: "alert" });
    const row = el(
      "div", { class: "field" },
      el("label", { for: id }, name.replaceAll("_", " ")),
      input,
      el("small", { class: "hint", title: spec.description || "" }, hint),
      error,
      spec.description ? el("small", { class: "desc" }, spec.description) : "",
    );
    fields[name] = { input, error, spec };
    (order.includes(name) ? container : more).append(row);
    input.addEventListener("input", () => check(name));
  }
  if (more.children.length > 1) container.append(more);

  function check(name) {
    const f = fields[name];
    const [value, err] = parseValue(f.input.value, f.spec);
    f.error.textContent = err ? err : "";
    f.input.classList.toggle("invalid", Boolean(err));
    return [value, err];
  }

  return {
    /** Put a value into a field (e.g. from a recipe) and check it. */
    set(name, value) {
      if (!fields[name]) return;
      fields[name].input.value = value === null || value === undefined ? "" : String(value);
      check(name);
    },
    values() {
      const out = {};
      let ok = true;
      for (const name of names) {
        const [value, err] = check(name);
        if (err) {
          ok = false;
          if (fields[name].input.closest("details")) fields[name].input.closest("details").open = true;
        } else if (!(value === null && fields[name].spec.default === null)) {
          out[name] = value;
        }
      }
      return ok ? out : null;
    },
  };
}

/**
 * Take a panel's parameter descriptions from the service's schema (InferenceSettings,
 * served by get_training_capabilities as "inference_parameters"): bounds for checking,
 * the default as the field's value, the description as its tooltip. The page declares
 * no default or bound of its own.
 * @param {Object<string, [string, object]>} params - name -> [selector, spec], updated
 * @param {Object<string, object>} schema - name -> description (type, default, bounds...)
 * @param {(selector: string) => HTMLElement} find - the page's element lookup
 */
export function applySchema(params, schema, find) {
  for (const [name, entry] of Object.entries(params)) {
    const spec = schema && schema[name];
    if (!spec) continue;
    entry[1] = spec;
    const input = find(entry[0]);
    const { main } = kinds(spec);
    if (input.value === "" && spec.default !== null && spec.default !== undefined) input.value = String(spec.default);
    if (spec.default === null || spec.default === undefined) input.placeholder = "automatic";
    const bounds = boundsText(main);
    input.title = [bounds, spec.description].filter(Boolean).join(" · ");
  }
}
