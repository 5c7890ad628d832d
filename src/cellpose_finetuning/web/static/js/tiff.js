// A small TIFF reader and writer: what microscopy and annotation tools write
// (tifffile, ImageJ, OME-TIFF, napari...). Classic and BigTIFF, strips or
// tiles, chunky or planar samples, uncompressed / LZW / Deflate / PackBits,
// horizontal and floating-point predictors, 1-64 bit integers and floats.
// The writer makes uncompressed single-page uint16/uint32 label images.

const TAGS = {
  256: "width", 257: "height", 258: "bitsPerSample", 259: "compression",
  262: "photometric", 270: "description", 273: "stripOffsets", 277: "samplesPerPixel",
  278: "rowsPerStrip", 279: "stripByteCounts", 284: "planarConfig", 317: "predictor",
  320: "colorMap", 322: "tileWidth", 323: "tileLength", 324: "tileOffsets",
  325: "tileByteCounts", 339: "sampleFormat",
};
// bytes per value of each field type
const TYPE_SIZE = { 1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8, 17: 8, 18: 8 };

export class TiffError extends Error {}

function readValues(view, type, count, offset, le) {
  const out = [];
  for (let i = 0; i < count; i++) {
    const o = offset + i * TYPE_SIZE[type];
    switch (type) {
      case 1: case 2: case 7: out.push(view.getUint8(o)); break;
      case 6: out.push(view.getInt8(o)); break;
      case 3: out.push(view.getUint16(o, le)); break;
      case 8: out.push(view.getInt16(o, le)); break;
      case 4: out.push(view.getUint32(o, le)); break;
      case 9: out.push(view.getInt32(o, le)); break;
      case 5: out.push(view.getUint32(o, le) / view.getUint32(o + 4, le)); break;
      case 10: out.push(view.getInt32(o, le) / view.getInt32(o + 4, le)); break;
      case 11: out.push(view.getFloat32(o, le)); break;
      case 12: out.push(view.getFloat64(o, le)); break;
      case 16: case 18: out.push(Number(view.getBigUint64(o, le))); break;
      case 17: out.push(Number(view.getBigInt64(o, le))); break;
      default: out.push(0);
    }
  }
  return out;
}

/**
 * Parse the header and every page's tags (no pixel data is decoded).
 * @param {ArrayBuffer} buffer
 * @returns {{littleEndian: boolean, pages: object[]}}
 */
export function parseTiff(buffer) {
  const view = new DataView(buffer);
  if (buffer.byteLength < 8) throw new TiffError("not a TIFF file (too short)");
  const order = view.getUint16(0, false);
  if (order !== 0x4949 && order !== 0x4d4d) throw new TiffError("not a TIFF file");
  const le = order === 0x4949;
  const version = view.getUint16(2, le);
  const big = version === 43;
  if (version !== 42 && !big) throw new TiffError(`not a TIFF file (version ${version})`);
  let next = big ? Number(view.getBigUint64(8, le)) : view.getUint32(4, le);
  const pages = [];
  const seen = new Set();
  while (next && !seen.has(next) && pages.length < 100000) {
    if (next + (big ? 8 : 2) > buffer.byteLength) throw new TiffError("truncated TIFF file");
    seen.add(next);
    const n = big ? Number(view.getBigUint64(next, le)) : view.getUint16(next, le);
    const entrySize = big ? 20 : 12;
    const start = next + (big ? 8 : 2);
    const page = {};
    for (let i = 0; i < n; i++) {
      const e = start + i * entrySize;
      const tag = view.getUint16(e, le);
      const type = view.getUint16(e + 2, le);
      const count = big ? Number(view.getBigUint64(e + 4, le)) : view.getUint32(e + 4, le);
      const name = TAGS[tag];
      if (!name || !TYPE_SIZE[type]) continue;
      const size = TYPE_SIZE[type] * count;
      const inline = big ? 8 : 4;
      const at = size <= inline ? e + (big ? 12 : 8)
        : big ? Number(view.getBigUint64(e + 12, le)) : view.getUint32(e + 8, le);
      if (at + size > buffer.byteLength) throw new TiffError(`truncated TIFF file (tag ${tag})`);
      if (type === 2) {
        page[name] = new TextDecoder("latin1").decode(new Uint8Array(buffer, at, Math.max(0, count - 1)));
      } else {
        page[name] = readValues(view, type, count, at, le);
      }
    }
    const after = start + n * entrySize;
    next = big ? Number(view.getBigUint64(after, le)) : view.getUint32(after, le);
    pages.push(normalisePage(page));
  }
  if (!pages.length) throw new TiffError("TIFF file has no image");
  return { littleEndian: le, pages };
}

function first(v, dflt) {
  return v === undefined ? dflt : Array.isArray(v) ? v[0] : v;
}

function normalisePage(p) {
  const spp = first(p.samplesPerPixel, 1);
  const bits = first(p.bitsPerSample, 1);
  const fmt = first(p.sampleFormat, 1);
  const kind = fmt === 3 ? "f" : fmt === 2 ? "i" : bits === 1 ? "b" : "u";
  return {
    width: first(p.width, 0),
    height: first(p.height, 0),
    samples: spp,
    bits,
    kind, // "u" unsigned, "i" signed, "f" float, "b" 1-bit
    compression: first(p.compression, 1),
    predictor: first(p.predictor, 1),
    planar: first(p.planarConfig, 1),
    photometric: first(p.photometric, 1),
    description: p.description || "",
    colorMap: p.colorMap || null,
    tiled: p.tileWidth !== undefined,
    chunkWidth: first(p.tileWidth, first(p.width, 0)),
    chunkHeight: first(p.tileLength, Math.min(first(p.rowsPerStrip, 2 ** 32 - 1), first(p.height, 0))),
    offsets: p.tileOffsets || p.stripOffsets || [],
    byteCounts: p.tileByteCounts || p.stripByteCounts || [],
  };
}

/** The numpy-style dtype name of a page ("uint16", "float32"...). */
export function dtypeOf(page) {
  if (page.kind === "b") return "bool";
  const name = { u: "uint", i: "int", f: "float" }[page.kind];
  return `${name}${page.bits}`;
}

function arrayType(page) {
  const t = {
    u8: Uint8Array, u16: Uint16Array, u32: Uint32Array, u64: BigUint64Array,
    i8: Int8Array, i16: Int16Array, i32: Int32Array, i64: BigInt64Array,
    f32: Float32Array, f64: Float64Array, b1: Uint8Array,
  }[`${page.kind}${page.bits}`];
  if (!t) throw new TiffError(`unsupported pixel type: ${page.bits}-bit ${dtypeOf(page)}`);
  return t;
}

// ------------------------------------------------------------------ decompression
async function inflate(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

function unpackBits(src, expected) {
  const out = new Uint8Array(expected);
  let i = 0;
  let o = 0;
  while (i < src.length && o < expected) {
    const n = (src[i] << 24) >> 24;
    i += 1;
    if (n >= 0) {
      out.set(src.subarray(i, i + n + 1), o);
      o += n + 1;
      i += n + 1;
    } else if (n !== -128) {
      out.fill(src[i], o, o + 1 - n);
      o += 1 - n;
      i += 1;
    }
  }
  return out;
}

function lzw(src, expected) {
  const out = new Uint8Array(expected);
  let o = 0;
  let bitPos = 0;
  let table = [];
  let width = 9;
  const reset = () => {
    table = [];
    for (let i = 0; i < 256; i++) table.push(Uint8Array.of(i));
    table.push(null, null); // 256 clear, 257 end of information
    width = 9;
  };
  const read = () => {
    let code = 0;
    for (let k = 0; k < width; k++) {
      const byte = src[(bitPos >> 3)] ?? 0;
      code = (code << 1) | ((byte >> (7 - (bitPos & 7))) & 1);
      bitPos += 1;
    }
    return code;
  };
  const emit = (seq) => {
    const n = Math.min(seq.length, expected - o);
    out.set(seq.subarray(0, n), o);
    o += n;
  };
  reset();
  let prev = null;
  while (bitPos + width <= src.length * 8 && o < expected) {
    const code = read();
    if (code === 257) break;
    if (code === 256) {
      reset();
      prev = null;
      continue;
    }
    let seq;
    if (code < table.length && table[code]) seq = table[code];
    else if (prev) seq = Uint8Array.of(...prev, prev[0]);
    else throw new TiffError("corrupt LZW data");
    emit(seq);
    if (prev) table.push(Uint8Array.of(...prev, seq[0]));
    prev = seq;
    // TIFF's "early change": widen one code before the table fills
    if (table.length + 1 >= 1 << width && width < 12) width += 1;
  }
  return out;
}

async function decompress(page, bytes, expected) {
  switch (page.compression) {
    case 1: return bytes;
    case 5: return lzw(bytes, expected);
    case 8: case 32946: return inflate(bytes);
    case 32773: return unpackBits(bytes, expected);
    default:
      throw new TiffError(
        `unsupported TIFF compression ${page.compression} (this page reads none, LZW, ` +
          "Deflate and PackBits; the service reads more)",
      );
  }
}

function swapBytes(bytes, size) {
  for (let i = 0; i + size <= bytes.length; i += size) {
    for (let a = i, b = i + size - 1; a < b; a++, b--) {
      const t = bytes[a];
      bytes[a] = bytes[b];
      bytes[b] = t;
    }
  }
}

function undoPredictor(page, chunk, width, rows, spp) {
  if (page.predictor === 2) {
    const Type = arrayType(page);
    const arr = new Type(chunk.buffer, chunk.byteOffset, chunk.byteLength / Type.BYTES_PER_ELEMENT);
    for (let r = 0; r < rows; r++) {
      const row = r * width * spp;
      for (let i = spp; i < width * spp; i++) arr[row + i] += arr[row + i - spp];
    }
  } else if (page.predictor === 3) {
    // bytes were shuffled (most significant first) and differenced; the result is little-endian
    const bps = page.bits / 8;
    const rowBytes = width * spp * bps;
    for (let r = 0; r < rows; r++) {
      const row = chunk.subarray(r * rowBytes, (r + 1) * rowBytes);
      for (let i = spp; i < row.length; i++) row[i] = (row[i] + row[i - spp]) & 0xff;
      const copy = row.slice();
      const n = width * spp;
      for (let i = 0; i < n; i++) {
        for (let b = 0; b < bps; b++) row[i * bps + b] = copy[(bps - b - 1) * n + i];
      }
    }
  }
}

/**
 * Decode one page's pixels.
 * @returns {Promise<{data: TypedArray, width: number, height: number, samples: number,
 *   dtype: string}>} data is (height, width, samples) in row-major order
 */
export async function decodePage(buffer, tiff, index = 0) {
  const page = tiff.pages[index];
  const { width, height, samples, bits } = page;
  if (!width || !height) throw new TiffError("TIFF page has no pixels");
  if (page.kind === "b") {
    return decodeBits(buffer, page);
  }
  const Type = arrayType(page);
  const bps = bits / 8;
  const out = new Type(width * height * samples);
  const outBytes = new Uint8Array(out.buffer);
  const cw = page.chunkWidth;
  const ch = page.chunkHeight;
  const across = Math.ceil(width / cw);
  const down = Math.ceil(height / ch);
  const planes = page.planar === 2 ? samples : 1;
  const sppChunk = page.planar === 2 ? 1 : samples;
  for (let plane = 0; plane < planes; plane++) {
    for (let ty = 0; ty < down; ty++) {
      for (let tx = 0; tx < across; tx++) {
        const idx = plane * across * down + ty * across + tx;
        const offset = page.offsets[idx];
        const count = page.byteCounts[idx];
        if (offset === undefined || count === undefined) throw new TiffError("truncated TIFF file");
        const rows = page.tiled ? ch : Math.min(ch, height - ty * ch);
        const chunkW = page.tiled ? cw : width;
        const expected = chunkW * rows * sppChunk * bps;
        const raw = new Uint8Array(buffer.slice(offset, offset + count));
        let chunk = await decompress(page, raw, expected);
        if (chunk.length < expected) {
          const padded = new Uint8Array(expected);
          padded.set(chunk);
          chunk = padded;
        } else if (chunk.length > expected || chunk.byteOffset % Type.BYTES_PER_ELEMENT) {
          chunk = chunk.slice(0, expected);
        }
        if (!tiff.littleEndian && bps > 1 && page.predictor !== 3) swapBytes(chunk, bps);
        undoPredictor(page, chunk, chunkW, rows, sppChunk);
        // copy rows of the chunk into place
        const px = bps * sppChunk;
        for (let r = 0; r < rows; r++) {
          const y = ty * ch + r;
          if (y >= height) break;
          const x0 = tx * cw;
          const n = Math.min(chunkW, width - x0);
          if (page.planar === 2) {
            for (let x = 0; x < n; x++) {
              const src = (r * chunkW + x) * bps;
              const dst = ((y * width + x0 + x) * samples + plane) * bps;
              outBytes.set(chunk.subarray(src, src + bps), dst);
            }
          } else {
            const src = r * chunkW * px;
            outBytes.set(chunk.subarray(src, src + n * px), (y * width + x0) * px);
          }
        }
      }
    }
  }
  return { data: out, width, height, samples, dtype: dtypeOf(page) };
}

async function decodeBits(buffer, page) {
  const { width, height } = page;
  const out = new Uint8Array(width * height);
  const rowBytes = Math.ceil(width / 8);
  let y = 0;
  for (let s = 0; s < page.offsets.length && y < height; s++) {
    const rows = Math.min(page.chunkHeight, height - y);
    const raw = new Uint8Array(buffer.slice(page.offsets[s], page.offsets[s] + page.byteCounts[s]));
    const chunk = await decompress(page, raw, rowBytes * rows);
    for (let r = 0; r < rows; r++, y++) {
      for (let x = 0; x < width; x++) {
        out[y * width + x] = (chunk[r * rowBytes + (x >> 3)] >> (7 - (x & 7))) & 1;
      }
    }
  }
  return { data: out, width, height, samples: 1, dtype: "bool" };
}

// ------------------------------------------------------------------ writer
/**
 * An uncompressed single-page TIFF of labels (what tifffile and Fiji read as uint16/uint32).
 * @param {Uint16Array|Uint32Array} labels - (height, width), row-major
 * @returns {Uint8Array}
 */
export function encodeLabelTiff(labels, width, height) {
  const bits = labels.BYTES_PER_ELEMENT * 8;
  if (labels.length !== width * height) throw new TiffError("labels do not match width x height");
  const entries = [
    [256, 4, 1, width], [257, 4, 1, height], [258, 3, 1, bits], [259, 3, 1, 1],
    [262, 3, 1, 1], [273, 4, 1, 0], [277, 3, 1, 1], [278, 4, 1, height],
    [279, 4, 1, labels.byteLength], [284, 3, 1, 1], [339, 3, 1, 1],
  ];
  const ifdOffset = 8;
  const ifdSize = 2 + entries.length * 12 + 4;
  const dataOffset = ifdOffset + ifdSize;
  entries[5][3] = dataOffset;
  const out = new Uint8Array(dataOffset + labels.byteLength);
  const view = new DataView(out.buffer);
  view.setUint16(0, 0x4949, false);
  view.setUint16(2, 42, true);
  view.setUint32(4, ifdOffset, true);
  view.setUint16(ifdOffset, entries.length, true);
  entries.forEach(([tag, type, count, value], i) => {
    const e = ifdOffset + 2 + i * 12;
    view.setUint16(e, tag, true);
    view.setUint16(e + 2, type, true);
    view.setUint32(e + 4, count, true);
    if (type === 3) view.setUint16(e + 8, value, true);
    else view.setUint32(e + 8, value, true);
  });
  view.setUint32(ifdOffset + 2 + entries.length * 12, 0, true);
  // little-endian machines (all browsers in practice) store typed arrays as TIFF "II" wants
  const bytes = new Uint8Array(labels.buffer, labels.byteOffset, labels.byteLength);
  if (new Uint8Array(Uint16Array.of(1).buffer)[0] === 1) out.set(bytes, dataOffset);
  else {
    const copy = bytes.slice();
    swapBytes(copy, labels.BYTES_PER_ELEMENT);
    out.set(copy, dataOffset);
  }
  return out;
}
