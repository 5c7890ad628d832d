// Talking to the server the page is served from: configuration, login, the
// service and the artifact manager, and turning remote errors into one line.

import { connectToServer } from "../vendor/hypha-rpc/hypha-rpc-websocket.min.mjs";

/**
 * Where the server and the service are.
 * The server is the one serving this page (the page lives at <server>/<mount>/index.html);
 * the service id comes from ?service=, else config.json written by `serve`.
 */
export async function loadConfig(location = window.location) {
  const pageUrl = new URL(location.href);
  const serverUrl = new URL("..", pageUrl).href.replace(/\/$/, "");
  let file = {};
  try {
    const resp = await fetch(new URL("config.json", pageUrl), { cache: "no-store" });
    if (resp.ok) file = await resp.json();
  } catch {
    file = {};
  }
  const params = pageUrl.searchParams;
  return {
    serverUrl,
    serviceId: params.get("service") || file.service_id || "",
    collection: params.get("collection") || file.collection || "",
    fromFile: Boolean(file.service_id),
    configuredServiceId: file.service_id || "",
  };
}

/**
 * One line a person can read from any error: remote Python tracebacks are cut
 * to their final message, without the exception's class name.
 */
export function errorText(err) {
  let text = err instanceof Error ? err.message : typeof err === "string" ? err : JSON.stringify(err);
  text = (text || "unknown error").replace(/^(Error: )?RemoteError: /, "").trim();
  const lines = text.split("\n");
  if (/Traceback \(most recent call last\)/.test(text) || lines.some((l) => /^\s+File "/.test(l))) {
    let start = -1;
    for (let i = lines.length - 1; i >= 0; i--) {
      if (/^[A-Za-z_][\w.]*(: |:$)/.test(lines[i]) && !/^\s/.test(lines[i])) {
        start = i;
        break;
      }
    }
    text = start >= 0 ? lines.slice(start).join("\n") : lines[lines.length - 1];
  }
  text = text.replace(/^(?:[A-Za-z_][\w.]*\.)?(?:\w*Error|Exception|PermissionError|LookupError): /, "");
  return text.length > 2000 ? text.slice(0, 2000) + " …" : text;
}

/** A logged-in (or anonymous) connection with the service and the artifact manager. */
export class Connection {
  constructor(server, svc, am, config) {
    this.server = server;
    this.svc = svc;
    this.am = am;
    this.config = config;
  }

  get user() {
    return this.server.config.user || {};
  }

  get anonymous() {
    const u = this.user;
    return Boolean(u.is_anonymous) || /^anonymouz-/.test(u.id || "");
  }

  get workspace() {
    return this.server.config.workspace;
  }

  /** Call a service method with its arguments as one dict (what api_method accepts). */
  call(method, kwargs = {}) {
    const fn = this.svc[method];
    if (!fn) throw new Error(`the service has no method ${method}`);
    return Object.keys(kwargs).length ? fn(kwargs) : fn();
  }

  /** Call the artifact manager with keyword arguments. */
  artifacts(method, kwargs = {}) {
    return this.am[method]({ ...kwargs, _rkwargs: true });
  }

  async disconnect() {
    try {
      await this.server.disconnect();
    } catch {
      /* already gone */
    }
  }
}

/**
 * Connect with a token (or none: anonymous) and get the service.
 * @returns {Promise<Connection>}
 */
export async function connect(config, token) {
  if (!config.serviceId) {
    throw new Error("no service id: open the page with ?service=<workspace>/cellpose-finetuning");
  }
  const options = { server_url: config.serverUrl, method_timeout: 900 };
  if (token) options.token = token.trim();
  let server;
  try {
    server = await connectToServer(options);
  } catch (err) {
    throw new Error(`could not connect to ${config.serverUrl}: ${errorText(err)}`);
  }
  try {
    const svc = await server.getService(config.serviceId);
    const am = await server.getService("public/artifact-manager");
    return new Connection(server, svc, am, config);
  } catch (err) {
    await server.disconnect().catch(() => {});
    throw new Error(`service ${config.serviceId} is not available: ${errorText(err)}`);
  }
}
