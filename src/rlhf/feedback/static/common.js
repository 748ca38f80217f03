// Shared by the annotation and admin pages. Every string from the server (prompts, model output, names)
// goes into the page with textContent, never innerHTML: it is untrusted and must stay text.
"use strict";

const rlhf = (() => {
  let csrf = "";

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (value === true) node.setAttribute(key, "");
      else if (value !== false && value !== null && value !== undefined) node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function kbd(key) {
    return el("kbd", { text: key });
  }

  async function api(method, path, body) {
    const options = { method, headers: {}, credentials: "same-origin" };
    if (method !== "GET") {
      options.headers["Content-Type"] = "application/json";
      options.headers["X-CSRF-Token"] = csrf;
      options.body = JSON.stringify(body === undefined ? {} : body);
    }
    const response = await fetch(path, options);
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) {
      const error = new Error((data && data.error) || `${response.status} ${response.statusText}`);
      error.status = response.status;
      throw error;
    }
    return data;
  }

  function setCsrf(token) { csrf = token; }

  function show(id, visible) { document.getElementById(id).hidden = !visible; }

  function fmt(value, digits = 2) {
    if (value === null || value === undefined) return "–";
    if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(digits);
    return String(value);
  }

  return { el, kbd, api, setCsrf, show, fmt };
})();
