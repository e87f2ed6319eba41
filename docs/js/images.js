// Marks every image once it has loaded (data-shown="WIDTHxHEIGHT") or failed (data-broken): what the
// site's test reads back from headless Chromium.
document.addEventListener("DOMContentLoaded", () => {
  for (const img of document.images) {
    const mark = () => {
      if (img.naturalWidth) img.dataset.shown = img.naturalWidth + "x" + img.naturalHeight;
      else img.dataset.broken = "1";
    };
    if (img.complete) mark();
    else {
      img.addEventListener("load", mark);
      img.addEventListener("error", () => { img.dataset.broken = "1"; });
    }
  }
});
