// The pages' API key (server/auth.py): asked for once, on the first 401, kept for this tab's session
// (sessionStorage: gone when the tab closes, never sent anywhere but this server) and sent as
// Authorization: Bearer with every call. A refused key is forgotten and asked for again.
const API_KEY_ITEM = "chatstream-api-key";

async function authFetch(url, options = {}) {
  for (let asked = false; ; asked = true) {
    const key = sessionStorage.getItem(API_KEY_ITEM);
    const headers = {...(options.headers || {})};
    if (key) headers["Authorization"] = "Bearer " + key;
    const res = await fetch(url, {...options, headers});
    if (res.status !== 401 || asked) return res;
    sessionStorage.removeItem(API_KEY_ITEM);
    const entered = (window.prompt("This server needs an API key:") || "").trim();
    if (!entered) return res;
    sessionStorage.setItem(API_KEY_ITEM, entered);
  }
}
