// Token inspector: shows a hovered token's data- attributes. It writes textContent only (never
// HTML), and the page's CSP allows this script by its hash and nothing else.
(function () {
  "use strict";
  var tip = document.getElementById("tip");
  var inspector = document.getElementById("inspector");
  if (!tip) { return; }
  var names = [["pos", "position"], ["id", "token id"], ["cls", "class"], ["label", "label"],
               ["att", "attention"], ["target", "effective target"], ["loss", "token loss"], ["grad", "grad norm"]];
  function describe(el) {
    var lines = [];
    var text = el.textContent;
    lines.push(JSON.stringify(text));
    for (var i = 0; i < names.length; i++) {
      var v = el.getAttribute("data-" + names[i][0]);
      if (v !== null) { lines.push(names[i][1] + ": " + v); }
    }
    return lines;
  }
  function show(el) {
    var lines = describe(el);
    tip.textContent = "";
    for (var i = 0; i < lines.length; i++) {
      var div = document.createElement("div");
      div.textContent = lines[i];
      if (i === 0) { div.className = "tip-text"; }
      tip.appendChild(div);
    }
    tip.hidden = false;
    var r = el.getBoundingClientRect();
    var left = Math.min(window.innerWidth - tip.offsetWidth - 8, Math.max(8, r.left));
    var top = r.bottom + 6;
    if (top + tip.offsetHeight > window.innerHeight - 4) { top = r.top - tip.offsetHeight - 6; }
    tip.style.left = left + "px";
    tip.style.top = top + "px";
    if (inspector) { inspector.textContent = lines.join("  ·  "); }
  }
  document.addEventListener("mouseover", function (ev) {
    var el = ev.target;
    if (el && el.classList && el.classList.contains("t") && el.hasAttribute("data-id")) { show(el); }
    else { tip.hidden = true; }
  });
  document.addEventListener("scroll", function () { tip.hidden = true; }, { passive: true });
})();
