// Reading image and mask files in the browser (TIFF, PNG/JPEG, .npy), and the
// mask checks the service makes (io/images.py), run before anything is sent.

import { parseTiff, decodePage, dtypeOf } from "./tiff.js";

const lower = (name) => name.toLowerCase();
const isTiff = (name) => /\.tiff?$/.test(lower(name));
const isPng = (name) => lower(name).endsWith(".png");
const isJpeg = (name) => /\.jpe?g$/.test(lower(name));
const isNpy = (name) => lower(name).endsWith(".npy");

// ------------------------------------------------------------------ the tools' formats
/**
 * Whether a mask file is one the page cannot decode itself, so the service reads it
 * (read_annotation): cellpose GUI _seg.npy (a pickle), QuPath .geojson and ImageJ ROI
 * sets (.zip) that need rasterising, and 16-bit PNGs (a canvas only gives 8 bits).
 */
export async function readByService(file) {
  const name = lower(file.name);
  if (name.endsWith(".geojson") || name.endsWith(".zip")) return true;
  if (isNpy(name)) {
    const head = new TextDecoder().decode(new Uint8Array(await file.slice(0, 256).arrayBuffer()));
    return /'descr':\s*'\|O'/.test(head);
  }
  if (isPng(name)) {
    const head = new Uint8Array(await file.slice(0, 26).arrayBuffer());
    return head.length >= 26 && head[24] === 16; // IHDR bit depth
  }
  return false;
}

/**
 * Read a mask with the service (read_annotation), as training will read it.
 * @returns {Promise<{width, height, labels: Uint32Array, n: number}>}
 */
export async function readLabelsByService(conn, file, name, shape) {
  const data = new Uint8Array(await file.arrayBuffer());
  const got = await conn.call("read_annotation", {
    file_name: name || file.name, data, image_shape: shape || null,
  });
  const nd = got.labels;
  const [height, width] = nd._rshape;
  const { fromNdarray } = await import("./overlay.js");
  const labels = Uint32Array.from(fromNdarray(nd).data, Number);
  return { width, height, labels, n: got.n_objects };
}

// ------------------------------------------------------------------ .npy
const NPY_TYPES = {
  b1: [Uint8Array, "bool", "b"], u1: [Uint8Array, "uint8", "u"], i1: [Int8Array, "int8", "i"],
  u2: [Uint16Array, "uint16", "u"], i2: [Int16Array, "int16", "i"],
  u4: [Uint32Array, "uint32", "u"], i4: [Int32Array, "int32", "i"],
  u8: [BigUint64Array, "uint64", "u"], i8: [BigInt64Array, "int64", "i"],
  f4: [Float32Array, "float32", "f"], f8: [Float64Array, "float64", "f"],
};

function parseNpy(buffer) {
  const bytes = new Uint8Array(buffer);
  const magic = String.fromCharCode(...bytes.subarray(1, 6));
  if (bytes[0] !== 0x93 || magic !== "NUMPY") throw new Error("not a .npy file");
  const view = new DataView(buffer);
  const major = bytes[6];
  const headerLen = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(bytes.subarray(start, start + headerLen));
  const descr = /'descr':\s*'([<>|=])([a-z]\d+)'/.exec(header);
  const fortran = /'fortran_order':\s*True/.test(header);
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header);
  if (!descr || !shapeText) throw new Error("unreadable .npy header");
  const type = NPY_TYPES[descr[2]];
  if (!type) throw new Error(`unsupported .npy type ${descr[2]}`);
  if (descr[1] === ">" && descr[2] !== "u1" && descr[2] !== "i1") {
    throw new Error("big-endian .npy files are not supported here");
  }
  if (fortran) throw new Error("Fortran-ordered .npy files are not supported here");
  const shape = shapeText[1].split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  return { type, shape, offset: start + headerLen };
}

function npyData(buffer, npy) {
  const [Type] = npy.type;
  const n = npy.shape.reduce((a, b) => a * b, 1);
  return new Type(buffer.slice(npy.offset, npy.offset + n * Type.BYTES_PER_ELEMENT));
}

// ------------------------------------------------------------------ headers
/**
 * What a file holds, from its header: width, height, planes (pages or leading axis),
 * samples per pixel, dtype and kind ("u", "i", "f", "b").
 */
export async function probe(file) {
  const name = file.name;
  if (isTiff(name)) {
    const buffer = await file.arrayBuffer();
    const tiff = parseTiff(buffer);
    const p = tiff.pages[0];
    return {
      width: p.width, height: p.height, planes: tiff.pages.length, samples: p.samples,
      dtype: dtypeOf(p), kind: p.kind, tiff, buffer,
    };
  }
  if (isNpy(name)) {
    const buffer = await file.arrayBuffer();
    const npy = parseNpy(buffer);
    const s = npy.shape;
    const [, dtype, kind] = npy.type;
    if (s.length < 2) throw new Error(`array of shape (${s.join(", ")}) is not an image`);
    const last = s[s.length - 1];
    const rgb = s.length === 3 && last <= 4 && s[0] > 4;
    const [h, w] = rgb ? [s[0], s[1]] : [s[s.length - 2], s[s.length - 1]];
    const planes = rgb ? 1 : s.slice(0, -2).reduce((a, b) => a * b, 1);
    return { width: w, height: h, planes, samples: rgb ? last : 1, dtype, kind, npy, buffer };
  }
  if (isPng(name) || isJpeg(name)) {
    const bitmap = await createImageBitmap(file);
    const info = { width: bitmap.width, height: bitmap.height, planes: 1, samples: 3, dtype: "uint8", kind: "u", bitmap };
    return info;
  }
  throw new Error("unsupported file type");
}

// ------------------------------------------------------------------ pixels
function bitmapPixels(bitmap) {
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(bitmap, 0, 0);
  return ctx.getImageData(0, 0, bitmap.width, bitmap.height).data;
}

function splitSamples(data, n, samples) {
  const out = [];
  for (let c = 0; c < samples; c++) {
    const plane = new data.constructor(n);
    for (let i = 0; i < n; i++) plane[i] = data[i * samples + c];
    out.push(plane);
  }
  return out;
}

/**
 * Read a 2D image (grey or up to 4 channels) for display and inference.
 * @returns {Promise<{width, height, dtype, channels: TypedArray[]}>} one (H*W) plane per channel
 */
export async function readImage(file) {
  const info = await probe(file);
  const n = info.width * info.height;
  if (info.tiff) {
    const { tiff, buffer } = info;
    if (info.samples > 1) {
      const page = await decodePage(buffer, tiff, 0);
      return { ...size(info), dtype: page.dtype, channels: splitSamples(page.data, n, Math.min(page.samples, 4)) };
    }
    if (tiff.pages.length > 4) {
      throw new Error(
        `has ${tiff.pages.length} planes; this page segments 2D images (grey or up to 4 ` +
          "channels). Segment stacks with the Python client or the command line.",
      );
    }
    const channels = [];
    for (let i = 0; i < tiff.pages.length; i++) {
      const page = await decodePage(buffer, tiff, i);
      if (page.width !== info.width || page.height !== info.height) {
        throw new Error("its pages differ in size");
      }
      channels.push(page.data);
    }
    return { ...size(info), dtype: info.dtype, channels };
  }
  if (info.npy) {
    const data = npyData(info.buffer, info.npy);
    if (info.samples > 1) return { ...size(info), dtype: info.dtype, channels: splitSamples(data, n, info.samples) };
    if (info.planes > 4) throw new Error(`has ${info.planes} planes; this page segments 2D images`);
    const channels = [];
    for (let c = 0; c < info.planes; c++) channels.push(data.subarray(c * n, (c + 1) * n));
    return { ...size(info), dtype: info.dtype, channels };
  }
  const rgba = bitmapPixels(info.bitmap);
  const rgb = splitSamples(rgba, n, 3);
  const grey = rgb[0].every((v, i) => v === rgb[1][i] && v === rgb[2][i]);
  return { ...size(info), dtype: "uint8", channels: grey ? [rgb[0]] : rgb };
}

function size(info) {
  return { width: info.width, height: info.height };
}

/**
 * Read a label image (for showing a ground truth). Colour pictures get one label per colour.
 * @returns {Promise<{width, height, labels: Uint32Array}>}
 */
export async function readLabels(file) {
  const info = await probe(file);
  const n = info.width * info.height;
  let labels = new Uint32Array(n);
  if (info.tiff || info.npy) {
    const plane = info.tiff
      ? (await decodePage(info.buffer, info.tiff, 0)).data
      : npyData(info.buffer, info.npy).subarray(0, n);
    for (let i = 0; i < n; i++) labels[i] = Number(plane[i * (info.tiff ? info.samples : 1)]);
  } else {
    const rgba = bitmapPixels(info.bitmap);
    const ids = new Map([[0, 0]]);
    for (let i = 0; i < n; i++) {
      const key = (rgba[4 * i] << 16) | (rgba[4 * i + 1] << 8) | rgba[4 * i + 2];
      if (!ids.has(key)) ids.set(key, ids.size);
      labels[i] = ids.get(key);
    }
  }
  return { width: info.width, height: info.height, labels };
}

// ------------------------------------------------------------------ mask checks
async function maskPlanes(info) {
  if (info.tiff) {
    const planes = [];
    for (let i = 0; i < info.tiff.pages.length; i++) {
      planes.push((await decodePage(info.buffer, info.tiff, i)).data);
    }
    return planes;
  }
  if (info.npy) return [npyData(info.buffer, info.npy)];
  return [];
}

/**
 * Check one image/mask pair as the service will; return the problems, each naming its file.
 * @param {{image: string, annotation: string}} pair - names shown in messages
 * @param {File} imageFile
 * @param {File} maskFile
 * @returns {Promise<string[]>}
 */
export async function checkPair(pair, imageFile, maskFile, conn = null) {
  const problems = [];
  let image = null;
  let mask = null;
  try {
    image = await probe(imageFile);
    if (!image.width || !image.height) problems.push(`${pair.image}: the image is empty`);
  } catch (err) {
    problems.push(`${pair.image}: cannot read the image (${err.message})`);
  }
  if (conn && (await readByService(maskFile))) {
    try {
      const shape = image ? [image.height, image.width] : null;
      const got = await readLabelsByService(conn, maskFile, pair.annotation, shape);
      if (image && (got.width !== image.width || got.height !== image.height)) {
        problems.push(
          `${pair.annotation}: mask shape (${got.height}, ${got.width}) differs from image ` +
            `shape (${image.height}, ${image.width}) of ${pair.image}`,
        );
      }
    } catch (err) {
      const { errorText } = await import("./api.js");
      const text = errorText(err);
      problems.push(text.startsWith(pair.annotation) ? text : `${pair.annotation}: ${text}`);
    }
    return problems;
  }
  try {
    mask = await probe(maskFile);
  } catch (err) {
    problems.push(`${pair.annotation}: cannot read the mask (${err.message})`);
    return problems;
  }
  const name = pair.annotation;
  if (!mask.width || !mask.height) {
    problems.push(`${name}: mask is empty (shape (${mask.height}, ${mask.width}))`);
    return problems;
  }
  if (mask.kind === "b") {
    problems.push(
      `${name}: mask is boolean (foreground/background only); instance labels are ` +
        "needed, one integer id per object",
    );
  } else if (mask.kind === "f") {
    for (const plane of await maskPlanes(mask)) {
      const bad = plane.find((v) => !Number.isFinite(v));
      if (bad !== undefined) {
        problems.push(`${name}: mask has NaN or infinite values`);
        break;
      }
      const frac = plane.find((v) => v !== Math.round(v));
      if (frac !== undefined) {
        problems.push(
          `${name}: mask has non-integer values (e.g. ${frac}); masks must be integer ` +
            `instance labels (this one is ${mask.dtype})`,
        );
        break;
      }
      const min = plane.reduce((a, b) => Math.min(a, b), Infinity);
      if (min < 0) {
        problems.push(`${name}: mask has negative labels (min ${min})`);
        break;
      }
    }
  } else if (mask.kind === "i") {
    for (const plane of await maskPlanes(mask)) {
      let min = 0;
      for (const v of plane) if (v < min) min = v;
      if (min < 0) {
        problems.push(`${name}: mask has negative labels (min ${min})`);
        break;
      }
    }
  }
  if (image && (image.width !== mask.width || image.height !== mask.height)) {
    problems.push(
      `${name}: mask shape (${mask.height}, ${mask.width}) differs from image shape ` +
        `(${image.height}, ${image.width}) of ${pair.image}`,
    );
  }
  return problems;
}
