/* django-satori: tags as chips. Plain JS, no build step.
 *
 * The real field stays an <input> holding "tag1, tag2" and is what the form posts, so
 * the server sees the same thing with or without this script; here it is only hidden
 * and kept up to date from the chips. Comma (ASCII or full-width) or Enter ends a tag.
 */
(function () {
  "use strict";
  var SEPARATORS = /[,\uff0c]/;

  function split(text) {
    var seen = [];
    text.split(SEPARATORS).forEach(function (part) {
      var tag = part.replace(/^[\s\u3000]+|[\s\u3000]+$/g, "");
      if (tag && seen.indexOf(tag) === -1) { seen.push(tag); }
    });
    return seen;
  }

  function enhance(input) {
    if (input.dataset.satoriTags === "on") { return; }
    input.dataset.satoriTags = "on";
    var tags = split(input.value);
    var box = document.createElement("div");
    box.className = "satori-tag-box";
    var list = document.createElement("ul");
    list.className = "satori-tag-list";
    var entry = document.createElement("input");
    entry.type = "text";
    entry.className = "satori-tag-entry";
    entry.id = input.id + "_entry";
    entry.setAttribute("placeholder", input.dataset.placeholder || "");
    entry.setAttribute("aria-label", input.dataset.placeholder || "");
    box.appendChild(list);
    box.appendChild(entry);
    input.type = "hidden";
    input.parentNode.insertBefore(box, input.nextSibling);
    // A <label for=...> of the field now points at the box's text entry.
    var label = document.querySelector('label[for="' + input.id + '"]');
    if (label) { label.htmlFor = entry.id; }

    function sync() {
      input.value = tags.join(", ");
      list.textContent = "";
      tags.forEach(function (tag, index) {
        var chip = document.createElement("li");
        chip.className = "satori-tag";
        var text = document.createElement("span");
        text.textContent = tag;
        text.title = tag;
        var remove = document.createElement("button");
        remove.type = "button";
        remove.className = "satori-tag-remove";
        remove.textContent = "\u00d7";
        remove.setAttribute("aria-label", (input.dataset.removeLabel || "%(tag)s").replace("%(tag)s", tag));
        remove.addEventListener("click", function () {
          tags.splice(index, 1);
          sync();
          entry.focus();
        });
        chip.appendChild(text);
        chip.appendChild(remove);
        list.appendChild(chip);
      });
    }

    function take() {
      var added = split(entry.value);
      entry.value = "";
      added.forEach(function (tag) { if (tags.indexOf(tag) === -1) { tags.push(tag); } });
      sync();
    }

    entry.addEventListener("keydown", function (event) {
      if (event.isComposing) { return; } // Enter confirms the IME's conversion first
      if (event.key === "Enter" || event.key === ",") {
        event.preventDefault();
        take();
      } else if (event.key === "Backspace" && entry.value === "" && tags.length) {
        tags.pop();
        sync();
      }
    });
    entry.addEventListener("input", function () {
      if (SEPARATORS.test(entry.value)) { take(); }
    });
    entry.addEventListener("blur", take);
    if (input.form) { input.form.addEventListener("submit", take); }
    box.addEventListener("click", function (event) {
      if (event.target === box || event.target === list) { entry.focus(); }
    });
    sync();
  }

  function init() {
    Array.prototype.forEach.call(document.querySelectorAll("input.satori-tags"), enhance);
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
