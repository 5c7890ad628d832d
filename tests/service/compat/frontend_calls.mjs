// The original web frontend's calls, made as it makes them: hypha-rpc JS, every
// method called as svc.method({...kwargs}, {_rkwargs: true}), the sessions dict
// read with Object.entries, inference through a temporary artifact with json_safe.
// Run by test_frontend.py with Node.js: node --experimental-websocket frontend_calls.mjs ARGS.json
import { readFileSync } from "node:fs";

const args = JSON.parse(readFileSync(process.argv[2], "utf8"));
const { connectToServer } = await import(args.hypha_rpc);
const out = { steps: [] };
const step = (name, value) => out.steps.push({ name, value });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const server = await connectToServer({ server_url: args.server_url, token: args.token });
try {
  const service = await server.getService(args.service_id);
  const am = await server.getService("public/artifact-manager");

  // startTraining: the form's fields, nulls included (metadata_dir is always sent)
  const result = await service.start_training(
    {
      artifact: args.dataset,
      train_images: "images/train/" || null,
      train_annotations: "annotations/train/" || null,
      metadata_dir: null,
      test_images: "images/test/" || null,
      test_annotations: "annotations/test/" || null,
      model: args.model || "cpsam",
      n_samples: null,
      n_epochs: 2,
      learning_rate: 1e-5,
      weight_decay: 1e-4,
      min_train_masks: 5,
      validation_interval: null,
    },
    { _rkwargs: true },
  );
  if (!result || !result.session_id) throw new Error("No session_id returned: " + JSON.stringify(result));
  const id = result.session_id;
  step("start_training", { session_id: id, status_type: result.status_type });

  // refreshSessions: the dict, keyed by session id; the running one found by entries
  let sessions = await service.list_training_sessions();
  step("list_keys", Object.keys(sessions));
  const running = Object.entries(sessions).find(([_, s]) => s && s.status_type === "running");
  step("running_found", running ? running[0] : null);

  // viewSession / exportModel: poll with get_training_status({session_id}, {_rkwargs})
  let status;
  for (let i = 0; i < 1200; i++) {
    status = await service.get_training_status({ session_id: id }, { _rkwargs: true });
    if (["completed", "failed", "stopped"].includes(status.status_type)) break;
    await sleep(300);
  }
  step("final_status", { status_type: status.status_type, epochs: status.train_losses.length, message: status.message });

  // runInference: upload the file to a temporary artifact in the service's workspace
  const tmpAlias = `cellpose-infer-${Date.now()}`;
  const art = await am.create({
    alias: tmpAlias,
    manifest: { name: tmpAlias, description: "temporary inference input", visibility: "public" },
    workspace: args.service_id.split("/")[0],
    config: { permissions: { "*": "r" } },
    type: "temp",
    stage: true,
    overwrite: true,
    _rkwargs: true,
  });
  const fname = "probe.png";
  const url = await am.put_file(art.id, fname);
  const put = await fetch(url, { method: "PUT", body: readFileSync(args.png) });
  if (!put.ok) throw new Error(`upload failed: ${put.status}`);
  await am.commit(art.id);
  const inferred = await service.infer(
    {
      artifact: art.id,
      image_paths: [fname],
      input_arrays: null,
      model: id,
      diameter: null,
      flow_threshold: 0.4,
      cellprob_threshold: 0.0,
      niter: null,
      return_flows: false,
      json_safe: true,
    },
    { _rkwargs: true },
  );
  const mask = JSON.parse(JSON.stringify(inferred[0])).output;
  step("infer", {
    input_path: inferred[0].input_path,
    encoding: mask.encoding,
    width: mask.width,
    height: mask.height,
    object_count: mask.object_count,
    png_head: mask.png_base64.slice(0, 8),
  });

  // stop / restart from the sessions table
  const restarted = await service.restart_training({ session_id: id }, { _rkwargs: true });
  step("restart", { session_id: restarted.session_id, restarted_from: restarted.restarted_from });
  const stopped = await service.stop_training({ session_id: id }, { _rkwargs: true });
  step("stop", { status_type: stopped.status_type });
  for (let i = 0; i < 600; i++) {
    status = await service.get_training_status({ session_id: id }, { _rkwargs: true });
    if (["completed", "failed", "stopped"].includes(status.status_type)) break;
    await sleep(300);
  }
  step("after_stop", status.status_type);

  // exportModel: model_name may be null (the original names it)
  const exported = await service.export_model(
    { session_id: id, model_name: null, collection: "bioimage-io/colab-annotations" },
    { _rkwargs: true },
  );
  step("export", { status: exported.status, model_name: exported.model_name, artifact_id: exported.artifact_id });
} catch (e) {
  out.error = String(e && e.message ? e.message : e);
} finally {
  await server.disconnect();
}
console.log(JSON.stringify(out));
process.exit(0);
