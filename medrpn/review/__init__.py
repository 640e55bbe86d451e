"""`medrpn review`: a page where a radiologist goes through what predict flagged and marks each
finding confirmed, rejected or of another type; the marks become a training annotation file.

* `medrpn.review.session`: the findings folder, images rendered at a chosen window, the marks and
  the CSV they make;
* `medrpn.review.page`: the page (HTML and JavaScript, no build step, nothing from the network);
* `medrpn.review.server`: the small local HTTP server between them.
"""
