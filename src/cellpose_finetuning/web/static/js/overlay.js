// Showing images and label masks: percentile-normalised display (as cellpose
// normalises, 1st-99th percentile per channel) and coloured mask overlays.

function percentiles(plane, lo = 0.01, hi = 0.99) {
  const step = Math.max(1, Math.floor(plane.length / 200000));
  const sample = [];
  for (let i = 0; i < plane.length; i += step) sample.push(Number(plane[i]));
  sample.sort((a, b) => a - b);
  const at = (q) => sample[Math.min(sample.length - 1, Math.floor(q * (sample.length - 1)))];
  return [at(lo), at(hi)];
}

/**
 * RGBA pixels of an image read by images.readImage: grey for one channel,
 * channels as red, green (and blue) otherwise.
 * @returns {ImageData}
 */
export function imageToRgba(image) {
  const { width, height, channels } = image;
  const n = width * height;
  const out = new ImageData(width, height);
  const rgbBytes = image.dtype === "uint8" && channels.length >= 3;
  const scaled = channels.slice(0, 3).map((plane) => {
    if (rgbBytes) return plane;
    const [lo, hi] = percentiles(plane);
    const span = hi > lo ? hi - lo : 1;
    const s = new Uint8ClampedArray(n);
    for (let i = 0; i < n; i++) s[i] = ((Number(plane[i]) - lo) / span) * 255;
    return s;
  });
  for (let i = 0; i < n; i++) {
    const r = scaled[0][i];
    const g = scaled.length > 1 ? scaled[1][i] : r;
    const b = scaled.length > 2 ? scaled[2][i] : scaled.length > 1 ? 0 : r;
    out.data[4 * i] = r;
    out.data[4 * i + 1] = g;
    out.data[4 * i + 2] = b;
    out.data[4 * i + 3] = 255;
  }
  return out;
}

function colour(label) {
  // golden-ratio hues: neighbouring labels get distinct colours
  const h = (label * 0.618033988749895) % 1;
  const s = 0.75;
  const v = 1.0;
  const i = Math.floor(h * 6);
  const f = h * 6 - i;
  const p = v * (1 - s);
  const q = v * (1 - f * s);
  const t = v * (1 - (1 - f) * s);
  const [r, g, b] = [[v, t, p], [q, v, p], [p, v, t], [p, q, v], [t, p, v], [v, p, q]][i % 6];
  return [r * 255, g * 255, b * 255];
}

/** How many distinct non-zero labels. */
export function countObjects(labels) {
  const seen = new Set();
  for (const v of labels) if (v) seen.add(v);
  return seen.size;
}

/**
 * Draw an image with its labels overlaid (filled at 45 % opacity, outlines opaque).
 * @param {HTMLCanvasElement} canvas
 * @param {ImageData} rgba - from imageToRgba
 * @param {ArrayLike<number>|null} labels - (H*W), 0 = background
 */
export function drawOverlay(canvas, rgba, labels) {
  const { width, height } = rgba;
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  const out = new ImageData(new Uint8ClampedArray(rgba.data), width, height);
  if (labels) {
    const alpha = 0.45;
    const cache = new Map();
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < width; x++) {
        const i = y * width + x;
        const l = Number(labels[i]);
        if (!l) continue;
        if (!cache.has(l)) cache.set(l, colour(l));
        const c = cache.get(l);
        const edge =
          (x > 0 && Number(labels[i - 1]) !== l) || (x < width - 1 && Number(labels[i + 1]) !== l) ||
          (y > 0 && Number(labels[i - width]) !== l) || (y < height - 1 && Number(labels[i + width]) !== l);
        const a = edge ? 1 : alpha;
        for (let k = 0; k < 3; k++) out.data[4 * i + k] = out.data[4 * i + k] * (1 - a) + c[k] * a;
      }
    }
  }
  ctx.putImageData(out, 0, 0);
}

/** A typed array from an ndarray the service returned ({_rvalue, _rshape, _rdtype}). */
export function fromNdarray(nd) {
  const types = {
    uint8: Uint8Array, uint16: Uint16Array, uint32: Uint32Array, int32: Int32Array,
    int16: Int16Array, int64: BigInt64Array, uint64: BigUint64Array, float32: Float32Array,
  };
  const Type = types[nd._rdtype];
  if (!Type) throw new Error(`unexpected mask type ${nd._rdtype}`);
  let value = nd._rvalue;
  if (Array.isArray(value)) {
    const total = value.reduce((s, v) => s + v.byteLength, 0);
    const joined = new Uint8Array(total);
    let o = 0;
    for (const v of value) {
      joined.set(new Uint8Array(v.buffer || v, v.byteOffset || 0, v.byteLength), o);
      o += v.byteLength;
    }
    value = joined;
  }
  const bytes = value instanceof ArrayBuffer ? new Uint8Array(value)
    : new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  const data = new Type(bytes.slice().buffer);
  return { data, shape: nd._rshape, dtype: nd._rdtype };
}

/** An ndarray for the service from planes of one image: (H, W) or (C, H, W). */
export function toNdarray(image) {
  const { width, height, channels } = image;
  const Type = channels[0].constructor;
  const n = width * height;
  const data = new Type(n * channels.length);
  channels.forEach((plane, c) => data.set(plane, c * n));
  const dtypes = new Map([
    [Uint8Array, "uint8"], [Uint8ClampedArray, "uint8"], [Int8Array, "int8"],
    [Uint16Array, "uint16"], [Int16Array, "int16"], [Uint32Array, "uint32"],
    [Int32Array, "int32"], [Float32Array, "float32"], [Float64Array, "float64"],
  ]);
  const dtype = dtypes.get(Type);
  if (!dtype) throw new Error(`cannot send ${Type.name} pixels`);
  const shape = channels.length === 1 ? [height, width] : [channels.length, height, width];
  return {
    _rtype: "ndarray",
    _rvalue: new Uint8Array(data.buffer),
    _rshape: shape,
    _rdtype: dtype,
  };
}
