// Pairing image files with mask files: a faithful port of
// cellpose_finetuning/data/pairing.py (same rules, same error messages), so the
// page shows exactly what the service would say before anything is uploaded.
// tests/web/test_pairing_js.py runs both on the same cases and compares.
//
// Two forms, and both sides must use the same one:
//  - folder:  "images/x/" and "annotations/x/" pair by identical file name;
//  - pattern: "images/x/*.ome.tif" and "annotations/x/*_mask.ome.tif": one "*"
//    in the file-name part; files pair when the parts the "*" matched are equal.

/** Suffixes the service reads (io/images.py SUPPORTED_IMAGE_SUFFIXES). */
export const IMAGE_SUFFIXES = [
  ".ome.tif", ".ome.tiff", ".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy",
];

/** Suffixes read only as annotations (io/annotations.py POLYGON_SUFFIXES). */
export const ANNOTATION_ONLY_SUFFIXES = [".geojson", ".zip"];
const TOOL_SUFFIXES = ["_seg.npy", "_rois.zip", ".zip", ".geojson"];

const MAX_LISTED = 10;
const SCHEME = /^[A-Za-z][A-Za-z0-9+.-]*:/;
const FORMS =
  "a folder ending in '/' (e.g. 'images/train/') or a pattern with one '*' in the " +
  "file name (e.g. 'images/train/*.tif')";

/** The service's InvalidInput: message "what: reason". */
export class PairingError extends Error {
  constructor(what, reason) {
    super(`${what}: ${reason}`);
    this.name = "PairingError";
    this.what = what;
    this.reason = reason;
  }
}

// ------------------------------------------------------------------ Python's repr
const NON_PRINTABLE = /[\p{Cc}\p{Cf}\p{Cs}\p{Co}\p{Cn}\p{Zl}\p{Zp}\p{Zs}]/u;

/** Python's repr() of a str, so messages read the same as the service's. */
export function pyRepr(s) {
  const quote = s.includes("'") && !s.includes('"') ? '"' : "'";
  let out = quote;
  for (const ch of s) {
    const cp = ch.codePointAt(0);
    if (ch === "\\") out += "\\\\";
    else if (ch === quote) out += "\\" + ch;
    else if (ch === "\n") out += "\\n";
    else if (ch === "\r") out += "\\r";
    else if (ch === "\t") out += "\\t";
    else if (ch !== " " && NON_PRINTABLE.test(ch)) {
      if (cp < 0x100) out += "\\x" + cp.toString(16).padStart(2, "0");
      else if (cp < 0x10000) out += "\\u" + cp.toString(16).padStart(4, "0");
      else out += "\\U" + cp.toString(16).padStart(8, "0");
    } else out += ch;
  }
  return out + quote;
}

// ------------------------------------------------------------------ natural sort
// natsort's default key: the string in NFD form, digit runs (any Unicode decimal
// digit) as integers, empty strings dropped, a leading "" when it starts with a number.
const DIGITS = /(\p{Nd}+)/u;
const IS_DIGIT = /^\p{Nd}$/u;

function digitValue(ch) {
  // Unicode decimal digits come in contiguous runs 0..9: count the digits before.
  let cp = ch.codePointAt(0);
  let k = 0;
  while (k < 9 && IS_DIGIT.test(String.fromCodePoint(cp - 1))) {
    cp -= 1;
    k += 1;
  }
  return k;
}

function toInteger(run) {
  let ascii = "";
  for (const ch of run) ascii += ch >= "0" && ch <= "9" ? ch : String(digitValue(ch));
  return BigInt(ascii);
}

/** natsort's key of a string, as an array of strings and BigInts. */
export function natKey(s) {
  const parts = s.normalize("NFD").split(DIGITS).filter((p) => p !== "");
  const key = parts.map((p) => (IS_DIGIT.test([...p][0]) ? toInteger(p) : p));
  if (key.length && typeof key[0] === "bigint") key.unshift("");
  return key;
}

function compareCodePoints(a, b) {
  const x = [...a];
  const y = [...b];
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    const d = x[i].codePointAt(0) - y[i].codePointAt(0);
    if (d) return d;
  }
  return x.length - y.length;
}

function compareKeys(a, b) {
  for (let i = 0; i < Math.min(a.length, b.length); i++) {
    const x = a[i];
    const y = b[i];
    if (typeof x === "bigint" && typeof y === "bigint") {
      if (x !== y) return x < y ? -1 : 1;
    } else {
      const d = compareCodePoints(String(x), String(y));
      if (d) return d;
    }
  }
  return a.length - b.length;
}

/** natsort.natsorted: a stable natural sort (img2 before img10). */
export function natsorted(items) {
  return items
    .map((item) => [natKey(item), item])
    .sort((p, q) => compareKeys(p[0], q[0]))
    .map((p) => p[1]);
}

// ------------------------------------------------------------------ paths and specs
/** Whether a file name has an image suffix the service reads. */
export function isImageFile(name) {
  const lower = name.toLowerCase();
  return IMAGE_SUFFIXES.some((s) => lower.endsWith(s));
}

/** Whether a file name is one the service reads as annotations (io/annotations.py). */
export function isAnnotationFile(name) {
  const lower = name.toLowerCase();
  return isImageFile(name) || ANNOTATION_ONLY_SUFFIXES.some((s) => lower.endsWith(s));
}

function parts(path) {
  return path.split("/").filter((p) => p !== "" && p !== ".");
}

/** Normalise a relative POSIX path; refuse anything that could leave the data root. */
export function safeRelpath(path, arg) {
  if (typeof path !== "string" || !path) {
    throw new PairingError(arg, "must be a non-empty path string");
  }
  if (path.includes("\0") || path.includes("\\")) {
    throw new PairingError(
      arg, `${pyRepr(path)} contains a forbidden character (backslash or NUL); use '/'`,
    );
  }
  if (SCHEME.test(path)) {
    throw new PairingError(
      arg, `${pyRepr(path)}: URLs are not allowed here, give a path in the dataset`,
    );
  }
  if (path.startsWith("/")) {
    throw new PairingError(
      arg, `${pyRepr(path)}: absolute paths are not allowed, give a path in the dataset`,
    );
  }
  const p = parts(path);
  if (p.includes("..")) throw new PairingError(arg, `${pyRepr(path)}: '..' is not allowed`);
  const norm = p.join("/");
  if (path.endsWith("/")) return norm ? norm + "/" : "./";
  return norm;
}

/** Whether a spec is in the pattern form (contains "*"). */
export function isPattern(spec) {
  return spec.includes("*");
}

function rpartition(s, sep) {
  const i = s.lastIndexOf(sep);
  return i < 0 ? ["", "", s] : [s.slice(0, i), sep, s.slice(i + sep.length)];
}

/** The folder a spec lists, normalised ("" for the root). */
export function specDir(spec) {
  const folder = isPattern(spec) ? rpartition(spec, "/")[0] : spec;
  return parts(folder).join("/");
}

function checkSpec(spec, arg) {
  spec = safeRelpath(spec, arg);
  if (isPattern(spec)) {
    const [head, , tail] = rpartition(spec, "/");
    if (head.includes("*") || tail.split("*").length - 1 !== 1) {
      throw new PairingError(
        arg, `${pyRepr(spec)}: a pattern needs exactly one '*', in the file-name part`,
      );
    }
  } else if (!spec.endsWith("/")) {
    throw new PairingError(arg, `${pyRepr(spec)} is neither form; give ${FORMS}`);
  }
  return spec;
}

function fixedChars(spec) {
  return isPattern(spec) ? [...rpartition(spec, "/")[2].replace("*", "")].length : 0;
}

function select(spec, names, annotations = false) {
  const accept = annotations && isPattern(spec) ? isAnnotationFile : isImageFile;
  const folder = specDir(spec);
  const prefix = folder ? folder + "/" : "";
  const [before, after] = isPattern(spec) ? rpartition(spec, "/")[2].split("*") : ["", ""];
  const fixed = before.length + after.length;
  const out = new Map();
  for (const name of names) {
    if (!name.startsWith(prefix)) continue;
    const base = name.slice(prefix.length);
    if (!base || base.includes("/") || !accept(base)) continue;
    if (!isPattern(spec)) out.set(base, name);
    else if (base.length > fixed && base.startsWith(before) && base.endsWith(after)) {
      out.set(base.slice(before.length, base.length - after.length), name);
    }
  }
  return out;
}

function listing(names) {
  const sorted = natsorted([...names]);
  const shown = sorted.slice(0, MAX_LISTED).join(", ");
  const more = sorted.length - MAX_LISTED;
  return shown + (more > 0 ? ` and ${more} more` : "");
}

// For the folder form: how to pair the tools' annotation files, if the folder has some.
function toolHint(imagesSpec, annotationsSpec, names) {
  if (isPattern(annotationsSpec)) return "";
  const folder = specDir(annotationsSpec);
  const prefix = folder ? folder + "/" : "";
  const found = natsorted(
    names.filter((n) => n.startsWith(prefix) && !n.slice(prefix.length).includes("/")),
  );
  for (const name of found) {
    const lower = name.toLowerCase();
    const suffix = TOOL_SUFFIXES.find((s) => lower.endsWith(s));
    if (suffix === undefined) continue;
    const imgFolder = specDir(imagesSpec);
    const imgPrefix = imgFolder ? imgFolder + "/" : "";
    const exts = natsorted(
      names
        .filter(
          (n) =>
            n.startsWith(imgPrefix) &&
            !n.slice(imgPrefix.length).includes("/") &&
            isImageFile(n) &&
            n.slice(imgPrefix.length).includes("."),
        )
        .map((n) => "." + rpartition(n, ".")[2]),
    );
    const ext = exts.length ? exts[0] : ".tif";
    return (
      `; annotation files such as ${pyRepr(rpartition(name, "/")[2])} pair by pattern: give ` +
      `${pyRepr(imgPrefix + "*" + ext)} and ${pyRepr(prefix + "*" + name.slice(name.length - suffix.length))}`
    );
  }
  return "";
}

function filesIn(folder, names) {
  const prefix = folder ? folder + "/" : "";
  return names.filter((n) => n.startsWith(prefix) && !n.slice(prefix.length).includes("/"))
    .length;
}

/** Check two specs without listing anything; return them normalised. */
export function checkSpecs(
  imagesSpec, annotationsSpec,
  { imagesArg = "train_images", annotationsArg = "train_annotations" } = {},
) {
  imagesSpec = checkSpec(imagesSpec, imagesArg);
  annotationsSpec = checkSpec(annotationsSpec, annotationsArg);
  if (isPattern(imagesSpec) !== isPattern(annotationsSpec)) {
    throw new PairingError(
      `${imagesArg}/${annotationsArg}`,
      "use the same form for both: two folders ending in '/' or two patterns with '*' " +
        `(got ${pyRepr(imagesSpec)} and ${pyRepr(annotationsSpec)})`,
    );
  }
  return [imagesSpec, annotationsSpec];
}

/**
 * Pair image and mask file names by folder or by pattern.
 *
 * @param {string} imagesSpec - "images/train/" or "images/train/*.tif"
 * @param {string} annotationsSpec - the same form
 * @param {string[]} names - file paths relative to the data root
 * @returns {{image: string, annotation: string, key: string}[]} in natural order of key
 * @throws {PairingError} with the service's message
 */
export function pairFiles(
  imagesSpec, annotationsSpec, names,
  { imagesArg = "train_images", annotationsArg = "train_annotations" } = {},
) {
  imagesSpec = checkSpec(imagesSpec, imagesArg);
  annotationsSpec = checkSpec(annotationsSpec, annotationsArg);
  const both = `${imagesArg}/${annotationsArg}`;
  if (isPattern(imagesSpec) !== isPattern(annotationsSpec)) {
    throw new PairingError(
      both,
      `use the same form for ${imagesArg} and ${annotationsArg}: two folders ending ` +
        `in '/' or two patterns with '*' (got ${pyRepr(imagesSpec)} and ` +
        `${pyRepr(annotationsSpec)})`,
    );
  }
  if (imagesSpec === annotationsSpec) {
    throw new PairingError(both, `images and annotations are the same (${pyRepr(imagesSpec)})`);
  }
  names = names.map((n) => n.replace(/^\/+/, ""));
  const images = select(imagesSpec, names);
  const masks = select(annotationsSpec, names, true);
  const maskNames = new Set(masks.values());
  const shared = new Set([...images.values()].filter((v) => maskNames.has(v)));
  if (shared.size) {
    // Same folder, overlapping patterns: the more specific pattern keeps the file.
    const specA = fixedChars(imagesSpec);
    const specM = fixedChars(annotationsSpec);
    if (specA === specM) {
      throw new PairingError(
        both,
        `${pyRepr(imagesSpec)} and ${pyRepr(annotationsSpec)} both match ` +
          `${listing(shared)}; make one pattern more specific`,
      );
    }
    const loser = specA < specM ? images : masks;
    for (const [k, v] of [...loser]) if (shared.has(v)) loser.delete(k);
  }
  for (const [spec, found, arg] of [
    [imagesSpec, images, imagesArg],
    [annotationsSpec, masks, annotationsArg],
  ]) {
    if (!found.size) {
      const folder = specDir(spec);
      const hint = arg === annotationsArg ? toolHint(imagesSpec, spec, names) : "";
      throw new PairingError(
        arg,
        `${pyRepr(spec)} matches no image files (${filesIn(folder, names)} files ` +
          `directly in ${pyRepr(folder || ".")})${hint}`,
      );
    }
  }
  const onlyImages = [...images].filter(([k]) => !masks.has(k)).map(([, v]) => v);
  const onlyMasks = [...masks].filter(([k]) => !images.has(k)).map(([, v]) => v);
  if (onlyImages.length || onlyMasks.length) {
    const problems = [];
    if (onlyImages.length) {
      problems.push(
        `${onlyImages.length} images in ${imagesArg} have no annotation in ` +
          `${annotationsArg} (${pyRepr(annotationsSpec)}): ${listing(onlyImages)}`,
      );
    }
    if (onlyMasks.length) {
      problems.push(
        `${onlyMasks.length} annotations in ${annotationsArg} have no image in ` +
          `${imagesArg} (${pyRepr(imagesSpec)}): ${listing(onlyMasks)}`,
      );
    }
    throw new PairingError(both, problems.join("; ") + toolHint(imagesSpec, annotationsSpec, names));
  }
  return natsorted([...images.keys()]).map((k) => ({
    image: images.get(k),
    annotation: masks.get(k),
    key: k,
  }));
}
