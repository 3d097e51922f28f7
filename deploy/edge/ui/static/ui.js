// The operator pages' only script besides htmx: the token (sessionStorage -> Authorization header), the review
// queue's keyboard shortcuts, and closing the confirmation dialog. No cookies, no eval, nothing from the network.
(function () {
  "use strict";
  var KEY = "sensitune-token";

  document.addEventListener("htmx:configRequest", function (e) {
    var token = sessionStorage.getItem(KEY);
    if (token) e.detail.headers["Authorization"] = "Bearer " + token;
  });

  function tokenChanged() { htmx.trigger(document.body, "token-changed"); }

  document.addEventListener("DOMContentLoaded", function () {
    var form = document.getElementById("token-form");
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      var input = document.getElementById("token");
      if (input.value.trim()) sessionStorage.setItem(KEY, input.value.trim());
      input.value = "";
      tokenChanged();
    });
    document.getElementById("forget-token").addEventListener("click", function () {
      sessionStorage.removeItem(KEY);
      tokenChanged();
    });
  });

  // A front door (the service's guard) answers a refused request with JSON meant for programs: the page says it in
  // an operator's words instead, once, in the page body; the header only says who is signed in.
  var SIGN_IN = "Sign in with your operator token to label frames";  // the heading; deploy/edge/ui/auth.py SIGN_IN
  var HOW = "Paste it in the box at the top right, then press Use token.";
  function esc(t) { return String(t).replace(/[&<>"']/g, function (c) { return "&#" + c.charCodeAt(0) + ";"; }); }
  document.addEventListener("htmx:beforeSwap", function (e) {
    var xhr = e.detail.xhr;
    if (xhr.status < 400 || (xhr.getResponseHeader("content-type") || "").indexOf("application/json") !== 0) return;
    if (e.detail.target && e.detail.target.id === "whoami") {
      var said = sessionStorage.getItem(KEY) ? "token not accepted" : "not signed in";
      e.detail.serverResponse = '<span class="who bad">' + said + "</span>";
      return;
    }
    var msg = xhr.responseText;
    try { msg = JSON.parse(msg).error || msg; } catch (_) { /* not JSON after all: show it as text */ }
    e.detail.serverResponse = '<div class="denied" data-status="' + xhr.status + '" role="alert"><h2>' +
      (xhr.status === 401 ? SIGN_IN : "Not allowed") + "</h2><p>" + esc(xhr.status === 401 ? HOW : msg) +
      "</p></div>";
  });

  document.addEventListener("click", function (e) {
    if (e.target.closest("[data-close-dialog]")) document.getElementById("dialog").innerHTML = "";
  });

  // Review queue: C or Enter = correct, 1-9 = the true class by its number, R = refresh.
  document.addEventListener("keydown", function (e) {
    if (document.body.dataset.page !== "review" || e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.target.closest("input, textarea, select")) return;
    var key = e.key === "Enter" ? "c" : e.key.toLowerCase();
    var btn = document.querySelector('#view [data-key="' + key + '"]');
    if (btn && !btn.disabled && !btn.classList.contains("htmx-request")) {
      e.preventDefault();
      btn.click();
    }
  });
})();
