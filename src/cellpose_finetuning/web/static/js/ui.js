// Small DOM helpers shared by the panels.

import { errorText } from "./api.js";

/** Create an element: el("button", {class: "x", onclick: f}, "text", child...). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k in node && typeof v !== "string") node[k] = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false || c === "") continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export const $ = (sel, root = document) => root.querySelector(sel);

/** Show a message in a status box: kind is "error", "ok" or "info"; empty text hides it. */
export function say(box, text, kind = "info") {
  box.textContent = text || "";
  box.className = `msg ${text ? kind : ""}`.trim();
  box.hidden = !text;
}

/**
 * Run an action from a button: disable it meanwhile, show any error in `box`.
 * @returns {Promise<any>} the action's result, or undefined after an error
 */
export async function run(button, box, action) {
  if (button) button.disabled = true;
  if (box) say(box, "");
  try {
    return await action();
  } catch (err) {
    console.error(err);
    if (box) say(box, errorText(err), "error");
    else showBanner(errorText(err));
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}

/** A page-wide error line (for errors that belong to no panel). */
export function showBanner(text) {
  const banner = $("#banner");
  say(banner, text, "error");
}

/** Offer bytes as a file to save. */
export function downloadLink(bytes, filename, text, type = "application/octet-stream") {
  const url = URL.createObjectURL(new Blob([bytes], { type }));
  return el("a", { href: url, download: filename, class: "button small" }, text);
}

export function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 ** 2) return `${(n / 1024).toFixed(1)} kB`;
  return `${(n / 1024 ** 2).toFixed(1)} MB`;
}

export function formatTime(value) {
  if (!value) return "";
  const d = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  return Number.isNaN(d.getTime()) ? String(value) : d.toLocaleString();
}
