// The page for people: sign in with a study code, label pairs, ask questions, compare answers blind.
// Plain browser JavaScript, no build step and nothing fetched from elsewhere. All text from the API is
// put on the page with textContent, never parsed as HTML. URLs are relative, so the page also works
// when the app is mounted under a path prefix.
"use strict";

(() => {
  const KEY_STORE = "fspo.apiKey";      // sessionStorage: the key lives as long as the tab
  const VIEW_STORE = "fspo.view";
  const PREFS_PAGE = 20;

  const $ = (id) => document.getElementById(id);
  const state = {
    queue: [],          // pairs still to label
    total: 0,           // pairs to label in all
    labeled: 0,
    prefsBefore: null,  // the id the next page of "your preferences" starts below
    trialId: null,      // the trial on the page, null when none
    voting: false,      // a vote is on its way
    shown: false,       // a view has been shown since the page loaded
  };

  // ---- talking to the API -------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function authHeaders(extra) {
    const headers = Object.assign({ Accept: "application/json" }, extra || {});
    const key = sessionStorage.getItem(KEY_STORE);
    if (key) headers.Authorization = "Bearer " + key;
    return headers;
  }

  // The error's message as the API words it (every error is OpenAI-shaped: {"error": {"message"}}); the
  // status line when the body is not the API's (a proxy's error page).
  async function errorOf(resp) {
    let message = "The server answered " + resp.status + (resp.statusText ? " " + resp.statusText : "") + ".";
    try {
      const body = await resp.json();
      if (body && body.error && typeof body.error.message === "string") message = body.error.message;
    } catch (_) {
      // not JSON: keep the status line
    }
    return new ApiError(resp.status, message);
  }

  async function send(method, path, body) {
    const init = { method, headers: authHeaders(body === undefined ? {} : { "Content-Type": "application/json" }) };
    if (body !== undefined) init.body = JSON.stringify(body);
    try {
      return await fetch(path, init);
    } catch (_) {
      throw new ApiError(0, "The server could not be reached. Check the connection and try again.");
    }
  }

  async function api(method, path, body) {
    const resp = await send(method, path, body);
    if (!resp.ok) throw await errorOf(resp);
    const text = await resp.text();
    return text ? JSON.parse(text) : null;
  }

  // ---- status, errors, views -----------------------------------------------------------------

  function setStatus(text) {
    $("status").textContent = text || "";
  }

  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  function showError(err) {
    const message = err && err.message ? err.message : String(err);
    $("error").textContent = message;
    $("error").hidden = false;
    setStatus("");
    if (err instanceof ApiError && err.status === 401) signOut("Your key is not valid any more. Sign in again.");
  }

  // Runs an action, showing what went wrong in the page instead of leaving it blank or half-done.
  async function guarded(action) {
    clearError();
    try {
      await action();
    } catch (err) {
      showError(err);
    }
  }

  const VIEWS = ["signin", "label", "ask", "study"];

  // Moving focus to a view's heading when it opens tells keyboard and screen-reader users where they are.
  function show(view) {
    const changed = $("view-" + view).hidden;
    for (const v of VIEWS) $("view-" + v).hidden = v !== view;
    if (changed && state.shown) {  // not when the page first loads: focus starts at the top
      const heading = $("view-" + view).querySelector("h2");
      heading.tabIndex = -1;
      heading.focus();
    }
    $("nav").hidden = view === "signin";
    for (const tab of document.querySelectorAll("#nav .tab")) {
      if (tab.dataset.view === view) tab.setAttribute("aria-current", "step");
      else tab.removeAttribute("aria-current");
    }
    if (view !== "signin") sessionStorage.setItem(VIEW_STORE, view);
    state.shown = true;
  }

  function go(view) {
    clearError();
    setStatus("");
    if (view === "label") return guarded(startLabeling);
    if (view === "ask") return guarded(startAsking);
    if (view === "study") return guarded(startStudy);
    show("signin");
  }

  // ---- sign in -------------------------------------------------------------------------------

  function signIn(key) {
    sessionStorage.setItem(KEY_STORE, key);
    go("label");
  }

  function signOut(message) {
    sessionStorage.removeItem(KEY_STORE);
    sessionStorage.removeItem(VIEW_STORE);
    show("signin");
    setStatus(message || "Signed out.");
  }

  async function join(event) {
    event.preventDefault();
    const button = event.submitter || event.target.querySelector("button");
    button.disabled = true;
    await guarded(async () => {
      setStatus("Joining…");
      const code = $("join-code").value.trim();
      const joined = await api("POST", "v1/study/join", { code });
      $("join-code").value = "";
      signIn(joined.api_key);
    });
    button.disabled = false;
  }

  function useKey(event) {
    event.preventDefault();
    const key = $("key-input").value.trim();
    $("key-input").value = "";
    if (key) signIn(key);
  }

  // ---- labeling pairs ------------------------------------------------------------------------

  // A pair is labeled when one of the user's preferences has its question and its two answers, in
  // either order: so a reload resumes where the person stopped, and a label is never asked twice.
  const pairKey = (question, x, y) => JSON.stringify([question, ...[x, y].sort()]);

  async function labeledKeys() {
    const keys = new Set();
    let before = null;
    for (let page = 0; page < 20; page++) {
      const query = "?limit=100" + (before === null ? "" : "&before=" + before);
      const prefs = (await api("GET", "v1/users/me/preferences" + query)).data;
      for (const p of prefs) keys.add(pairKey(p.question, p.chosen, p.rejected));
      if (prefs.length < 100) break;
      before = prefs[prefs.length - 1].id;
    }
    return keys;
  }

  async function startLabeling() {
    show("label");
    $("label-pair").hidden = true;
    $("label-done").hidden = true;
    setStatus("Loading the pairs to label…");
    let pairs;
    try {
      pairs = await api("GET", "v1/study/pairs");
    } catch (err) {
      // 404: no study on this server; 403: a key of a user who did not join it. Nothing to label.
      if (!(err instanceof ApiError) || (err.status !== 404 && err.status !== 403)) throw err;
      pairs = [];
    }
    const done = await labeledKeys();
    state.total = pairs.length;
    state.queue = pairs.filter((p) => !done.has(pairKey(p.question, p.a, p.b)));
    state.labeled = state.total - state.queue.length;
    setStatus("");
    renderPair();
  }

  function renderProgress() {
    const bar = $("label-bar");
    bar.max = Math.max(state.total, 1);
    bar.value = state.labeled;
    $("label-progress").textContent = state.total
      ? "Labeled " + state.labeled + " of " + state.total + " pairs."
      : "There are no pairs to label.";
  }

  function renderPair() {
    renderProgress();
    const pair = state.queue[0];
    if (!pair) {
      $("label-pair").hidden = true;
      $("label-done-text").textContent = state.total
        ? "All pairs are labeled: answers now take your preferences into account."
        : "This server has no pairs to label: ask away.";
      $("label-done").hidden = false;
      return;
    }
    $("label-done").hidden = true;
    $("label-pair").hidden = false;
    $("label-question").textContent = pair.question;
    for (const [id, text] of [["label-a", pair.a], ["label-b", pair.b]]) {
      const button = $(id);
      button.textContent = text;
      button.disabled = false;
    }
  }

  async function label(side) {
    const pair = state.queue[0];
    if (!pair || $("label-a").disabled) return;
    $("label-a").disabled = true;
    $("label-b").disabled = true;
    const [chosen, rejected] = side === "a" ? [pair.a, pair.b] : [pair.b, pair.a];
    await guarded(async () => {
      await api("POST", "v1/users/me/preferences", { question: pair.question, chosen, rejected });
      state.queue.shift();
      state.labeled += 1;
      setStatus("Saved. " + state.queue.length + " left.");
    });
    renderPair();
    // The clicked button was disabled, which drops keyboard focus: give it to what comes next.
    ($("label-done").hidden ? $("label-a") : $("label-done").querySelector("button")).focus();
  }

  // ---- asking --------------------------------------------------------------------------------

  async function startAsking() {
    show("ask");
    await loadPrefs(true);
  }

  // Server-sent events, as the OpenAI streaming format sends them: `data:` lines, a blank line ends
  // an event, `data: [DONE]` ends the stream. Lines may end in \n, \r\n or \r, and a chunk may stop
  // anywhere, even between the \r and \n of one line end.
  function sseParser(onData) {
    let buffer = "";
    let data = [];
    return (chunk, end) => {
      buffer += chunk;
      const holdCR = !end && buffer.endsWith("\r");
      if (holdCR) buffer = buffer.slice(0, -1);
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = end ? "" : lines.pop() + (holdCR ? "\r" : "");
      if (end) lines.push("");
      for (const line of lines) {
        if (line === "") {
          if (data.length) onData(data.join("\n"));
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        }
        // other fields (event:, id:, retry:) and comments (":") carry nothing here
      }
    };
  }

  function describeAnswer(info, usage) {
    const parts = [];
    if (info) {
      const n = Array.isArray(info.preference_ids) ? info.preference_ids.length : info.shots_used;
      if (typeof n === "number") {
        parts.push(n === 0 ? "Not personalized yet: you have no preferences stored."
          : "Personalized from " + n + " of your preferences.");
      }
      if (info.description) parts.push("What the model inferred about you: " + info.description);
    }
    if (usage && usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens) {
      parts.push(usage.prompt_tokens_details.cached_tokens + " prompt tokens reused from the cache.");
    }
    return parts.join(" ");
  }

  async function ask(event) {
    event.preventDefault();
    const question = $("ask-question").value.trim();
    if (!question) {
      showError(new Error("Type a question first."));
      return;
    }
    const submit = $("ask-submit");
    submit.disabled = true;
    $("ask-result").hidden = false;
    $("ask-answer").textContent = "";
    $("ask-meta").textContent = "";
    $("view-ask").setAttribute("aria-busy", "true");
    await guarded(async () => {
      setStatus("Answering…");
      const resp = await send("POST", "v1/chat/completions", {
        messages: [{ role: "user", content: question }],
        stream: true,
        stream_options: { include_usage: true },
      });
      if (!resp.ok) throw await errorOf(resp);
      let info = null;
      let usage = null;
      let failure = null;
      let finished = false;
      const parse = sseParser((data) => {
        if (data === "[DONE]") {
          finished = true;
          return;
        }
        const chunk = JSON.parse(data);
        if (chunk.error) {
          failure = new ApiError(500, chunk.error.message || "The answer failed.");
          return;
        }
        const choice = (chunk.choices || [])[0];
        if (choice && choice.delta && typeof choice.delta.content === "string") {
          $("ask-answer").textContent += choice.delta.content;
        }
        if (chunk.fspo) info = chunk.fspo;
        if (chunk.usage) usage = chunk.usage;
      });
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        parse(value, false);
      }
      parse("", true);
      if (failure) throw failure;
      if (!finished) throw new Error("The answer stopped before it was complete. Try again.");
      $("ask-meta").textContent = describeAnswer(info, usage);
      setStatus("Answered.");
    });
    $("view-ask").removeAttribute("aria-busy");
    submit.disabled = false;
  }

  // ---- your preferences ----------------------------------------------------------------------

  function prefItem(pref) {
    const li = document.createElement("li");
    li.className = "pref";
    const q = document.createElement("p");
    q.className = "pref-question";
    q.textContent = pref.question;
    const chosen = document.createElement("p");
    chosen.className = "pref-chosen";
    chosen.textContent = "Preferred: " + pref.chosen;
    const rejected = document.createElement("p");
    rejected.className = "pref-rejected";
    rejected.textContent = "Over: " + pref.rejected;
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.textContent = "Delete";
    del.setAttribute("aria-label", "Delete the preference on: " + pref.question);
    del.addEventListener("click", () => deletePref(pref, li, del));
    li.append(q, chosen, rejected, del);
    return li;
  }

  async function loadPrefs(reset) {
    const list = $("prefs-list");
    if (reset) {
      list.replaceChildren();
      state.prefsBefore = null;
    }
    const query = "?limit=" + PREFS_PAGE + (state.prefsBefore === null ? "" : "&before=" + state.prefsBefore);
    const prefs = (await api("GET", "v1/users/me/preferences" + query)).data;
    for (const pref of prefs) list.append(prefItem(pref));
    if (prefs.length) state.prefsBefore = prefs[prefs.length - 1].id;
    $("prefs-more").hidden = prefs.length < PREFS_PAGE;
    $("prefs-empty").hidden = list.children.length > 0;
  }

  async function deletePref(pref, li, button) {
    button.disabled = true;
    await guarded(async () => {
      await api("DELETE", "v1/users/me/preferences/" + encodeURIComponent(pref.id));
      li.remove();
      $("prefs-empty").hidden = $("prefs-list").children.length > 0;
      setStatus("Deleted the preference on: " + pref.question);
    });
    button.disabled = false;
  }

  // ---- the blind comparison ------------------------------------------------------------------

  const voteButtons = () => document.querySelectorAll("#trial .vote");

  function setVoting(enabled) {
    for (const b of voteButtons()) b.disabled = !enabled;
  }

  async function startStudy() {
    show("study");
    await nextTrial();
  }

  async function nextTrial() {
    setVoting(false);
    $("view-study").setAttribute("aria-busy", "true");
    setStatus("Preparing the next question: both systems are answering…");
    try {
      const trial = await api("GET", "v1/study/next");
      if (trial.done) {
        state.trialId = null;
        $("trial").hidden = true;
        $("study-done").hidden = false;
        setStatus("The comparison is complete.");
        return;
      }
      state.trialId = trial.trial_id;
      $("trial").dataset.trialId = String(trial.trial_id);
      $("trial-progress").textContent =
        typeof trial.index === "number" && typeof trial.total === "number"
          ? "Question " + trial.index + " of " + trial.total + "."
          : "";
      $("trial-question").textContent = trial.question;
      $("trial-left").textContent = trial.left;
      $("trial-right").textContent = trial.right;
      $("study-done").hidden = true;
      $("trial").hidden = false;
      setStatus("Which answer is better?");
      setVoting(true);
    } finally {
      $("view-study").removeAttribute("aria-busy");
    }
  }

  // The buttons are disabled in the click itself, before any request, so a double click sends one
  // vote; they stay disabled until the next question is on the page.
  function vote(choice) {
    if (state.voting || state.trialId === null) return;
    state.voting = true;
    setVoting(false);
    const trialId = state.trialId;
    guarded(async () => {
      try {
        await api("POST", "v1/study/trials/" + encodeURIComponent(trialId) + "/vote", { choice });
        setStatus("Vote recorded.");
      } catch (err) {
        // 409: this trial already has a vote (say, a reply lost on the way): move on to the next.
        if (!(err instanceof ApiError) || err.status !== 409) {
          setVoting(true);
          throw err;
        }
      }
      await nextTrial();
      if (!$("trial").hidden) $("trial-question").focus();  // the new question, for keyboard users
    }).finally(() => {
      state.voting = false;
    });
  }

  // ---- wiring --------------------------------------------------------------------------------

  function init() {
    $("join-form").addEventListener("submit", join);
    $("key-form").addEventListener("submit", useKey);
    $("signout").addEventListener("click", () => signOut());
    for (const tab of document.querySelectorAll("#nav .tab")) {
      tab.addEventListener("click", () => go(tab.dataset.view));
    }
    for (const button of document.querySelectorAll("[data-goto]")) {
      button.addEventListener("click", () => go(button.dataset.goto));
    }
    $("label-a").addEventListener("click", () => label("a"));
    $("label-b").addEventListener("click", () => label("b"));
    $("ask-form").addEventListener("submit", ask);
    $("prefs-more").addEventListener("click", () => guarded(() => loadPrefs(false)));
    for (const button of voteButtons()) {
      button.addEventListener("click", () => vote(button.dataset.choice));
    }
    if (sessionStorage.getItem(KEY_STORE)) go(sessionStorage.getItem(VIEW_STORE) || "label");
    else show("signin");
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
