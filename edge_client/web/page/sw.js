// Service worker: precache every file model.json lists, then answer from the cache (offline).
// The cache is named by model.json's "version" (a digest of the files). model.json and the page
// itself are fetched from the network first (the cache answers when offline), so a new export is
// seen on the next visit; the page then asks for a precache of the new version ("precache").
const PREFIX = "fedpara-web-";
const NETWORK_FIRST = new Set(["", "index.html", "model.json"]);

async function precache() {
  const meta = await (await fetch("model.json", { cache: "no-store" })).json();
  const name = PREFIX + meta.version;
  if (!(await caches.has(name))) {
    const cache = await caches.open(name);
    await cache.addAll(["./", "model.json", ...Object.keys(meta.files)]);
  }
  const names = await caches.keys();
  await Promise.all(names.filter((n) => n.startsWith(PREFIX) && n !== name).map((n) => caches.delete(n)));
  return meta.version;
}

async function fromCache(request) {
  for (const name of (await caches.keys()).filter((n) => n.startsWith(PREFIX))) {
    const hit = await (await caches.open(name)).match(request, { ignoreSearch: true });
    if (hit) return hit;
  }
  return undefined;
}

self.addEventListener("install", (event) => { event.waitUntil(precache().then(() => self.skipWaiting())); });
self.addEventListener("activate", (event) => { event.waitUntil(self.clients.claim()); });
self.addEventListener("message", (event) => {
  if (event.data === "precache") {
    event.waitUntil(precache().then((v) => event.source && event.source.postMessage({ cached: v }),
      (e) => event.source && event.source.postMessage({ error: String(e) })));
  }
});
self.addEventListener("fetch", (event) => {
  if (event.request.method !== "GET") return;
  const url = new URL(event.request.url);
  if (url.origin !== self.location.origin) return;
  const rel = url.pathname.slice(new URL(self.registration.scope).pathname.length);
  event.respondWith((async () => {
    if (NETWORK_FIRST.has(rel)) {
      try { return await fetch(event.request, { cache: "no-store" }); } catch (e) {
        const hit = await fromCache(event.request);
        if (hit) return hit;
        throw e;
      }
    }
    return (await fromCache(event.request)) || fetch(event.request);
  })());
});
