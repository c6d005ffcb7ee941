// The page for people: join a study (or come back with a resume code), label pairs, compare answers
// blind; or, signed in with an API key, ask questions and manage one's preferences.
// Plain browser JavaScript, no build step and nothing fetched from elsewhere. All text from the API is
// put on the page with textContent, never parsed as HTML. URLs are relative, so the page also works
// when the app is mounted under a path prefix.
"use strict";

(() => {
  const KEY_STORE = "fspo.apiKey";      // sessionStorage: the key lives as long as the tab
  const VIEW_STORE = "fspo.view";
  // "study" for a participant (their key reaches only the study: no Ask, no list of systems), else "user".
  const MODE_STORE = "fspo.mode";
  const RESUME_STORE = "fspo.resumeCode";  // a participant's resume code, to remind them at sign-out
  const PREFS_PAGE = 20;

  const $ = (id) => document.getElementById(id);
  const participant = () => sessionStorage.getItem(MODE_STORE) === "study";
  const state = {
    pair: null,         // the pair on the page, null when none
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

  const VIEWS = ["signin", "joined", "label", "ask", "study"];

  // Moving focus to a view's heading when it opens tells keyboard and screen-reader users where they are.
  function show(view) {
    const changed = $("view-" + view).hidden;
    for (const v of VIEWS) $("view-" + v).hidden = v !== view;
    if (changed && state.shown) {  // not when the page first loads: focus starts at the top
      const heading = $("view-" + view).querySelector("h2");
      heading.tabIndex = -1;
      heading.focus();
    }
    $("nav").hidden = view === "signin" || view === "joined";
    $("tab-ask").hidden = participant();
    $("tab-study").textContent = participant() ? "2. Compare" : "3. Compare";  // a participant has no Ask
    for (const tab of document.querySelectorAll("#nav .tab")) {
      if (tab.dataset.view === view) tab.setAttribute("aria-current", "step");
      else tab.removeAttribute("aria-current");
    }
    if (view !== "signin" && view !== "joined") sessionStorage.setItem(VIEW_STORE, view);
    state.shown = true;
  }

  function go(view) {
    clearError();
    setStatus("");
    if (view === "label") return guarded(startLabeling);
    if (view === "ask") return guarded(participant() ? startLabeling : startAsking);
    if (view === "study") return guarded(startStudy);
    show("signin");
  }

  // ---- sign in -------------------------------------------------------------------------------

  function signIn(key, mode) {
    sessionStorage.setItem(KEY_STORE, key);
    sessionStorage.setItem(MODE_STORE, mode);
  }

  function signOut(message) {
    const resume = sessionStorage.getItem(RESUME_STORE);
    for (const item of [KEY_STORE, VIEW_STORE, MODE_STORE, RESUME_STORE]) sessionStorage.removeItem(item);
    show("signin");
    const comeBack = resume ? " To come back, enter your resume code " + resume + " under “Come back to the study”." : "";
    setStatus((message || "Signed out.") + comeBack);
  }

  async function join(event) {
    event.preventDefault();
    const button = event.submitter || event.target.querySelector("button");
    button.disabled = true;
    await guarded(async () => {
      setStatus("Joining…");
      const body = { code: $("join-code").value.trim() };
      const invite = $("join-invite").value.trim();
      if (invite) body.invite = invite;
      const joined = await api("POST", "v1/study/join", body);
      $("join-code").value = "";
      $("join-invite").value = "";
      signIn(joined.api_key, "study");
      sessionStorage.setItem(RESUME_STORE, joined.resume_code);
      $("joined-code").textContent = joined.resume_code;
      setStatus("");
      show("joined");
    });
    button.disabled = false;
  }

  async function resume(event) {
    event.preventDefault();
    const button = event.submitter || event.target.querySelector("button");
    button.disabled = true;
    await guarded(async () => {
      setStatus("Finding where you stopped…");
      const code = $("resume-code").value.trim();
      const back = await api("POST", "v1/study/resume", { resume_code: code });
      $("resume-code").value = "";
      signIn(back.api_key, "study");
      sessionStorage.setItem(RESUME_STORE, code);
      const where = await api("GET", "v1/study/state");
      go(where.pair ? "label" : "study");
    });
    button.disabled = false;
  }

  function useKey(event) {
    event.preventDefault();
    const key = $("key-input").value.trim();
    $("key-input").value = "";
    if (!key) return;
    signIn(key, "user");
    go("label");
  }

  // ---- labeling pairs ------------------------------------------------------------------------

  // The server says which pair comes next (`GET v1/study/state`), so a reload or a return with the
  // resume code goes on where the person stopped, and a pair is never asked twice. Only participants
  // label: a user signed in with a key has no study pairs.
  async function startLabeling() {
    show("label");
    $("label-pair").hidden = true;
    $("label-done").hidden = true;
    $("goto-ask").hidden = participant();
    if (!participant()) {
      await api("GET", "v1/users/me");  // a key that is not valid (any more) signs the page out here
      renderLabels(null);
      return;
    }
    setStatus("Loading the pairs to label…");
    renderLabels(await api("GET", "v1/study/state"));
    setStatus("");
  }

  function renderLabels(where) {
    const bar = $("label-bar");
    bar.max = Math.max(where ? where.label_count : 0, 1);
    bar.value = where ? where.labeled : 0;
    $("label-progress").textContent = where
      ? "Labeled " + where.labeled + " of " + where.label_count + " pairs." +
        (where.skipped ? " " + where.skipped + " answered “no preference”." : "")
      : "There are no pairs to label.";
    state.pair = where ? where.pair : null;
    if (!state.pair) {
      $("label-pair").hidden = true;
      $("label-done-text").textContent = where
        ? "Labeling is done: the answers you compare next are written from your labels."
        : "This server has no pairs to label: ask away.";
      $("label-done").hidden = false;
      return;
    }
    $("label-done").hidden = true;
    $("label-pair").hidden = false;
    $("label-question").textContent = state.pair.question;
    for (const [id, text] of [["label-a", state.pair.a], ["label-b", state.pair.b]]) {
      $(id).textContent = text;
    }
    $("label-none").hidden = false;
    for (const id of ["label-a", "label-b", "label-none"]) $(id).disabled = false;
  }

  async function label(choice) {
    const pair = state.pair;
    if (!pair || $("label-a").disabled) return;
    for (const id of ["label-a", "label-b", "label-none"]) $(id).disabled = true;
    await guarded(async () => {
      renderLabels(await api("POST", "v1/study/labels", { pair_id: pair.pair_id, choice }));
      setStatus(choice === "none" ? "Noted: no preference." : "Saved.");
    });
    if (state.pair === pair) for (const id of ["label-a", "label-b", "label-none"]) $(id).disabled = false;
    // The clicked button was disabled, which drops keyboard focus: give it to what comes next.
    ($("label-done").hidden ? $("label-a") : $("label-done").querySelector("button:not([hidden])")).focus();
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
    $("resume-form").addEventListener("submit", resume);
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
    $("label-none").addEventListener("click", () => label("none"));
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
