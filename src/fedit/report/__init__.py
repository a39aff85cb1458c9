"""``fedit report``: one self-contained HTML page for a run folder or an experiment folder.

The page embeds its PNG plots as base64 (no external file, script or style sheet), so it
can be mailed or attached as it is; the same PNGs are also written beside the HTML.

- experiment folder (``experiment.json``, from ``fedit experiment``): held-out loss per
  round of the FedIT arm with the other arms as horizontal lines, per-category loss and
  ROUGE-L bars of the four arms, the paired differences of fedit against every other arm
  as a forest plot (``experiment.json``'s ``"paired"``), the clients' data heatmap, the
  overall metrics table, sample answers side by side, each arm's ``judge.json`` when there
  is one;
- run folder (``metrics.jsonl``, from ``fedit train``): the loss curves (per category too
  when the rounds recorded it), the heatmap, and ``eval.json`` / ``judge.json`` when
  ``fedit eval`` / ``fedit judge`` have written them.
"""

from pathlib import Path

from fedit.report.page import build_page, render_html, sample_rows
from fedit.report.seeds import build_seeds_report, is_seeds_folder
from fedit.report.source import Source, load_source


def build_report(folder: Path, out: Path | None = None) -> Path:
    """Write ``out`` (default ``<folder>/report.html``) and its PNGs beside it: the page of
    a run or an experiment, or of a ``--seeds`` folder the page across its seeds."""
    if is_seeds_folder(Path(folder)):
        return build_seeds_report(Path(folder), out)
    return build_page(Path(folder), out)


__all__ = ["Source", "build_report", "load_source", "render_html", "sample_rows"]
