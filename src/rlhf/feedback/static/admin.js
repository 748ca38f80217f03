// The admin page: progress, agreement per annotator, gold accuracy, position bias. Everything as text.
"use strict";

(() => {
  const { el, api, fmt } = rlhf;
  const $ = (id) => document.getElementById(id);

  function table(id, head, rows, rowClass) {
    $(id).replaceChildren(
      el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { text: h })))),
      el("tbody", {}, ...rows.map((cells, i) => el("tr", { class: rowClass ? rowClass(i) : null },
        ...cells.map((c) => el("td", { text: fmt(c) }))))));
  }

  function tile(label, value) {
    return el("div", { class: "card tile" }, el("div", { class: "value", text: fmt(value) }), el("div", { class: "label", text: label }));
  }

  function percent(x) {
    return x === null || x === undefined ? null : `${(100 * x).toFixed(1)}%`;
  }

  function render(s) {
    $("tiles").replaceChildren(
      tile("labels", s.labels),
      tile("annotators", Object.keys(s.annotators).length),
      tile("Krippendorff's alpha", s.alpha),
      tile("overlap units", s.overlap_units),
      tile("left wins (position bias)", percent(s.position_bias.left_share)));
    const kinds = Object.entries(s.progress);
    table("progress-table", ["task", "items", "labels wanted", "labels", "done"],
      kinds.map(([kind, p]) => [kind, p.items, kind === "gold" ? null : p.wanted, p.labels,
        kind === "gold" || !p.wanted ? null : percent(Math.min(1, p.labels / p.wanted))]));
    const names = Object.keys(s.annotators);
    table("annotator-table", ["annotator", "labels", "median s / item", "majority", "kappa", "gold", "gold n", "left"],
      names.map((n) => {
        const a = s.annotators[n];
        return [n + (a.flagged ? "  (flagged)" : ""), a.labels, a.median_seconds, percent(a.agreement_with_majority),
          a.mean_kappa, percent(a.gold_accuracy), a.gold_n, percent(a.left_share)];
      }),
      (i) => (s.annotators[names[i]].flagged ? "flagged" : null));
    const pairs = Object.entries(s.kappa);
    table("kappa-table", ["annotators", "kappa", "shared items"],
      pairs.length ? pairs.map(([pair, k]) => [pair.replace("|", " · "), k.kappa, k.n]) : [["no two annotators yet", null, null]]);
  }

  async function load() {
    $("error").textContent = "";
    try {
      const me = await api("GET", "/api/me");
      rlhf.setCsrf(me.csrf);
      render(await api("GET", "/api/admin/stats"));
    } catch (e) {
      $("error").textContent = e.message;
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("refresh").addEventListener("click", load);
    load();
  });
})();
