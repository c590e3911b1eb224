/* django-satori: on a narrow screen (under 1600 px) the app's lists and pages start with Django's
 * navigation sidebar folded, so the columns an operator scans fit beside the filters.
 *
 * Loaded in <head>, before Django's nav_sidebar.js reads the visitor's choice: only when
 * there is no choice stored yet is "folded" lent for this page, and withdrawn once the
 * page is built, so other admin pages keep Django's default. Opening the sidebar with
 * its toggle stores a real choice, which this script then always leaves alone.
 */
(function () {
  "use strict";
  var KEY = "django.admin.navSidebarIsOpen";
  try {
    if (window.localStorage.getItem(KEY) !== null || window.innerWidth >= 1600) { return; }
    window.localStorage.setItem(KEY, "false");
    document.addEventListener("DOMContentLoaded", function () {
      if (window.localStorage.getItem(KEY) === "false") { window.localStorage.removeItem(KEY); }
    });
  } catch (e) {
    // No localStorage (private mode, disabled): Django's default layout is used.
  }
})();
