// htmx-style polling for the fleet page: every element marked data-poll is replaced, every
// few seconds, by the element with the same id in a fresh copy of the page (fetched with the
// page's cookie). Forms, focus and scroll position stay; nothing else runs here.
(function () {
  "use strict";
  var seconds = 5;
  function refresh() {
    if (document.hidden) { return; }
    fetch(window.location.href, { credentials: "same-origin", headers: { "X-Live": "1" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (text) {
        if (text === null) { return; }
        var fresh = new DOMParser().parseFromString(text, "text/html");
        document.querySelectorAll("[data-poll]").forEach(function (el) {
          var next = fresh.getElementById(el.id);
          if (next) { el.replaceWith(next); }
        });
        document.body.setAttribute("data-refreshed", String(Date.now()));
      })
      .catch(function () { /* the next tick tries again */ });
  }
  window.setInterval(refresh, seconds * 1000);
})();
