// Uploading a dataset into the user's own workspace, as client.upload_folder
// does in Python: create a staged "dataset" artifact, ask for presigned PUT
// URLs in batches, send the files (a few at a time, with byte progress), commit.

const URL_BATCH = 500;
const CONCURRENCY = 4;

function put(url, file, onBytes) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("PUT", url);
    let last = 0;
    xhr.upload.onprogress = (e) => {
      onBytes(e.loaded - last);
      last = e.loaded;
    };
    xhr.onload = () => {
      onBytes(file.size - last);
      if (xhr.status >= 200 && xhr.status < 300) resolve();
      else reject(new Error(`upload of ${file.name} failed with HTTP ${xhr.status}`));
    };
    xhr.onerror = () => reject(new Error(`upload of ${file.name} failed (network error)`));
    // a Blob without a type: the presigned signature covers no Content-Type
    xhr.send(file.slice(0, file.size, ""));
  });
}

/**
 * Upload files as a dataset artifact; return its id ("ws-user-<id>/<alias>").
 * On failure the half-made artifact is deleted again.
 *
 * @param {import("./api.js").Connection} conn
 * @param {{alias: string, name: string, description: string, files: Map<string, File>,
 *   extra: object}} dataset - files maps the path inside the dataset to the local file
 * @param {(done: number, total: number) => void} onProgress - bytes sent / to send
 */
export async function uploadDataset(conn, dataset, onProgress) {
  const paths = [...dataset.files.keys()].sort();
  const total = paths.reduce((s, p) => s + dataset.files.get(p).size, 0);
  const art = await conn.artifacts("create", {
    alias: dataset.alias,
    type: "dataset",
    stage: true,
    manifest: {
      name: dataset.name || dataset.alias,
      description: dataset.description || "Uploaded from the cellpose-finetuning web page",
      ...dataset.extra,
    },
  });
  try {
    const urls = {};
    for (let i = 0; i < paths.length; i += URL_BATCH) {
      const batch = paths.slice(i, i + URL_BATCH);
      const got = await conn.artifacts("put_file", { artifact_id: art.id, file_path: batch });
      Object.assign(urls, typeof got === "string" ? { [batch[0]]: got } : got);
    }
    let sent = 0;
    onProgress(0, total);
    const queue = [...paths];
    const worker = async () => {
      while (queue.length) {
        const path = queue.shift();
        await put(urls[path], dataset.files.get(path), (bytes) => {
          sent += bytes;
          onProgress(sent, total);
        });
      }
    };
    await Promise.all(Array.from({ length: Math.min(CONCURRENCY, paths.length) }, worker));
    await conn.artifacts("commit", { artifact_id: art.id });
  } catch (err) {
    await conn.artifacts("delete", { artifact_id: art.id }).catch(() => {});
    throw err;
  }
  return art.id;
}

/** The user's datasets (artifacts of type "dataset" in their workspace), newest first. */
export async function listDatasets(conn) {
  const items = await conn.artifacts("list", {
    parent_id: null,
    limit: 1000,
    order_by: "created_at>",
  });
  return (items || []).filter((a) => a.type === "dataset");
}
