// The annotation page: sign in, then compare / rank / write, one item at a time, with the keyboard or the mouse.
"use strict";

(() => {
  const { el, kbd, api, setCsrf, show } = rlhf;
  const $ = (id) => document.getElementById(id);
  const LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";
  const FLAG_NAMES = { harmful: "Harmful", untruthful: "Untruthful", off_topic: "Off-topic" };
  const SHORTCUTS = {
    pair: [["1", "Response A is better"], ["2", "Response B is better"], ["T", "Tie"], ["B", "Both bad"],
           ["M", "Toggle slightly / much better"], ["Enter", "Submit"]],
    rank: [["1 … K", "Next best response"], ["Backspace", "Undo the last pick"], ["Enter", "Submit the ranking"]],
    demo: [["Ctrl + Enter", "Submit the demonstration"]],
  };
  const HINTS = {
    pair: "Which response is better?",
    rank: "Rank the responses, best first.",
    demo: "Write the response you would want the assistant to give.",
  };

  let me = null;
  let item = null;   // the current assignment from /api/next
  let state = null;  // what the annotator has chosen so far
  let busy = false;

  // ---------------------------------------------------------------------------------------------
  // Signing in

  async function start() {
    try {
      me = await api("GET", "/api/me");
    } catch (e) {
      if (e.status === 401) return showLogin();
      throw e;
    }
    setCsrf(me.csrf);
    signedIn();
  }

  async function showLogin() {
    show("task-view", false); show("done-view", false); show("who", false); show("progress", false);
    show("login-view", true);
    const { csrf } = await api("GET", "/api/login-csrf");
    setCsrf(csrf);
    const params = new URLSearchParams(location.hash.slice(1));
    if (params.get("token")) {  // a one-time link: the token sits in the fragment, which never reaches a server log
      history.replaceState(null, "", location.pathname);
      return login({ name: params.get("name") || "", token: params.get("token") });
    }
    $("login-name").focus();
  }

  async function login(body) {
    $("login-error").textContent = "";
    try {
      const result = await api("POST", "/api/login", body);
      setCsrf(result.csrf);
      me = await api("GET", "/api/me");
      signedIn();
    } catch (e) {
      $("login-error").textContent = e.message;
    }
  }

  function onLoginSubmit(event) {
    event.preventDefault();
    const useToken = !$("token-row").hidden;
    const body = { name: $("login-name").value.trim() };
    if (useToken) body.token = $("login-token").value.trim();
    else body.password = $("login-password").value;
    login(body);
  }

  function toggleToken() {
    const useToken = $("token-row").hidden;
    $("token-row").hidden = !useToken;
    $("password-row").hidden = useToken;
    $("toggle-token").textContent = useToken ? "Use a password instead" : "Use a one-time token instead";
  }

  function signedIn() {
    show("login-view", false);
    show("who", true);
    $("user-name").textContent = me.name;
    $("admin-link").hidden = me.role !== "admin";
    $("guidelines").textContent = me.guidelines;
    loadNext();
  }

  async function logout() {
    try { await api("POST", "/api/logout"); } finally { location.reload(); }
  }

  // ---------------------------------------------------------------------------------------------
  // Items

  async function loadNext() {
    setMessage("");
    const data = await api("POST", "/api/next");
    item = data.assignment;
    renderProgress(data.progress);
    if (!item) {
      show("task-view", false); show("done-view", true);
      return;
    }
    show("done-view", false); show("task-view", true);
    renderItem();
  }

  function renderProgress(progress) {
    show("progress", true);
    const left = progress.remaining + (item ? 1 : 0);  // the item on screen is still to go
    const total = progress.done + left;
    $("progress-text").textContent = `${progress.done} labelled · ${left} to go`;
    $("progress-fill").style.width = total ? `${(100 * progress.done / total).toFixed(1)}%` : "100%";
  }

  function renderItem() {
    const kind = item.kind;
    $("task-kind").textContent = { pair: "Compare", rank: "Rank", demo: "Demonstrate" }[kind];
    $("task-hint").textContent = HINTS[kind];
    renderPrompt(item.prompt);
    renderShortcuts(SHORTCUTS[kind]);
    const body = $("task-body");
    body.replaceChildren();
    if (kind === "pair") renderPair(body);
    else if (kind === "rank") renderRank(body);
    else renderDemo(body);
    window.scrollTo(0, 0);
  }

  function renderPrompt(messages) {
    const box = $("prompt");
    box.replaceChildren();
    const single = messages.length === 1 && messages[0].role === "user";
    for (const m of messages) {
      box.append(el("div", { class: `turn turn-${m.role}` },
        single ? null : el("span", { class: "role", text: m.role }),
        el("div", { class: "text", text: m.content })));
    }
  }

  function renderShortcuts(list) {
    $("shortcuts").replaceChildren(...list.flatMap(([key, what]) => [el("dt", {}, kbd(key)), el("dd", { text: what })]));
  }

  function responseCard(text, pos, extra) {
    return el("article", { class: "response card", "data-pos": pos },
      el("header", {}, el("span", { class: "side-label" }, kbd(String(pos + 1)), ` Response ${LETTERS[pos]}`), extra || null),
      el("div", { class: "response-text", text: text }));
  }

  function flagBoxes(pos) {
    return el("footer", { class: "flags" }, ...Object.entries(FLAG_NAMES).map(([flag, label]) =>
      el("label", { class: "flag" },
        el("input", { type: "checkbox", "data-flag": flag, "data-pos": pos, onchange: (e) => toggleFlag(pos, flag, e.target.checked) }),
        label)));
  }

  function toggleFlag(pos, flag, on) {
    const set = state.flags[pos];
    if (on) set.add(flag); else set.delete(flag);
  }

  function flagsPayload() {
    const out = {};
    state.flags.forEach((set, pos) => { if (set.size) out[pos] = [...set]; });
    return out;
  }

  // ---------------------------------------------------------------------------------------------
  // Pairwise comparison

  function renderPair(body) {
    state = { choice: null, strength: "slightly", flags: item.responses.map(() => new Set()) };
    const cards = item.responses.map((text, pos) => {
      const card = responseCard(text, pos);
      card.append(flagBoxes(pos));
      card.addEventListener("click", (e) => { if (!e.target.closest(".flags")) choose(pos === 0 ? "left" : "right"); });
      return card;
    });
    const choice = (value, label, key) => el("button", { type: "button", class: "choice", "data-choice": value,
      onclick: () => choose(value) }, label, " ", kbd(key));
    const strength = (value, label) => el("button", { type: "button", class: "seg", "data-strength": value,
      onclick: () => setStrength(value) }, label);
    body.append(
      el("div", { class: "pair" }, ...cards),
      el("div", { class: "decision card" },
        el("div", { class: "choices" },
          choice("left", "A is better", "1"), choice("right", "B is better", "2"),
          choice("tie", "Tie", "T"), choice("both_bad", "Both bad", "B")),
        el("div", { class: "decision-row" },
          el("div", { class: "strength", role: "group", "aria-label": "How much better" },
            el("span", { class: "muted", text: "How much better?" }),
            strength("slightly", "Slightly"), strength("much", "Much"), kbd("M")),
          el("button", { type: "button", id: "submit", class: "primary", onclick: submitPair, disabled: true },
            "Submit ", kbd("Enter")))));
    paintPair();
  }

  function choose(value) {
    state.choice = value;
    paintPair();
  }

  function setStrength(value) {
    state.strength = value;
    paintPair();
  }

  function paintPair() {
    document.querySelectorAll("[data-choice]").forEach((b) => b.classList.toggle("selected", b.dataset.choice === state.choice));
    const decided = state.choice === "left" || state.choice === "right";
    document.querySelectorAll("[data-strength]").forEach((b) => {
      b.classList.toggle("selected", b.dataset.strength === state.strength);
      b.disabled = !decided;
    });
    document.querySelectorAll(".pair .response").forEach((card) => {
      const pos = Number(card.dataset.pos);
      const winner = (state.choice === "left" && pos === 0) || (state.choice === "right" && pos === 1);
      card.classList.toggle("winner", winner);
      card.classList.toggle("loser", decided && !winner);
      card.classList.toggle("bad", state.choice === "both_bad");
    });
    $("submit").disabled = !state.choice;
  }

  function submitPair() {
    if (!state.choice) return setMessage("Choose A, B, tie or both bad first.", true);
    const decided = state.choice === "left" || state.choice === "right";
    submit({ choice: state.choice, strength: decided ? state.strength : null, flags: flagsPayload() });
  }

  // ---------------------------------------------------------------------------------------------
  // Ranking

  function renderRank(body) {
    state = { ranking: [], flags: item.responses.map(() => new Set()) };
    const cards = item.responses.map((text, pos) => {
      const card = responseCard(text, pos, el("span", { class: "rank-badge", "data-badge": pos }));
      card.append(flagBoxes(pos));
      card.addEventListener("click", (e) => { if (!e.target.closest(".flags")) pick(pos); });
      return card;
    });
    body.append(
      el("div", { class: "rank-list" }, ...cards),
      el("div", { class: "decision card" },
        el("div", { class: "decision-row" },
          el("div", { class: "ranking-summary", id: "ranking-summary" }),
          el("div", { class: "actions" },
            el("button", { type: "button", class: "ghost", onclick: undoPick }, "Undo ", kbd("Backspace")),
            el("button", { type: "button", id: "submit", class: "primary", onclick: submitRank, disabled: true },
              "Submit ", kbd("Enter"))))));
    paintRank();
  }

  function pick(pos) {
    if (pos >= item.responses.length || state.ranking.includes(pos)) return;
    state.ranking.push(pos);
    paintRank();
  }

  function undoPick() {
    state.ranking.pop();
    paintRank();
  }

  function paintRank() {
    document.querySelectorAll(".rank-list .response").forEach((card) => {
      const pos = Number(card.dataset.pos);
      const rank = state.ranking.indexOf(pos);
      card.classList.toggle("ranked", rank >= 0);
      card.querySelector("[data-badge]").textContent = rank >= 0 ? `Rank ${rank + 1}` : "";
    });
    const summary = $("ranking-summary");
    summary.replaceChildren(state.ranking.length
      ? el("span", {}, el("span", { class: "muted", text: "Ranking: " }), state.ranking.map((p) => LETTERS[p]).join(" > "))
      : el("span", { class: "muted", text: "Click or press the number of the best response first." }));
    $("submit").disabled = state.ranking.length !== item.responses.length;
  }

  function submitRank() {
    if (state.ranking.length !== item.responses.length) return setMessage("Rank every response first.", true);
    submit({ ranking: state.ranking, flags: flagsPayload() });
  }

  // ---------------------------------------------------------------------------------------------
  // Demonstrations

  function renderDemo(body) {
    state = {};
    const draft = item.responses.length ? item.responses[0] : "";
    const area = el("textarea", { id: "demo-text", class: "demo-text", rows: 10, spellcheck: "true",
      placeholder: "Write the ideal response…", oninput: paintCount });
    area.value = draft;
    body.append(el("div", { class: "card demo" },
      el("div", { class: "section-label", text: draft ? "Edit the draft into the ideal response" : "Your response" }),
      area,
      el("div", { class: "decision-row" },
        el("span", { id: "char-count", class: "muted" }),
        el("button", { type: "button", id: "submit", class: "primary", onclick: submitDemo }, "Submit ", kbd("Ctrl + Enter")))));
    paintCount();
    area.focus();
  }

  function paintCount() {
    const n = $("demo-text").value.length;
    const count = $("char-count");
    count.textContent = `${n.toLocaleString()} / ${me.max_text_chars.toLocaleString()} characters`;
    count.classList.toggle("over", n > me.max_text_chars);
  }

  function submitDemo() {
    submit({ text: $("demo-text").value });
  }

  // ---------------------------------------------------------------------------------------------
  // Submitting

  async function submit(fields) {
    if (busy) return;
    busy = true;
    setMessage("");
    try {
      await api("POST", "/api/labels", { assignment_id: item.assignment_id, ...fields });
      toast("Saved");
      await loadNext();
    } catch (e) {
      setMessage(e.message, true);
    } finally {
      busy = false;
    }
  }

  function setMessage(text, isError) {
    const box = $("message");
    box.textContent = text;
    box.classList.toggle("error", Boolean(isError));
  }

  let toastTimer = null;
  function toast(text) {
    const t = $("toast");
    t.textContent = text;
    t.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { t.hidden = true; }, 900);
  }

  // ---------------------------------------------------------------------------------------------
  // Keyboard

  function onKey(e) {
    if (!item || $("task-view").hidden || e.altKey) return;
    const typing = e.target.closest("input:not([type=checkbox]), textarea, select");  // flag boxes keep the shortcuts
    if (item.kind === "demo") {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); submitDemo(); }
      return;
    }
    if (typing || e.ctrlKey || e.metaKey) return;
    const key = e.key.toLowerCase();
    if (item.kind === "pair") {
      const actions = { 1: () => choose("left"), 2: () => choose("right"), t: () => choose("tie"), b: () => choose("both_bad"),
        m: () => { if (state.choice === "left" || state.choice === "right") setStrength(state.strength === "much" ? "slightly" : "much"); },
        enter: submitPair };
      if (actions[key]) { e.preventDefault(); actions[key](); }
    } else if (item.kind === "rank") {
      if (/^[1-9]$/.test(key)) { e.preventDefault(); pick(Number(key) - 1); }
      else if (key === "backspace") { e.preventDefault(); undoPick(); }
      else if (key === "enter") { e.preventDefault(); submitRank(); }
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", onLoginSubmit);
    $("toggle-token").addEventListener("click", toggleToken);
    $("logout").addEventListener("click", logout);
    $("check-again").addEventListener("click", loadNext);
    document.addEventListener("keydown", onKey);
    start().catch((e) => setMessage(e.message, true));
  });
})();
