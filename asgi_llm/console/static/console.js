// asgi-llm console: small hand-written script, no dependencies, no inline code (CSP).
// Every call goes to <console>/api/..., which the gateway replays into its own admin
// API and /v1 pipeline as the signed-in admin (same authorization, audited).
"use strict";
(function () {
  const body = document.body;
  const BASE = body.dataset.base;
  const SUPER = body.dataset.super === "true";
  const CSRF = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  const $ = (sel, root) => (root || document).querySelector(sel);

  function viewOrg() {
    const p = $("#org-picker");
    return p ? p.value : "";
  }
  function withOrg(path, org) {
    const o = org === undefined ? viewOrg() : org;
    if (!SUPER || !o) return path;
    return path + (path.includes("?") ? "&" : "?") + "org=" + encodeURIComponent(o);
  }
  function showError(msg) {
    const el = $("#page-error");
    if (!el) return;
    el.textContent = msg || "";
    el.hidden = !msg;
  }
  async function api(method, path, data) {
    const opts = { method: method, headers: { "accept": "application/json" }, credentials: "same-origin" };
    if (method !== "GET") opts.headers["x-csrf-token"] = CSRF;
    if (data !== undefined) {
      opts.headers["content-type"] = "application/json";
      opts.body = JSON.stringify(data);
    }
    const res = await fetch(BASE + "/api" + path, opts);
    if (res.status === 401) { window.location.href = BASE + "/signin"; throw new Error("signed out"); }
    let json = null;
    try { json = await res.json(); } catch (e) { json = null; }
    if (!res.ok) {
      const msg = json && json.error ? json.error.message : "HTTP " + res.status;
      const err = new Error(msg);
      err.status = res.status;
      throw err;
    }
    return json;
  }
  function cell(tr, text) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "" : String(text);
    tr.appendChild(td);
    return td;
  }
  function fillTable(sel, rows, cols) {
    const tbody = $(sel + " tbody");
    tbody.replaceChildren();
    $(sel).dataset.loaded = "true";  // filled at least once (tests and scripts wait for it)
    for (const r of rows) {
      const tr = document.createElement("tr");
      for (const c of cols) cell(tr, typeof c === "function" ? c(r) : r[c]);
      tbody.appendChild(tr);
    }
    return tbody;
  }
  function button(label, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.addEventListener("click", onClick);
    return b;
  }
  function fmtTime(t) {
    if (!t) return "";
    const d = typeof t === "number" ? new Date(t * 1000) : new Date(t);
    return isNaN(d) ? String(t) : d.toISOString().replace("T", " ").slice(0, 19);
  }
  function every(ms, fn) {
    let busy = false;
    const tick = async () => {
      if (busy) return;
      busy = true;
      try { await fn(); showError(""); } catch (e) { if (e.message !== "signed out") showError(e.message); }
      busy = false;
    };
    tick();
    return setInterval(tick, ms);
  }
  async function publicModels(org) {
    const o = org === undefined ? (SUPER ? (viewOrg() || firstOrg()) : "") : org;
    if (SUPER && !o) return [];
    const res = await api("GET", withOrg("/v1/models", o));
    return (res.data || []).map((m) => m.id);
  }
  function firstOrg() {
    const p = $("#org-picker");
    return p && p.options.length > 1 ? p.options[1].value : "";
  }
  async function explain(model, org, message) {
    return api("POST", withOrg("/admin/explain", org), { model: model, messages: [{ role: "user", content: message || "Hello" }] });
  }

  // ------------------------------------------------------------------ sign out / picker
  const signout = $("#signout");
  if (signout) signout.addEventListener("click", async () => {
    await fetch(BASE + "/signout", { method: "POST", headers: { "x-csrf-token": CSRF }, credentials: "same-origin" });
    window.location.href = BASE + "/signin";
  });
  const picker = $("#org-picker");
  if (picker) {
    picker.value = sessionStorage.getItem("asgi-llm-org") || "";
    if (picker.value === "" && sessionStorage.getItem("asgi-llm-org")) picker.value = "";
    picker.addEventListener("change", () => { sessionStorage.setItem("asgi-llm-org", picker.value); window.location.reload(); });
  }

  const pages = {};

  // ------------------------------------------------------------------ overview
  pages.overview = () => {
    every(5000, async () => {
      const usage = await api("GET", withOrg("/admin/usage?group_by=model&since=1d"));
      const rows = usage.data || [];
      let req = 0, err = 0, cost = 0;
      for (const r of rows) { req += r.requests || 0; err += r.errors || 0; cost += parseFloat(r.cost_usd || "0"); }
      $("#ov-requests").textContent = String(req);
      $("#ov-errors").textContent = String(err);
      $("#ov-spend").textContent = "$" + cost.toFixed(6);
      rows.sort((a, b) => (b.requests || 0) - (a.requests || 0));
      fillTable("#ov-models", rows.slice(0, 10), ["model", "requests", (r) => (r.prompt_tokens || 0) + (r.completion_tokens || 0), "cost_usd"]);
      const nodes = await api("GET", withOrg("/admin/nodes"));
      fillTable("#ov-nodes", nodes.data || [], ["name", "org", "status", (n) => (n.models || []).map((m) => m.id || m.name || m).join(", ")]);
      await targets("#ov-targets", false);
    });
  };

  async function targets(sel, withPrice) {
    const models = await publicModels();
    const rows = [];
    for (const m of models.slice(0, 50)) {
      let plan;
      try { plan = await explain(m, SUPER ? (viewOrg() || firstOrg()) : undefined); } catch (e) { continue; }
      for (const t of plan.targets || []) rows.push({ model: m, ...t });
    }
    const health = (t) => t.health ? (typeof t.health === "object" ? (t.health.state || JSON.stringify(t.health)) : t.health) : "";
    const latency = (t) => t.latency_ewma_s ? (t.latency_ewma_s * 1000).toFixed(0) + " ms" : "";
    const price = (t) => t.price_per_1m ? "$" + t.price_per_1m.input + " / $" + t.price_per_1m.output : "";
    fillTable(sel, rows, withPrice ? ["model", "route", price, health, latency, "in_flight"] : ["model", "route", health, latency, "in_flight"]);
  }

  // ------------------------------------------------------------------ playground
  pages.playground = async () => {
    const cols = $("#pg-columns");
    const tpl = $("#pg-column");
    let models = [];
    try { models = await publicModels(); } catch (e) { showError(e.message); }
    if (SUPER && !viewOrg() && !firstOrg()) showError("Pick the org the playground runs as (Viewing org).");
    function addColumn() {
      const n = cols.children.length;
      if (n >= 3) return;
      const node = tpl.content.firstElementChild.cloneNode(true);
      const sel = $(".pg-model", node);
      const label = $("label", node);
      sel.id = "pg-model-" + n;
      label.htmlFor = sel.id;
      label.textContent = n === 0 ? "Model" : "Model " + (n + 1);
      for (const m of models) {
        const o = document.createElement("option");
        o.value = m; o.textContent = m;
        sel.appendChild(o);
      }
      if (models.length > n) sel.selectedIndex = n;
      cols.appendChild(node);
      $("#pg-add").disabled = cols.children.length >= 3;
    }
    addColumn();
    $("#pg-add").addEventListener("click", addColumn);
    $("#pg-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const message = $("#pg-message").value;
      for (const col of cols.children) run(col, message);
    });
  };

  async function run(col, message) {
    const model = $(".pg-model", col).value;
    const out = $(".answer", col);
    out.textContent = "";
    for (const k of ["ttft", "latency", "tokens", "cost", "route"]) $(".m-" + k, col).textContent = "…";
    const org = SUPER ? (viewOrg() || firstOrg()) : undefined;
    const payload = { model: model, stream: true, stream_options: { include_usage: true }, messages: [{ role: "user", content: message }] };
    const t0 = performance.now();
    let ttft = null, usage = null;
    try {
      const res = await fetch(BASE + "/api" + withOrg("/v1/chat/completions", org), {
        method: "POST", credentials: "same-origin",
        headers: { "content-type": "application/json", "accept": "text/event-stream", "x-csrf-token": CSRF },
        body: JSON.stringify(payload),
      });
      const route = res.headers.get("x-asgi-llm-route") || "";
      $(".m-route", col).textContent = route || "–";
      if (!res.ok) {
        let msg = "HTTP " + res.status;
        try { const j = await res.json(); msg = j.error.message; } catch (e) { /* keep status */ }
        throw new Error(msg);
      }
      const reader = res.body.getReader();
      const dec = new TextDecoder();
      let buf = "", done = false;
      for (let i = 0; i < 1000000 && !done; i++) {
        const chunk = await reader.read();
        if (chunk.done) break;
        buf += dec.decode(chunk.value, { stream: true });
        let idx;
        while ((idx = buf.indexOf("\n\n")) >= 0) {
          const event = buf.slice(0, idx); buf = buf.slice(idx + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") { done = true; continue; }
            let j; try { j = JSON.parse(data); } catch (e) { continue; }
            if (j.error) throw new Error(j.error.message || "stream error");
            if (j.usage) usage = j.usage;
            const delta = j.choices && j.choices[0] && j.choices[0].delta;
            if (delta && delta.content) {
              if (ttft === null) { ttft = performance.now() - t0; $(".m-ttft", col).textContent = ttft.toFixed(0) + " ms"; }
              out.textContent += delta.content;
            }
          }
        }
      }
      if (!done) throw new Error("the stream ended before [DONE]: the answer is incomplete");
      const latency = performance.now() - t0;
      $(".m-latency", col).textContent = latency.toFixed(0) + " ms";
      if (ttft === null) $(".m-ttft", col).textContent = latency.toFixed(0) + " ms";
      const tokens = usage ? usage.total_tokens || ((usage.prompt_tokens || 0) + (usage.completion_tokens || 0)) : 0;
      $(".m-tokens", col).textContent = usage ? tokens + " (" + (usage.prompt_tokens || 0) + " in, " + (usage.completion_tokens || 0) + " out)" : "unknown";
      $(".m-cost", col).textContent = await costOf(model, org, route, usage, message);
    } catch (e) {
      const err = document.createElement("p");
      err.setAttribute("role", "alert");
      err.textContent = e.message;
      out.appendChild(err);
      for (const k of ["ttft", "latency", "tokens", "cost"]) if ($(".m-" + k, col).textContent === "…") $(".m-" + k, col).textContent = "–";
    }
  }

  async function costOf(model, org, route, usage, message) {
    if (!usage) return "unknown";
    try {
      const plan = await explain(model, org, message);
      const t = (plan.targets || []).find((x) => x.route === route);
      if (!t || !t.price_per_1m) return "$0 (no price)";
      const c = ((usage.prompt_tokens || 0) * parseFloat(t.price_per_1m.input) + (usage.completion_tokens || 0) * parseFloat(t.price_per_1m.output)) / 1e6;
      return "$" + c.toFixed(8);
    } catch (e) { return "unknown"; }
  }

  // ------------------------------------------------------------------ keys
  pages.keys = () => {
    const load = async () => {
      const res = await api("GET", withOrg("/admin/keys"));
      const tbody = fillTable("#key-table", res.data || [], ["name", "org", "prefix", (k) => (k.scopes || []).join(", "),
        (k) => k.models ? k.models.join(", ") : "all", (k) => fmtTime(k.created_at), (k) => k.revoked_at ? "revoked" : (k.prefix ? "active" : "recipe")]);
      (res.data || []).forEach((k, i) => {
        const td = cell(tbody.children[i], "");
        if (k.prefix && !k.revoked_at) td.appendChild(button("Revoke", async () => {
          if (!window.confirm("Revoke key " + (k.name || k.id) + "? Clients using it get 401 at once.")) return;
          try { await api("DELETE", "/admin/keys/" + encodeURIComponent(k.id)); await load(); } catch (e) { showError(e.message); }
        }));
      });
    };
    $("#key-new").addEventListener("click", () => { $("#key-form").hidden = false; $("#key-name").focus(); });
    $("#key-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const data = { name: $("#key-name").value.trim() };
      const org = $("#key-org");
      if (org) data.org = org.value.trim();
      const models = $("#key-models").value.split(",").map((s) => s.trim()).filter(Boolean);
      if (models.length) data.models = models;
      const rpm = $("#key-rpm").value;
      if (rpm) data.limits = { rpm: parseInt(rpm, 10) };
      const days = $("#key-expiry").value;
      if (days) data.expires_at = Date.now() / 1000 + parseInt(days, 10) * 86400;
      try {
        const res = await api("POST", "/admin/keys", data);
        $("#key-secret-value").textContent = res.key;
        $("#key-secret").hidden = false;
        $("#key-form").hidden = true;
        $("#key-form").reset();
        showError("");
        await load();
      } catch (e) { showError(e.message); }
    });
    $("#key-copy").addEventListener("click", async () => {
      try { await navigator.clipboard.writeText($("#key-secret-value").textContent); $("#key-copy").textContent = "Copied"; }
      catch (e) { showError("Copy failed: select the key and copy it by hand."); }
    });
    load().catch((e) => showError(e.message));
  };

  // ------------------------------------------------------------------ nodes
  pages.nodes = () => {
    const gw = body.dataset.gateway;
    const load = async () => {
      const res = await api("GET", withOrg("/admin/nodes"));
      const nodes = res.data || [];
      const tbody = fillTable("#node-table", nodes, ["name", "org", "status", "state",
        (n) => (n.models || []).map((m) => m.id || m.name || m).join(", "),
        (n) => n.load ? Object.entries(n.load).map(([k, v]) => k + "=" + v).join(" ") : "",
        (n) => n.price ? "$" + n.price.input + " / $" + n.price.output : "",
        (n) => (n.shared_with || []).join(", "),
        (n) => n.availability ? (n.availability.mode === "windows" ? (n.availability.windows || []).join(", ") : n.availability.mode) : ""]);
      nodes.forEach((n, i) => {
        const td = cell(tbody.children[i], "");
        if (n.revoked_at) return;
        for (const [label, action] of [["Cordon", "cordon"], ["Uncordon", "uncordon"], ["Drain", "drain"], ["Pause", "pause"], ["Resume", "resume"], ["Revoke", "revoke"]]) {
          td.appendChild(button(label, async () => {
            if (action === "revoke" && !window.confirm("Revoke node " + n.name + "? Its agent is cut off.")) return;
            try { await api("POST", "/admin/nodes/" + encodeURIComponent(n.id) + "/" + action, {}); await load(); }
            catch (e) { showError(e.message); }
          }));
        }
      });
      try {
        const c = await api("GET", withOrg("/admin/usage?group_by=node&since=30d"));
        fillTable("#node-contrib", (c.data || []).filter((r) => r.node), ["node", "requests", (r) => (r.prompt_tokens || 0) + (r.completion_tokens || 0), "cost_usd"]);
      } catch (e) { /* no ledger: no contribution report */ }
    };
    $("#node-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const data = {};
      const org = $("#node-org");
      if (org) data.org = org.value.trim();
      try {
        const res = await api("POST", "/admin/enrollment-tokens", data);
        $("#node-token").textContent = res.token;
        $("#node-expires").textContent = fmtTime(res.expires_at);
        $("#node-command").textContent = "asgi-llm node join --gateway " + gw + " --token " + res.token + " --engine http://127.0.0.1:8080/v1 --name my-node";
        // The agent image from the repository's recipes/node/Dockerfile (asgi-llm is not on a package index).
        $("#node-container").textContent = "docker run -d --network host -v asgi-llm-node:/state -e ASGI_LLM_GATEWAY=" + gw + " -e ASGI_LLM_ENROLLMENT_TOKEN=" + res.token + " -e ASGI_LLM_ENGINE=http://127.0.0.1:8080/v1 asgi-llm-node --name my-node   # image: docker build -f recipes/node/Dockerfile -t asgi-llm-node .";
        $("#node-unit").textContent = "ASGI_LLM_ENROLLMENT_TOKEN=" + res.token + " asgi-llm node install-service --gateway " + gw + " --engine http://127.0.0.1:8080/v1 --tunnel";
        $("#node-enroll").hidden = false;
        showError("");
      } catch (e) { showError(e.message); }
    });
    every(2000, load);
  };

  // ------------------------------------------------------------------ usage
  const SVGNS = "http://www.w3.org/2000/svg";
  function barChart(el, points, fmt) {
    const w = 360, h = 160, pad = 24;
    const svg = document.createElementNS(SVGNS, "svg");
    svg.setAttribute("viewBox", "0 0 " + w + " " + h);
    svg.setAttribute("role", "img");
    svg.setAttribute("width", String(w));
    svg.setAttribute("height", String(h));
    const max = Math.max(1e-12, ...points.map((p) => p.value));
    const bw = points.length ? (w - pad) / points.length : 0;
    points.forEach((p, i) => {
      const bh = (p.value / max) * (h - pad - 8);
      const r = document.createElementNS(SVGNS, "rect");
      r.setAttribute("x", String(pad + i * bw + 2));
      r.setAttribute("y", String(h - pad - bh));
      r.setAttribute("width", String(Math.max(1, bw - 4)));
      r.setAttribute("height", String(bh));
      r.setAttribute("class", "bar");
      const title = document.createElementNS(SVGNS, "title");
      title.textContent = p.label + ": " + fmt(p.value);
      r.appendChild(title);
      svg.appendChild(r);
      const t = document.createElementNS(SVGNS, "text");
      t.setAttribute("x", String(pad + i * bw + bw / 2));
      t.setAttribute("y", String(h - 8));
      t.setAttribute("text-anchor", "middle");
      t.setAttribute("class", "axis");
      t.textContent = p.label.slice(5);
      svg.appendChild(t);
    });
    const top = document.createElementNS(SVGNS, "text");
    top.setAttribute("x", "2"); top.setAttribute("y", "12"); top.setAttribute("class", "axis");
    top.textContent = fmt(max);
    svg.appendChild(top);
    el.replaceChildren(svg);
  }
  pages.usage = () => {
    const load = async () => {
      const group = $("#usage-group").value, since = $("#usage-since").value;
      const q = "?group_by=" + encodeURIComponent(group) + "&since=" + encodeURIComponent(since);
      $("#usage-csv").href = BASE + "/api" + withOrg("/admin/usage" + q + "&format=csv");
      const res = await api("GET", withOrg("/admin/usage" + q));
      const rows = res.data || [];
      const cols = rows.length ? Object.keys(rows[0]) : group.split(",").concat(["requests", "cost_usd"]);
      const thead = $("#usage-table thead");
      const hr = document.createElement("tr");
      for (const c of cols) { const th = document.createElement("th"); th.textContent = c; hr.appendChild(th); }
      thead.replaceChildren(hr);
      fillTable("#usage-table", rows, cols);
      const days = (await api("GET", withOrg("/admin/usage?group_by=day&since=" + encodeURIComponent(since)))).data || [];
      days.sort((a, b) => String(a.day).localeCompare(String(b.day)));
      const pts = (f) => days.map((d) => ({ label: String(d.day || ""), value: f(d) }));
      barChart($("#chart-requests"), pts((d) => d.requests || 0), (v) => String(Math.round(v)));
      barChart($("#chart-tokens"), pts((d) => (d.prompt_tokens || 0) + (d.completion_tokens || 0)), (v) => String(Math.round(v)));
      barChart($("#chart-cost"), pts((d) => parseFloat(d.cost_usd || "0")), (v) => "$" + v.toFixed(6));
      try {
        const cmp = await api("GET", withOrg("/admin/usage/compare?since=" + encodeURIComponent(since)));
        fillTable("#usage-compare", cmp.data || [], [(r) => String(r.prompt_hash || "").slice(0, 12), "route", "requests", "cost_per_request_usd", (r) => r.avg_latency_ms === undefined ? "" : r.avg_latency_ms + " ms"]);
      } catch (e) { /* comparison needs prompt hashes */ }
    };
    $("#usage-group").addEventListener("change", () => load().catch((e) => showError(e.message)));
    $("#usage-since").addEventListener("change", () => load().catch((e) => showError(e.message)));
    load().catch((e) => showError(e.message));
  };

  // ------------------------------------------------------------------ routing
  pages.routing = () => {
    targets("#route-table", true).catch((e) => showError(e.message));
    $("#explain-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      try {
        const plan = await explain($("#explain-model").value.trim(), SUPER ? (viewOrg() || firstOrg()) : undefined, $("#explain-message").value);
        $("#explain-out").textContent = JSON.stringify(plan, null, 2);
        showError("");
      } catch (e) { showError(e.message); }
    });
  };

  // ------------------------------------------------------------------ audit
  pages.audit = () => {
    const load = async () => {
      const p = new URLSearchParams({ limit: "200" });
      if ($("#audit-kind").value) p.set("kind", $("#audit-kind").value);
      if ($("#audit-verdict").value) p.set("verdict", $("#audit-verdict").value);
      if ($("#audit-actor").value.trim()) p.set("actor", $("#audit-actor").value.trim());
      const res = await api("GET", withOrg("/admin/audit?" + p.toString()));
      const rows = (res.data || []).slice().reverse();
      fillTable("#audit-table", rows, ["seq", (e) => fmtTime(e.ts), "kind", "org", "actor", "action", "target", "verdict", "status"]);
    };
    $("#audit-form").addEventListener("submit", (ev) => { ev.preventDefault(); load().catch((e) => showError(e.message)); });
    $("#audit-verify").addEventListener("click", async () => {
      const out = $("#audit-result");
      try {
        const v = await api("GET", "/admin/audit/verify");
        out.textContent = v.ok ? "Chain intact: " + v.events + " events, head #" + v.head_seq + " " + v.head_hash
          : "Chain broken at seq " + v.first_break.seq + ": " + v.first_break.reason;
        showError("");
      } catch (e) { out.textContent = ""; showError(e.message); }
    });
    load().catch((e) => showError(e.message));
  };

  const start = pages[body.dataset.page];
  if (start) start();
})();
