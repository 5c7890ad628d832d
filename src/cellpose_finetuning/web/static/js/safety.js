// What the page lets into links and which service it talks to.
//
// Link targets come from the service (export_model's download_url and
// artifact_url, list_models_by_dataset's url). A service, or a model added to
// a collection by anyone, could hand back "javascript:..." or an address
// elsewhere; only http(s) addresses on the server this page came from become
// links. And a page opened with ?service= pointing somewhere else than the
// server's own service would send the user's images and id there: say so.

/**
 * The address to put into href, or null when it may not be a link.
 * @param {unknown} url what the service returned
 * @param {string} origin the page's origin (location.origin)
 * @returns {string|null}
 */
export function safeHref(url, origin) {
  if (typeof url !== "string" || !url.trim()) return null;
  let parsed;
  let own;
  try {
    own = new URL(origin);
    parsed = new URL(url.trim(), own);
  } catch {
    return null;
  }
  if (parsed.protocol !== "http:" && parsed.protocol !== "https:") return null;
  if (parsed.origin !== own.origin) return null;
  return parsed.href;
}

/**
 * A warning when the service id in use is not the one the server configured.
 * @param {string} serviceId the id the page will call (from ?service= or the form)
 * @param {string} configured the id in config.json ("" when there is none)
 * @returns {string} empty when there is nothing to warn about
 */
export function serviceWarning(serviceId, configured) {
  if (!configured || !serviceId || serviceId === configured) return "";
  return (
    `Careful: this page is set to use the service "${serviceId}", not this server's own ` +
    `"${configured}". Your images, datasets and user id go to that service: go on only if ` +
    `you trust whoever runs it.`
  );
}
